//! Can this host's KVM run an ordinary guest?
//!
//! `/dev/kvm` existing is not enough: a nested host may offer KVM through PVM, which only
//! runs PVM-enabled guest kernels (an ordinary guest makes no progress). So
//! the probe runs what every guest kernel does early: 64-bit mode with paging, and an
//! exception taken through an IDT (`int3` → a handler that writes a port). Plain real- or
//! long-mode code runs under PVM too; exception delivery is where it fails (measured:
//! `KVM_EXIT_INTERNAL_ERROR`). The probe runs in a forked child through the raw ioctls, so a
//! vCPU that never returns can be killed; the result is cached for the life of the process.
//!
//! The child reports its verdict through a pipe, not its exit status: inside the shim the
//! containerd-shim framework reaps every child on SIGCHLD, and a status collected by
//! `waitpid` would be lost to it (the probe then wrongly reported TCG on KVM hosts).
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

/// The cached verdict (the first call runs the probe, at most [`PROBE_TIMEOUT`]). Blocks.
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
const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
const PROBE_PORT: u16 = 0x10;
/// Written by the exception handler: the guest ran in long mode and took an exception.
const HANDLED: u8 = 0x42;
/// Written when `int3` fell through without reaching the handler.
const NOT_DELIVERED: u8 = 0x44;
/// Guest memory: code, handler, page tables, IDT and GDT in the first 32 KiB; one 2 MiB page.
const MEM_SIZE: usize = 0x20_0000;
const CODE: (usize, &[u8]) = (
    0x1000,
    &[0xCC, 0xB0, NOT_DELIVERED, 0xE6, PROBE_PORT as u8, 0xF4],
); // int3; mov al; out; hlt
const HANDLER: (usize, &[u8]) = (0x1100, &[0xB0, HANDLED, 0xE6, PROBE_PORT as u8, 0xF4]); // mov al; out; hlt
const PML4: usize = 0x2000;
const PDPT: usize = 0x3000;
const PD: usize = 0x4000;
const IDT: usize = 0x5000;
const GDT: usize = 0x6000;
const STACK_TOP: u64 = 0x8000;

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

    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return unusable(format!(
            "pipe for the KVM probe failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fresh descriptors we own.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only makes raw system calls (no allocation, no locks) and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return unusable(format!(
            "fork for the KVM probe failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        // SAFETY: in the forked child; see probe_guest. One byte: the verdict.
        unsafe {
            let code = probe_guest() as u8;
            libc::write(tx.as_raw_fd(), (&code as *const u8).cast(), 1);
            libc::_exit(0)
        };
    }
    drop(tx);
    let started = Instant::now();
    let answer = read_byte(&rx, PROBE_TIMEOUT);
    // SAFETY: kill(2) of our own child; whoever reaps it, the verdict is already in hand.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap_if_ours(pid);
    match answer {
        Some(code) => verdict(code as i32, started.elapsed()),
        None if started.elapsed() >= PROBE_TIMEOUT => unusable(format!(
            "a test guest made no progress under KVM within {PROBE_TIMEOUT:?} \
             (this KVM cannot run ordinary guests, e.g. PVM)"
        )),
        None => unusable("the KVM probe died before it could answer"),
    }
}

/// One byte from `fd` within `timeout`; `None` on timeout or end of file.
fn read_byte(fd: &OwnedFd, timeout: Duration) -> Option<u8> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).ok()?;
    // SAFETY: poll(2) on one pollfd we own.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    let mut byte = 0u8;
    // SAFETY: read(2) of one byte into a local.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
    (n == 1).then_some(byte)
}

/// Collects the killed child unless a SIGCHLD reaper (the shim's) takes it.
fn reap_if_ours(pid: i32) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: waitpid on our own child; ECHILD means another reaper collected it.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => std::thread::sleep(Duration::from_millis(2)),
            _ => return,
        }
    }
}

fn verdict(code: i32, took: Duration) -> KvmProbe {
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
        9 => "the test guest did not exit on its port write (this KVM cannot run ordinary guests)",
        10 => "KVM could not deliver an exception to a 64-bit test guest (internal error: this KVM cannot run ordinary guests, e.g. PVM)",
        11 => "an exception in the test guest was not delivered to its handler (this KVM cannot run ordinary guests)",
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
        ) as *mut u8;
        if mem as *mut libc::c_void == libc::MAP_FAILED {
            return 2;
        }
        write_guest(mem);
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
        let mut sregs = [0u8; 312];
        if libc::ioctl(vcpu, KVM_GET_SREGS as _, sregs.as_mut_ptr()) < 0 {
            return 6;
        }
        long_mode_sregs(&mut sregs);
        if libc::ioctl(vcpu, KVM_SET_SREGS as _, sregs.as_ptr()) < 0 {
            return 6;
        }
        // struct kvm_regs: 18 u64; rsp at index 6, rip at 16, rflags at 17 (bit 1 is always set).
        let mut regs = [0u64; 18];
        regs[6] = STACK_TOP;
        regs[16] = CODE.0 as u64;
        regs[17] = 2;
        if libc::ioctl(vcpu, KVM_SET_REGS as _, regs.as_ptr()) < 0 {
            return 7;
        }
        if libc::ioctl(vcpu, KVM_RUN as _, 0) < 0 {
            return 8;
        }
        // struct kvm_run: exit_reason (u32) at 8; io { u8 direction, size; u16 port; u32 count; u64 data_offset } at 32.
        let exit_reason = *(run.add(8) as *const u32);
        if exit_reason == KVM_EXIT_INTERNAL_ERROR {
            return 10;
        }
        let port = *(run.add(34) as *const u16);
        let data_offset = *(run.add(40) as *const u64) as usize;
        if exit_reason != KVM_EXIT_IO || port != PROBE_PORT || data_offset >= run_size as usize {
            return 9;
        }
        match *run.add(data_offset) {
            HANDLED => 0,
            _ => 11,
        }
    }
}

/// Lays out the probe guest: code, exception handler, identity-mapped page tables (one
/// 2 MiB page), an IDT whose 32 exception vectors all point at the handler, and a GDT with
/// a 64-bit code and a data segment.
///
/// # Safety
/// `mem` must point to [`MEM_SIZE`] writable bytes.
unsafe fn write_guest(mem: *mut u8) {
    let put = |at: usize, bytes: &[u8]| {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), mem.add(at), bytes.len())
    };
    let put64 = |at: usize, v: u64| put(at, &v.to_le_bytes());
    put(CODE.0, CODE.1);
    put(HANDLER.0, HANDLER.1);
    put64(PML4, PDPT as u64 | 3);
    put64(PDPT, PD as u64 | 3);
    put64(PD, 0x83); // present, writable, 2 MiB page at 0
    for vector in 0..32 {
        // 64-bit interrupt gate: offset 0..16, selector 8, type 0x8E, offset 16..32, offset 32..64.
        let off = HANDLER.0 as u64;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(off as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&8u16.to_le_bytes());
        gate[5] = 0x8E;
        gate[6..8].copy_from_slice(&((off >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((off >> 32) as u32).to_le_bytes());
        put(IDT + vector * 16, &gate);
    }
    put64(GDT + 8, 0x00AF_9A00_0000_FFFF); // 64-bit code, ring 0
    put64(GDT + 16, 0x00CF_9200_0000_FFFF); // data, ring 0
}

/// Fills a struct kvm_sregs (312 bytes) for 64-bit mode with paging on.
fn long_mode_sregs(s: &mut [u8; 312]) {
    // struct kvm_segment (24 bytes): base u64, limit u32, selector u16, type, present, dpl, db, s, l, g, avl, ...
    let segment = |s: &mut [u8; 312], at: usize, selector: u16, kind: u8, long: bool| {
        s[at..at + 24].fill(0);
        s[at + 8..at + 12].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        s[at + 12..at + 14].copy_from_slice(&selector.to_le_bytes());
        s[at + 14] = kind;
        s[at + 15] = 1; // present
        s[at + 17] = u8::from(!long); // db
        s[at + 18] = 1; // code/data
        s[at + 19] = u8::from(long);
        s[at + 20] = 1; // granularity
    };
    segment(s, 0, 8, 11, true); // cs
    for at in [24, 48, 72, 96, 120] {
        segment(s, at, 16, 3, false); // ds es fs gs ss
    }
    let put64 =
        |s: &mut [u8; 312], at: usize, v: u64| s[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let put16 =
        |s: &mut [u8; 312], at: usize, v: u16| s[at..at + 2].copy_from_slice(&v.to_le_bytes());
    put64(s, 192, GDT as u64);
    put16(s, 200, 23);
    put64(s, 208, IDT as u64);
    put16(s, 216, 32 * 16 - 1);
    put64(s, 224, 0x8000_0011); // cr0: PG | ET | PE
    put64(s, 240, PML4 as u64); // cr3
    put64(s, 248, 0x20); // cr4: PAE
    put64(s, 264, 0x500); // efer: LME | LMA
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside the shim a SIGCHLD reaper (the containerd-shim framework's) collects every
    /// child: the verdict must not depend on who reaps the probe.
    #[test]
    fn the_verdict_is_the_same_under_a_waitpid_reaper() {
        let without = run_probe();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut status = 0;
                    // SAFETY: waitpid(-1) reaps any child of this test process.
                    unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let with = run_probe();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reaper.join().unwrap();
        assert!(!with.reason.contains("reaper"), "{}", with.reason);
        assert_eq!(
            with.usable, without.usable,
            "{} / {}",
            with.reason, without.reason
        );
        // The cause is the same (the probe's own timing differs).
        let cause = |r: &str| r.split(" (").next().unwrap_or(r).to_string();
        assert_eq!(cause(&with.reason), cause(&without.reason));
    }
}
