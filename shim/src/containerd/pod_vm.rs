//! The real [`PodVm`]: a [`Sandbox`], booted by [`SandboxLauncher`]. The bootstrap's
//! adapter, the one place that names both the pod and the sandbox layer.
use std::sync::Arc;

use async_trait::async_trait;
use shoji_agent_api::{stream::StreamKind, types::ContainerStatsResponse};
use slog::Logger;
use tokio::net::UnixStream;

use crate::{
    hypervisor::VmExit,
    pod::{Exit, PodVm, VmLauncher},
    sandbox::{ContainerRequest, ExecRequest, Result, Sandbox, SandboxConfig},
};

/// Boots real sandboxes.
pub struct SandboxLauncher {
    pub log: Logger,
}

#[async_trait]
impl VmLauncher for SandboxLauncher {
    async fn boot(&self, cfg: SandboxConfig) -> Result<Arc<dyn PodVm>> {
        Ok(Arc::new(Sandbox::start(cfg, self.log.clone()).await?))
    }
}

#[async_trait]
impl PodVm for Sandbox {
    fn pid(&self) -> u32 {
        self.vmm_pid()
    }

    async fn create_container(&self, req: ContainerRequest) -> Result<()> {
        Sandbox::create_container(self, req).await
    }

    async fn exec_process(&self, req: ExecRequest) -> Result<()> {
        Sandbox::exec_process(self, req).await
    }

    async fn attach_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        kinds: &[StreamKind],
    ) -> Result<Vec<(StreamKind, UnixStream)>> {
        Sandbox::attach_stdio(self, container_id, exec_id, kinds).await
    }

    async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        Sandbox::start_process(self, container_id, exec_id).await
    }

    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<Exit> {
        let w = Sandbox::wait_process(self, container_id, exec_id).await?;
        Ok(guest_exit(
            w.exit_status,
            w.exited_at_secs,
            w.exited_at_nanos,
        ))
    }

    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        Ok(self
            .agent()
            .signal_process(container_id, exec_id, signal, all)
            .await?)
    }

    async fn resize_tty(&self, container_id: &str, exec_id: &str, w: u32, h: u32) -> Result<()> {
        Ok(self.agent().resize_tty(container_id, exec_id, w, h).await?)
    }

    async fn remove_container(&self, container_id: &str) -> Result<()> {
        Sandbox::remove_container(self, container_id).await
    }

    async fn set_paused(&self, container_id: &str, paused: bool) -> Result<()> {
        let agent = self.agent();
        if paused {
            agent.pause_container(container_id).await?;
        } else {
            agent.resume_container(container_id).await?;
        }
        Ok(())
    }

    async fn update_container(&self, container_id: &str, resources_json: Vec<u8>) -> Result<()> {
        Sandbox::update_container(self, container_id, resources_json).await
    }

    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        Ok(self.agent().list_processes(container_id).await?)
    }

    async fn container_stats(&self, container_id: &str) -> Result<ContainerStatsResponse> {
        Ok(self.agent().container_stats(container_id).await?)
    }

    async fn next_oom(&self) -> Result<String> {
        Ok(self.agent().wait_oom_event().await?)
    }

    async fn wait_exit(&self) -> VmExit {
        Sandbox::wait_exit(self).await
    }

    async fn stop(&self) -> Result<()> {
        Sandbox::stop(self).await
    }
}

/// An exit as the guest reports it, bounded: a process's status is 0..=255 (an exit code,
/// or 128 + a signal); anything else from a broken or hostile agent reads as 255.
fn guest_exit(status: i32, secs: i64, nanos: u32) -> Exit {
    Exit {
        status: u32::try_from(status)
            .ok()
            .filter(|s| *s <= 255)
            .unwrap_or(255),
        at_secs: secs,
        at_nanos: nanos.min(999_999_999),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn guest_exits_are_bounded() {
        assert_eq!(super::guest_exit(3, 1, 2).status, 3);
        assert_eq!(super::guest_exit(137, 1, 2).status, 137);
        for bogus in [-1, 256, i32::MAX, i32::MIN] {
            assert_eq!(super::guest_exit(bogus, 1, 2).status, 255, "{bogus}");
        }
        assert_eq!(super::guest_exit(0, 1, u32::MAX).at_nanos, 999_999_999);
    }
}
