//! The sandbox's own mount namespace, where its shared directory's mounts live.
//!
//! A container's volumes and rootfs are mounted under the shared directory for virtiofsd.
//! Made in the host's mount namespace, those mounts (and the copies of every mount nested
//! in a volume) would sit in the host's mount table: a host mount point the pod copied
//! could not be removed while the pod runs (`rmdir` is EBUSY for a mount point in the
//! caller's namespace), and a crashed shim would leave them behind. In a namespace of the
//! sandbox's own they are invisible to the host, and they all go when the namespace does:
//! when [`MountNamespace`] is dropped and virtiofsd, the only process in it, has exited.
//!
//! The namespace is a slave of the host's at its creation. What the host mounts later is
//! not always visible in it (`/` is often private), so a bind's source is cloned in the
//! caller's namespace (`open_tree`) and attached in the sandbox's (`move_mount`).
//! Work in the namespace runs on a short-lived thread of its own ([`MountNamespace::run`]):
//! setns(2) changes only the calling thread, which must never be a runtime worker.
use std::{
    fs::File,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::Command,
};

use nix::{
    mount::{mount, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

use super::mounts::MountError;

/// A handle on the namespace: it lives as long as this (or a process in it).
#[derive(Debug)]
pub struct MountNamespace {
    ns: OwnedFd,
}

fn ns_err(op: &str) -> impl FnOnce(nix::Error) -> MountError + '_ {
    move |e| MountError {
        op: op.into(),
        target: "the sandbox's mount namespace".into(),
        source: e.into(),
    }
}

impl MountNamespace {
    /// A new mount namespace, a slave copy of the caller's: mounts made in it never reach
    /// the host.
    pub fn create() -> Result<MountNamespace, MountError> {
        let ns = std::thread::scope(|s| {
            s.spawn(|| {
                unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS)
                    .map_err(ns_err("unshare"))?;
                let none = None::<&str>;
                mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
                    .map_err(ns_err("make / a slave in"))?;
                File::open("/proc/thread-self/ns/mnt")
                    .map(OwnedFd::from)
                    .map_err(|source| MountError {
                        op: "open".into(),
                        target: "/proc/thread-self/ns/mnt".into(),
                        source,
                    })
            })
            .join()
            .expect("the namespace thread does not panic")
        })?;
        Ok(MountNamespace { ns })
    }

    /// Runs `f` in the namespace, on a thread of its own, and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, MountError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                unshare(CloneFlags::CLONE_FS).map_err(ns_err("unshare the fs context for"))?;
                setns(self.ns.as_fd(), CloneFlags::CLONE_NEWNS).map_err(ns_err("enter"))?;
                Ok(f())
            })
            .join()
            .expect("work in the mount namespace does not panic")
        })
    }

    /// Makes `cmd` run in the namespace (it enters it between fork and exec).
    pub fn enter_on_exec(&self, cmd: &mut Command) -> Result<(), MountError> {
        let ns = self.ns.try_clone().map_err(|source| MountError {
            op: "duplicate".into(),
            target: "the sandbox's mount namespace".into(),
            source,
        })?;
        // SAFETY: only setns(2), async-signal-safe, runs between fork and exec; the fd is
        // moved into the closure and stays open until the command is dropped.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// A detached copy of the mount at `source` (with the mounts below it when `recursive`),
/// made in the caller's mount namespace, to attach elsewhere with [`attach`].
pub(super) fn clone_tree(source: &Path, recursive: bool) -> Result<OwnedFd, MountError> {
    let path = cstring(source)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as u32;
    }
    // SAFETY: open_tree(2) reads the NUL-terminated path for the call's duration.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(MountError {
            op: "open_tree (clone)".into(),
            target: source.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: open_tree returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Attaches the detached tree `tree` at `target` (in the calling thread's namespace).
pub(super) fn attach(tree: &OwnedFd, target: &Path) -> Result<(), MountError> {
    let path = cstring(target)?;
    // SAFETY: move_mount(2) reads the two NUL-terminated paths for the call's duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(MountError {
            op: "move_mount".into(),
            target: target.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub(super) fn cstring(path: &Path) -> Result<std::ffi::CString, MountError> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| MountError {
        op: "path".into(),
        target: path.into(),
        source: std::io::Error::other(e),
    })
}
