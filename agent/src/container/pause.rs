//! `pause`: makes the pod's PID, IPC and UTS namespaces and leaves their first process
//! running, as the pause container holds a pod's namespaces under runc.
//!
//! A thread of its own unshares the three namespaces and spawns `shoji-agent helper pause`
//! (posix_spawn, no fork of the agent), which is thereby PID 1 of the pod's PID namespace and
//! reaps the orphans of the pod until the VM goes. The namespaces exist once the spawn
//! returns: no helper runs and exits first, and no pid file is read (under emulation that
//! round was ~100 ms of every pod's start).
use nix::{
    sched::{unshare, CloneFlags},
    sys::{
        signal::{SigSet, Signal},
        wait::{waitpid, WaitPidFlag},
    },
};

use super::{agent_command, HelperError, HELPER_ARG};

pub const VERB: &str = "pause";

/// The pause process's life (`shoji-agent helper pause`): waits for SIGCHLD and reaps.
pub(super) fn hold() -> ! {
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = chld.thread_block();
    loop {
        let _ = chld.wait();
        while matches!(waitpid(None, Some(WaitPidFlag::WNOHANG)), Ok(s) if s.pid().is_some()) {}
    }
}

/// Starts the pod's pause process; returns its pid. Its exit, should it ever come, is
/// collected by the agent's reaper like any child's.
pub async fn start() -> Result<i32, HelperError> {
    let spawn_failed = |source| HelperError::Spawn { verb: VERB, source };
    // unshare(2) moves the calling thread alone into the new IPC and UTS namespaces (and
    // makes its next child PID 1 of a new PID namespace): a thread that ends right after,
    // never a runtime thread.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let flags = CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWPID;
        let spawned = unshare(flags)
            .map_err(std::io::Error::from)
            .and_then(|()| agent_command(&[HELPER_ARG, VERB]).spawn());
        let _ = tx.send(spawned.map(|child| child.id() as i32));
    });
    rx.await
        .map_err(|_| spawn_failed(std::io::Error::other("the spawning thread died")))?
        .map_err(spawn_failed)
}
