//! `pause`: makes the pod's PID, IPC and UTS namespaces and leaves their first process
//! running, as the pause container holds a pod's namespaces under runc.
//!
//! The helper unshares, forks the namespaces' PID 1, writes its pid and exits; the child is
//! reparented to the agent and, as PID 1 of the pod's PID namespace, reaps the orphans of
//! the pod until the VM goes.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    sched::{unshare, CloneFlags},
    sys::{
        signal::{SigSet, Signal},
        wait::{waitpid, WaitPidFlag},
    },
    unistd::{fork, ForkResult},
};
use serde::{Deserialize, Serialize};

use super::{read_pid_file, run_helper, HelperError};
use crate::reaper::Reaper;

pub const VERB: &str = "pause";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
pub struct Request {
    pid_file: PathBuf,
}

pub(super) fn run(req: Request) -> Result<(), String> {
    let flags = CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWPID;
    unshare(flags).map_err(|e| format!("unshare: {e}"))?;
    // SAFETY: the helper is single-threaded; the child only blocks signals, waits and reaps.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Parent { child } => std::fs::write(&req.pid_file, child.to_string())
            .map_err(|e| format!("writing {}: {e}", req.pid_file.display())),
        ForkResult::Child => {
            let mut chld = SigSet::empty();
            chld.add(Signal::SIGCHLD);
            let _ = chld.thread_block();
            loop {
                let _ = chld.wait();
                while matches!(waitpid(None, Some(WaitPidFlag::WNOHANG)), Ok(s) if s.pid().is_some())
                {
                }
            }
        }
    }
}

/// Starts the pod's pause process (helper files in `dir`); returns its pid.
pub async fn start(reaper: &Reaper, dir: &Path) -> Result<i32, HelperError> {
    let pid_file = dir.join("pause.pid");
    let request = Request {
        pid_file: pid_file.clone(),
    };
    run_helper(reaper, VERB, dir, &request, &[], TIMEOUT).await?;
    read_pid_file(VERB, &pid_file)
}
