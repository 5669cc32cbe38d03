//! The seccomp allow-list of the vsock back-end (vhost-device-vsock), compiled with
//! Firecracker's seccompiler and installed before exec.
//!
//! The list is what the daemon was seen to call (strace -f over a pod's boot, exec,
//! port-forward and stop) plus what its libraries may call on other paths (the loader at
//! exec, glibc's thread start-up). Anything else fails with ENOSYS rather than killing the
//! daemon, which would end the VM: glibc treats ENOSYS from `clone3` as "use clone",
//! and `clone` itself is allowed only for threads, so the daemon cannot start a process.
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::JailError;

/// System calls allowed with any arguments.
const ALLOWED: &[libc::c_long] = &[
    // exec and the loader
    libc::SYS_execve,
    libc::SYS_brk,
    libc::SYS_arch_prctl,
    libc::SYS_access,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_close,
    libc::SYS_set_tid_address,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prlimit64,
    libc::SYS_getrandom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_futex,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_readlink,
    libc::SYS_lseek,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_readv,
    // its event loops
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    // vhost-user and the hybrid-vsock Unix sockets
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The vsock back-end's filter.
pub fn vsock_backend() -> Result<BpfProgram, JailError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let thread_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| JailError::Seccomp(e.to_string()))?;
    rules.insert(libc::SYS_clone, vec![thread_only]);
    // Its threads name themselves; no other prctl.
    let set_name = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::PR_SET_NAME as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| JailError::Seccomp(e.to_string()))?;
    rules.insert(libc::SYS_prctl, vec![set_name]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::ENOSYS as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| JailError::Seccomp(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| JailError::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_cannot_start_a_process() {
        use std::os::unix::process::CommandExt;
        let prog = vsock_backend().unwrap();
        let mut sh = std::process::Command::new("/bin/sh");
        sh.args(["-c", "echo shell ran; /bin/true; echo spawned"]);
        // SAFETY: prctl(2) only, between fork and exec.
        unsafe {
            sh.pre_exec(move || {
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = sh.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The shell itself ran under the filter (exec, the loader, its writes) ...
        assert!(stdout.contains("shell ran"), "{stdout} {stderr}");
        // ... and could not fork.
        assert!(!stdout.contains("spawned"), "{stdout}");
        assert!(stderr.to_lowercase().contains("fork"), "{stderr}");
    }
}
