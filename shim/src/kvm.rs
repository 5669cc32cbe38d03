//! Can this host's KVM run an ordinary guest?
//!
//! `/dev/kvm` existing is not enough: a nested host may offer KVM through PVM, which only
//! runs PVM-enabled guest kernels (an ordinary guest makes no progress, REFERENCE §1). So
//! the probe runs a real guest: a few real-mode instructions (`mov al, 0x42; out 0x10, al;
//! hlt`) in a fresh VM through the raw ioctls, and expects the port write to come back as
//! a `KVM_EXIT_IO`. It runs in a forked child, so a vCPU that never returns can be killed;
//! the result is cached for the life of the process.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The verdict, with the reason in words (shown by `shoji check` and logged at VM start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    pub usable: bool,
    pub reason: String,
}

/// How long the probe guest may take before KVM is declared unusable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The cached verdict (the first call runs the probe, at most [`PROBE_TIMEOUT`]).
pub fn probe() -> &'static KvmProbe {
    static PROBE: OnceLock<KvmProbe> = OnceLock::new();
    PROBE.get_or_init(run_probe)
}

fn unusable(reason: impl Into<String>) -> KvmProbe {
    KvmProbe {
        usable: false,
        reason: reason.into(),
    }
}

// ioctl numbers from <linux/kvm.h> (x86_64).
const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_CREATE_VM: u64 = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xAE04;
const KVM_CREATE_VCPU: u64 = 0xAE41;
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_AE46;
const KVM_RUN: u64 = 0xAE80;
const KVM_SET_REGS: u64 = 0x4090_AE82;
const KVM_GET_SREGS: u64 = 0x8138_AE83;
const KVM_SET_SREGS: u64 = 0x4138_AE84;
const KVM_EXIT_IO: u32 = 2;
const PROBE_PORT: u16 = 0x10;
const PROBE_VALUE: u8 = 0x42;
/// mov al, 0x42; out 0x10, al; hlt
const PROBE_CODE: [u8; 5] = [0xB0, PROBE_VALUE, 0xE6, PROBE_PORT as u8, 0xF4];
const CODE_ADDR: u64 = 0x1000;
const MEM_SIZE: usize = 0x10000;

fn run_probe() -> KvmProbe {
    // SAFETY: open(2) with a static C string.
    let fd = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return unusable(format!(
            "cannot open /dev/kvm: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let kvm = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: KVM_GET_API_VERSION takes no argument.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != 12 {
        return unusable(format!(
            "/dev/kvm reports API version {version}, expected 12"
        ));
    }
    drop(kvm);

    // SAFETY: the child only makes raw system calls (no allocation, no locks) and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return unusable(format!(
            "fork for the KVM probe failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        // SAFETY: in the forked child; see probe_guest.
        unsafe { libc::_exit(probe_guest()) };
    }
    let started = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return verdict(status, started.elapsed());
        }
        if r < 0 {
            // Reaped by someone else (a SIGCHLD reaper): the verdict is lost.
            return unusable("the KVM probe's exit status was taken by another reaper");
        }
        if started.elapsed() > PROBE_TIMEOUT {
            // SAFETY: kill + wait on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return unusable(format!(
                "a test guest made no progress under KVM within {PROBE_TIMEOUT:?} \
                 (this KVM cannot run ordinary guests, e.g. PVM)"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn verdict(status: i32, took: Duration) -> KvmProbe {
    if libc::WIFSIGNALED(status) {
        return unusable(format!(
            "the KVM probe died of signal {}",
            libc::WTERMSIG(status)
        ));
    }
    let code = libc::WEXITSTATUS(status);
    let step = match code {
        0 => {
            return KvmProbe {
                usable: true,
                reason: format!("a test guest ran under KVM ({} ms)", took.as_millis()),
            }
        }
        1 => "KVM_CREATE_VM failed",
        2 => "mapping guest memory failed",
        3 => "KVM_SET_USER_MEMORY_REGION failed",
        4 => "KVM_CREATE_VCPU failed",
        5 => "mapping the vCPU state failed",
        6 => "KVM_GET_SREGS/KVM_SET_SREGS failed",
        7 => "KVM_SET_REGS failed",
        8 => "KVM_RUN failed (this KVM cannot run ordinary guests, e.g. PVM)",
        9 => "the test guest's port write did not come back (this KVM cannot run ordinary guests)",
        _ => "the KVM probe failed",
    };
    unusable(format!("{step} (probe exit {code})"))
}

/// Runs the probe guest; returns the exit code for [`verdict`]. Raw system calls only: this
/// runs in a child forked from a multi-threaded process.
fn probe_guest() -> i32 {
    // SAFETY: every call below is a plain system call on descriptors and memory owned here;
    // the buffers passed to the ioctls have the kernel's struct sizes.
    unsafe {
        let kvm = libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR);
        let vm = libc::ioctl(kvm, KVM_CREATE_VM as _, 0);
        if vm < 0 {
            return 1;
        }
        let mem = libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if mem == libc::MAP_FAILED {
            return 2;
        }
        std::ptr::copy_nonoverlapping(
            PROBE_CODE.as_ptr(),
            (mem as *mut u8).add(CODE_ADDR as usize),
            PROBE_CODE.len(),
        );
        // struct kvm_userspace_memory_region { u32 slot, flags; u64 guest_phys_addr, memory_size, userspace_addr }
        let region: [u64; 4] = [0, 0, MEM_SIZE as u64, mem as u64];
        if libc::ioctl(vm, KVM_SET_USER_MEMORY_REGION as _, region.as_ptr()) < 0 {
            return 3;
        }
        let vcpu = libc::ioctl(vm, KVM_CREATE_VCPU as _, 0);
        if vcpu < 0 {
            return 4;
        }
        let run_size = libc::ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE as _, 0);
        if run_size <= 0 {
            return 5;
        }
        let run = libc::mmap(
            std::ptr::null_mut(),
            run_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu,
            0,
        ) as *const u8;
        if run as *mut libc::c_void == libc::MAP_FAILED {
            return 5;
        }
        // struct kvm_sregs is 312 bytes; cs (a struct kvm_segment) comes first: base at 0, selector at 12.
        let mut sregs = [0u8; 312];
        if libc::ioctl(vcpu, KVM_GET_SREGS as _, sregs.as_mut_ptr()) < 0 {
            return 6;
        }
        sregs[0..8].fill(0);
        sregs[12..14].fill(0);
        if libc::ioctl(vcpu, KVM_SET_SREGS as _, sregs.as_ptr()) < 0 {
            return 6;
        }
        // struct kvm_regs: 18 u64, rip at index 16, rflags at 17 (bit 1 is always set).
        let mut regs = [0u64; 18];
        regs[16] = CODE_ADDR;
        regs[17] = 2;
        if libc::ioctl(vcpu, KVM_SET_REGS as _, regs.as_ptr()) < 0 {
            return 7;
        }
        if libc::ioctl(vcpu, KVM_RUN as _, 0) < 0 {
            return 8;
        }
        // struct kvm_run: exit_reason (u32) at 8; io { u8 direction, size; u16 port; u32 count; u64 data_offset } at 32.
        let exit_reason = *(run.add(8) as *const u32);
        let port = *(run.add(34) as *const u16);
        let data_offset = *(run.add(40) as *const u64) as usize;
        if exit_reason != KVM_EXIT_IO || port != PROBE_PORT || data_offset >= run_size as usize {
            return 9;
        }
        if *run.add(data_offset) == PROBE_VALUE {
            0
        } else {
            9
        }
    }
}
