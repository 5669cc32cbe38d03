//! What the runtime asks of the guest kernel and libcontainer, behind one trait: the runtime
//! keeps the rules (which verb may follow which, what an exit means, what is kept and for
//! how long) and [`GuestOs`] does the work, so that the rules are unit-tested against an
//! in-process fake (`fake.rs`), as youki tests its verbs through its `Syscall` trait.
//! [`LinuxGuest`] is the real one: helpers for what libcontainer clones, the reaper for every
//! exit, kill(2) and cgroup files for signals, mounts for the rootfs.
use std::{
    fs,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use async_trait::async_trait;
use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use slog::{debug, warn};
use tokio::sync::oneshot;

use super::{internal, RuntimeError};
use crate::{
    cgroup,
    container::{self, kill::KillError, rootfs, rootfs::RootfsError, HelperError},
    logger::log,
    reaper::{Exit, Reaper},
};

/// How a new process gets its stdio.
#[derive(Clone, Copy)]
pub enum NewStdio<'a> {
    /// The container's ends of its stdin, stdout and stderr pipes.
    Pipes([BorrowedFd<'a>; 3]),
    /// A tty: the process sends its pty master to this console socket.
    Console(&'a Path),
}

#[async_trait]
pub trait GuestOs: Send + Sync + 'static {
    /// Starts the pod's pause process, first of the pod's PID, IPC and UTS namespaces; its pid.
    async fn start_pause(&self) -> Result<i32, HelperError>;
    /// Makes container `id` from the bundle in `dir`; its init exists and waits for
    /// [`GuestOs::start`]. Returns the init's pid.
    async fn create(&self, id: &str, dir: &Path, stdio: NewStdio<'_>) -> Result<i32, HelperError>;
    /// Lets created container `id`'s init run the user's program.
    async fn start(&self, id: &str) -> Result<(), String>;
    /// Runs the process in `dir/process.json` inside container `id`; returns its pid.
    async fn exec(&self, id: &str, dir: &Path, stdio: NewStdio<'_>) -> Result<i32, HelperError>;
    /// The exit of `pid`, a process created after `born`.
    fn reap(&self, pid: i32, born: Instant) -> oneshot::Receiver<Exit>;
    /// Signals one process; one that no longer exists is [`KillError::Gone`].
    fn signal(&self, pid: i32, signal: Signal) -> Result<(), KillError>;
    /// Whether process `pid` still exists (a zombie does).
    fn exists(&self, pid: i32) -> bool;
    /// Signals every process in `cgroup` and its descendants.
    async fn signal_all(&self, cgroup: &Path, signal: Signal) -> Result<(), KillError>;
    /// Mounts a container's rootfs from `source` (the share) at `rootfs::path(dir)`, as an
    /// overlay when `overlay`; returns where.
    fn assemble_rootfs(
        &self,
        source: &Path,
        overlay: bool,
        dir: &Path,
    ) -> Result<PathBuf, RootfsError>;
    /// Unmounts the rootfs of the container whose directory is `dir` and removes the directory.
    /// Already gone is success.
    fn remove_files(&self, dir: &Path) -> Result<(), RootfsError>;
    /// Ends what container `id` leaves in the guest: every process in `cgroup`, the cgroup,
    /// libcontainer's state, and `dir` with the rootfs. Best effort: logs what it cannot undo.
    async fn destroy(&self, id: &str, cgroup: &Path, dir: &Path);
    /// Writes sysctls (names checked by the caller): in the guest's network namespace, the
    /// pod's, or with `ipc_of` in that process's IPC namespace.
    async fn set_sysctls(
        &self,
        sysctls: Vec<(String, String)>,
        ipc_of: Option<i32>,
    ) -> Result<(), RuntimeError>;
}

/// The guest as it is: PID 1's reaper, libcontainer in helpers, the cgroup v2 tree.
pub struct LinuxGuest {
    reaper: Arc<Reaper>,
}

impl LinuxGuest {
    pub fn new(reaper: Arc<Reaper>) -> LinuxGuest {
        LinuxGuest { reaper }
    }
}

/// What a helper gets for a process's stdio: the pipes at fixed fds, or a console socket.
fn split(stdio: NewStdio<'_>) -> (Option<[BorrowedFd<'_>; 3]>, Option<&Path>) {
    match stdio {
        NewStdio::Pipes(fds) => (Some(fds), None),
        NewStdio::Console(socket) => (None, Some(socket)),
    }
}

#[async_trait]
impl GuestOs for LinuxGuest {
    async fn start_pause(&self) -> Result<i32, HelperError> {
        container::pause::start().await
    }

    async fn create(&self, id: &str, dir: &Path, stdio: NewStdio<'_>) -> Result<i32, HelperError> {
        let (fds, console) = split(stdio);
        container::create::create(&self.reaper, id, dir, fds, console).await
    }

    async fn start(&self, id: &str) -> Result<(), String> {
        container::start::start(id).await
    }

    async fn exec(&self, id: &str, dir: &Path, stdio: NewStdio<'_>) -> Result<i32, HelperError> {
        let (fds, console) = split(stdio);
        container::exec::exec(&self.reaper, id, dir, fds, console).await
    }

    fn reap(&self, pid: i32, born: Instant) -> oneshot::Receiver<Exit> {
        self.reaper.watch(pid, born)
    }

    fn signal(&self, pid: i32, signal: Signal) -> Result<(), KillError> {
        container::kill::one(pid, signal)
    }

    fn exists(&self, pid: i32) -> bool {
        kill(Pid::from_raw(pid), None).is_ok()
    }

    async fn signal_all(&self, cgroup: &Path, signal: Signal) -> Result<(), KillError> {
        container::kill::all(cgroup, signal).await
    }

    fn assemble_rootfs(
        &self,
        source: &Path,
        overlay: bool,
        dir: &Path,
    ) -> Result<PathBuf, RootfsError> {
        rootfs::assemble(source, overlay, dir)
    }

    fn remove_files(&self, dir: &Path) -> Result<(), RootfsError> {
        rootfs::teardown(dir)
    }

    /// No libcontainer helper: once every process of the cgroup is gone, what libcontainer
    /// keeps is its state directory, so killing, the cgroup and the files are done here.
    async fn destroy(&self, id: &str, cg: &Path, dir: &Path) {
        if let Err(e) = cgroup::kill_all(cg) {
            warn!(log(), "killing the container's processes failed"; "container" => id, "error" => %e);
        }
        if let Err(e) = cgroup::remove(cg).await {
            warn!(log(), "removing the cgroup failed"; "container" => id, "error" => %e);
        }
        match fs::remove_dir_all(Path::new(container::STATE_ROOT).join(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(log(), "removing libcontainer's state failed"; "container" => id, "error" => %e)
            }
            _ => {}
        }
        if let Err(e) = self.remove_files(dir) {
            warn!(log(), "removing the container's files failed"; "container" => id, "error" => %e);
        }
        // virtiofsd keeps an fd for every inode the guest still caches, and the host
        // cannot unmount the container's rootfs under the share until they are forgotten.
        if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "2") {
            debug!(log(), "dropping dentry and inode caches failed"; "error" => %e);
        }
    }

    async fn set_sysctls(
        &self,
        sysctls: Vec<(String, String)>,
        ipc_of: Option<i32>,
    ) -> Result<(), RuntimeError> {
        let Some(pid) = ipc_of else {
            return sysctls
                .iter()
                .try_for_each(|(name, value)| write_sysctl(name, value));
        };
        let ns = PathBuf::from(format!("/proc/{pid}/ns/ipc"));
        // setns changes the calling thread only: a thread of its own, never a runtime thread.
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let set = || {
                let file =
                    fs::File::open(&ns).map_err(internal("opening the pod's IPC namespace"))?;
                setns(&file, CloneFlags::CLONE_NEWIPC)
                    .map_err(internal("joining the pod's IPC namespace"))?;
                sysctls
                    .iter()
                    .try_for_each(|(name, value)| write_sysctl(name, value))
            };
            let _ = tx.send(set());
        });
        rx.await.map_err(internal("the sysctl thread"))?
    }
}

fn write_sysctl(name: &str, value: &str) -> Result<(), RuntimeError> {
    let file = Path::new("/proc/sys").join(name.replace('.', "/"));
    fs::write(&file, value)
        .map_err(|e| RuntimeError::InvalidArgument(format!("sysctl {name:?} = {value:?}: {e}")))
}
