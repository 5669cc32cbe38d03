//! The pod layer's view of its VM: the agent calls it makes and the VM's lifetime, behind a
//! trait. The real implementation is the sandbox (containerd/pod_vm.rs, where the bootstrap
//! joins the two layers); the pod's unit tests use an in-process fake, so containerd
//! semantics are tested without root or VMs.
use std::sync::Arc;

use async_trait::async_trait;
use shoji_agent_api::{stream::StreamKind, types::ContainerStatsResponse};
use tokio::net::UnixStream;

use super::process::Exit;
use crate::{
    hypervisor::VmExit,
    sandbox::{ContainerRequest, ExecRequest, Result, SandboxConfig},
};

/// A running pod VM.
#[async_trait]
pub trait PodVm: Send + Sync {
    /// The VMM's host pid: containerd's task pid for every container of the pod.
    fn pid(&self) -> u32;
    async fn create_container(&self, req: ContainerRequest) -> Result<()>;
    async fn exec_process(&self, req: ExecRequest) -> Result<()>;
    async fn attach_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        kinds: &[StreamKind],
    ) -> Result<Vec<(StreamKind, UnixStream)>>;
    /// Returns the guest pid.
    async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<u32>;
    /// Resolves once the process exited and its output was drained in the guest.
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<Exit>;
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()>;
    async fn resize_tty(&self, container_id: &str, exec_id: &str, w: u32, h: u32) -> Result<()>;
    /// Removes the container in the guest and its host mounts.
    async fn remove_container(&self, container_id: &str) -> Result<()>;
    async fn set_paused(&self, container_id: &str, paused: bool) -> Result<()>;
    /// `resources_json`: an OCI LinuxResources document.
    async fn update_container(&self, container_id: &str, resources_json: Vec<u8>) -> Result<()>;
    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>>;
    async fn container_stats(&self, container_id: &str) -> Result<ContainerStatsResponse>;
    /// The next container OOM kill the guest reports (its container id, unchecked).
    async fn next_oom(&self) -> Result<String>;
    /// Resolves when the VM has ended, for whatever reason.
    async fn wait_exit(&self) -> VmExit;
    /// Stops the VM and removes every host resource of it. Idempotent.
    async fn stop(&self) -> Result<()>;
}

/// Boots pod VMs.
#[async_trait]
pub trait VmLauncher: Send + Sync {
    async fn boot(&self, cfg: SandboxConfig) -> Result<Arc<dyn PodVm>>;
}
