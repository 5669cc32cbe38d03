//! What a pod's containers share in the guest beyond its network: the PID, IPC and UTS
//! namespaces held by the pod's pause process (started on first use), and the pod's
//! sysctls.
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use slog::info;

use super::{helper_err, internal, RuntimeError};
use crate::{
    container::{
        self,
        guest_spec::{sysctl_scope, SysctlScope},
    },
    logger::log,
};

#[derive(Default)]
pub struct Pod {
    pause: tokio::sync::Mutex<Option<i32>>,
}

impl Pod {
    /// The pid of the pod's pause process, starting it if it is not there yet.
    pub async fn pause(&self) -> Result<i32, RuntimeError> {
        let mut pause = self.pause.lock().await;
        if let Some(pid) = *pause {
            return Ok(pid);
        }
        let pid = container::pause::start()
            .await
            .map_err(helper_err("starting the pod's pause process".into()))?;
        info!(log(), "the pod's PID, IPC and UTS namespaces are up"; "pause_pid" => pid);
        *pause = Some(pid);
        Ok(pid)
    }

    /// Sets the pod's sysctls: network ones in the guest's network namespace (the pod's),
    /// IPC ones in the pod's IPC namespace. Checked first, so a bad one changes nothing.
    pub async fn set_sysctls(&self, sysctls: &[(String, String)]) -> Result<(), RuntimeError> {
        let scopes = sysctls
            .iter()
            .map(|(name, value)| sysctl_scope(name, value))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ipc = Vec::new();
        for ((name, value), scope) in sysctls.iter().zip(scopes) {
            match scope {
                SysctlScope::Network => set_sysctl(name, value)?,
                SysctlScope::Ipc => ipc.push((name.clone(), value.clone())),
            }
        }
        if ipc.is_empty() {
            return Ok(());
        }
        let ns = PathBuf::from(format!("/proc/{}/ns/ipc", self.pause().await?));
        // setns changes the calling thread only: a thread of its own, never a runtime thread.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let set = || {
                let file = std::fs::File::open(&ns)
                    .map_err(internal("opening the pod's IPC namespace"))?;
                setns(&file, CloneFlags::CLONE_NEWIPC)
                    .map_err(internal("joining the pod's IPC namespace"))?;
                ipc.iter()
                    .try_for_each(|(name, value)| set_sysctl(name, value))
            };
            let _ = tx.send(set());
        });
        rx.await.map_err(internal("the sysctl thread"))?
    }
}

/// Writes network sysctls (checked by `guest_spec`) in the agent's network namespace: the
/// guest's, where every container of the pod runs.
pub fn set_net_sysctls(sysctls: &[(String, String)]) -> Result<(), RuntimeError> {
    sysctls
        .iter()
        .try_for_each(|(name, value)| set_sysctl(name, value))
}

fn set_sysctl(name: &str, value: &str) -> Result<(), RuntimeError> {
    let file = Path::new("/proc/sys").join(name.replace('.', "/"));
    std::fs::write(&file, value)
        .map_err(|e| RuntimeError::InvalidArgument(format!("sysctl {name:?} = {value:?}: {e}")))
}
