//! Entering a network namespace: for a closure on a thread of its own, or for a child
//! process at exec.
use std::path::Path;

/// Makes `cmd` start inside the network namespace `file` (Cloud Hypervisor, which looks its
/// taps up by name for MTU and offload settings, when it is not jailed).
pub fn enter_on_exec(cmd: &mut std::process::Command, file: std::fs::File) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only setns(2), async-signal-safe, runs between fork and exec; `file` stays
    // open in the parent until the command is spawned (it is moved into the closure).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `f` on a short-lived thread of its own inside the network namespace `netns` (`None`:
/// the host's). `setns` changes the calling thread's namespace, which must never leak into
/// tokio's threads; sockets and devices `f` opens stay bound to `netns` for their whole life.
pub async fn in_netns<T, F>(netns: Option<&Path>, f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    use nix::sched::{setns, CloneFlags};
    let netns = netns.map(Path::to_path_buf);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let entered = match &netns {
                Some(ns) => std::fs::File::open(ns).and_then(|file| {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                }),
                None => Ok(()),
            };
            let _ = tx.send(entered.and_then(|()| f()));
        })?;
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
}
