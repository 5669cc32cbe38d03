//! SignalProcess (containerd's Kill): a signal to the init, to an exec, or with `all` to
//! every process of the container. A process that is gone is NOT_FOUND, as runc answers.
use nix::sys::signal::Signal;
use shoji_agent_api::DEBUG_CONSOLE_CONTAINER;

use super::{internal, Runtime, RuntimeError};
use crate::container::kill::KillError;

impl Runtime {
    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), RuntimeError> {
        if id == DEBUG_CONSOLE_CONTAINER {
            return self.consoles.signal(exec_id, signal);
        }
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let sig = Signal::try_from(signal as i32).map_err(|_| {
            RuntimeError::InvalidArgument(format!("{signal} is not a signal number"))
        })?;
        if all || exec_id.is_empty() {
            if !all && c.init.exited().is_some() {
                return Err(RuntimeError::NotFound(format!(
                    "container {id:?}: process already exited"
                )));
            }
            let killed = match (all, c.init.pid()) {
                (true, _) => self.os.signal_all(&c.cgroup, sig).await,
                (false, Some(pid)) => self.os.signal(pid, sig),
                (false, None) => Err(KillError::Gone),
            };
            // The init may exit between the check above and the kill: that is the
            // "already exited" answer, not an internal error.
            let gone = || {
                c.init.exited().is_some() || c.init.pid().is_some_and(|pid| !self.os.exists(pid))
            };
            return match killed {
                Err(_) if gone() => Err(RuntimeError::NotFound(format!(
                    "container {id:?}: process already exited"
                ))),
                r => r.map_err(internal(&format!("signalling container {id:?}"))),
            };
        }
        let pid = match (p.pid(), p.exited()) {
            (_, Some(_)) => {
                return Err(RuntimeError::NotFound(format!(
                    "process {id:?}/{exec_id:?} already exited"
                )))
            }
            (None, None) => {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "process {id:?}/{exec_id:?} was not started"
                )))
            }
            (Some(pid), None) => pid,
        };
        match self.os.signal(pid, sig) {
            Err(KillError::Gone) => Err(RuntimeError::NotFound(format!(
                "process {id:?}/{exec_id:?} already exited"
            ))),
            r => r.map_err(internal("kill")),
        }
    }
}
