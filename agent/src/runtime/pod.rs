//! What a pod's containers share in the guest beyond its network: the PID, IPC and UTS
//! namespaces held by the pod's pause process (started on first use), and the pod's
//! sysctls (ConfigureNetwork).
use std::sync::Arc;

use slog::{info, warn};

use super::{helper_err, GuestOs, Runtime, RuntimeError};
use crate::{
    container::guest_spec::{sysctl_scope, SysctlScope},
    logger::log,
};

#[derive(Default)]
pub struct Pod {
    pause: tokio::sync::Mutex<Option<i32>>,
}

impl Pod {
    /// The pid of the pod's pause process, starting it if it is not there yet.
    pub async fn pause(&self, os: &dyn GuestOs) -> Result<i32, RuntimeError> {
        let mut pause = self.pause.lock().await;
        if let Some(pid) = *pause {
            return Ok(pid);
        }
        let pid = os
            .start_pause()
            .await
            .map_err(helper_err("starting the pod's pause process".into()))?;
        info!(log(), "the pod's PID, IPC and UTS namespaces are up"; "pause_pid" => pid);
        *pause = Some(pid);
        Ok(pid)
    }
}

impl Runtime {
    /// Starts the pod's pause process in the background, so the first container need not
    /// wait for it (it waits only if the pause is still starting).
    pub fn prepare_pod(self: &Arc<Self>) {
        let runtime = self.clone();
        tokio::spawn(async move {
            if let Err(e) = runtime.pod.pause(runtime.os.as_ref()).await {
                warn!(log(), "starting the pod's pause process failed"; "error" => %e);
            }
        });
    }

    /// Sets the pod's sysctls: network ones in the guest's network namespace (the pod's),
    /// IPC ones in the pod's IPC namespace. Checked first, so a bad one changes nothing.
    pub async fn set_pod_sysctls(&self, sysctls: &[(String, String)]) -> Result<(), RuntimeError> {
        let scopes = sysctls
            .iter()
            .map(|(name, value)| sysctl_scope(name, value))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut net, mut ipc) = (Vec::new(), Vec::new());
        for (sysctl, scope) in sysctls.iter().cloned().zip(scopes) {
            match scope {
                SysctlScope::Network => net.push(sysctl),
                SysctlScope::Ipc => ipc.push(sysctl),
            }
        }
        if !net.is_empty() {
            self.os.set_sysctls(net, None).await?;
        }
        if !ipc.is_empty() {
            let pause = self.pod.pause(self.os.as_ref()).await?;
            self.os.set_sysctls(ipc, Some(pause)).await?;
        }
        Ok(())
    }
}
