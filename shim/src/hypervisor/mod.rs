//! The hypervisor layer: one trait, one driver per VMM.
//!
//! A sandbox builds a [`VmSpec`] (what the VM is made of) and hands it to a driver, which
//! launches the VMM with its device back-ends, boots the guest and supervises the VMM
//! process until [`Hypervisor::stop`]. The agent link is the same for every driver: a
//! hybrid-vsock Unix socket ([`VsockDevice::socket`]) with the `CONNECT <port>` handshake.
//!
//! Drivers: [`qemu`] (microvm, virtio-mmio, vhost-user back-ends; KVM or TCG) and [`clh`]
//! (Cloud Hypervisor over its REST API; the production backend on KVM hosts).
use std::{path::PathBuf, time::Duration};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod clh;
pub mod qemu;
pub mod tap;

/// Which VMM drives a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// Cloud Hypervisor.
    Clh,
    Qemu,
}

/// Everything a driver needs to start a sandbox's VM. Paths are on the host.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The sandbox id (used in log lines and process names).
    pub id: String,
    /// The sandbox's private directory: every socket, log and pid file of the VM lives here.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Guest kernel arguments added to the driver's own (console, panic, timers).
    pub kernel_args: Vec<String>,
    pub vcpus: u32,
    /// Upper bound for CPU hot-plug (Update); equal to `vcpus` when the driver cannot hot-plug.
    pub max_vcpus: u32,
    pub memory_mib: u64,
    /// The virtio-fs share, when the sandbox has one.
    pub share: Option<ShareDevice>,
    pub vsock: VsockDevice,
    pub nets: Vec<NetDevice>,
    /// Where the guest's serial console output goes.
    pub console_log: PathBuf,
}

/// A directory exported to the guest through virtiofsd. The driver launches virtiofsd
/// (with [`crate::sharefs::Virtiofsd`]) in `prepare` and stops it with the VM.
#[derive(Debug, Clone)]
pub struct ShareDevice {
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    /// The host directory exported (see [`crate::sharefs`] for how it is prepared).
    pub shared_dir: PathBuf,
    /// The virtiofsd vhost-user socket to create.
    pub socket: PathBuf,
    pub virtiofsd: PathBuf,
    /// virtiofsd `--cache` mode: never, auto or always.
    pub cache: String,
}

/// The guest's vsock device, exposed on the host as a hybrid-vsock Unix socket.
#[derive(Debug, Clone)]
pub struct VsockDevice {
    pub cid: u32,
    /// Host→guest: connect here and send `CONNECT <port>\n`. Guest→host connections to
    /// port P arrive on a Unix socket at `<socket>_<P>`.
    pub socket: PathBuf,
}

/// A guest NIC backed by a tap device in the pod's network namespace.
#[derive(Debug, Clone)]
pub struct NetDevice {
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
    /// The network namespace the tap lives in (the VMM opens the tap there), if not the host's.
    pub netns: Option<PathBuf>,
}

/// How the guest's CPUs are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    /// Software emulation (QEMU TCG), for hosts whose KVM cannot run an ordinary guest.
    Tcg,
}

/// What a driver can do beyond booting a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub accel: Accel,
    pub cpu_hotplug: bool,
    pub memory_hotplug: bool,
    pub fs_sharing: bool,
}

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code or 128 + signal, when it could be collected.
    pub status: Option<i32>,
    /// A short explanation: the VMM's last error line, or "stopped" after [`Hypervisor::stop`].
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{what} not found at {path}")]
    Missing { what: &'static str, path: PathBuf },
    #[error("failed to launch {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {timeout:?}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Timeout {
        what: String,
        timeout: Duration,
        detail: Option<String>,
    },
    #[error("{what} exited during start-up ({status:?}): {detail}")]
    Died {
        what: &'static str,
        status: Option<i32>,
        detail: String,
    },
    /// An API call to the VMM failed; `body` is the VMM's own error text.
    #[error("{call} failed with {status}: {body}")]
    Api {
        call: String,
        status: u16,
        body: String,
    },
    #[error("{0} is not supported by this hypervisor")]
    Unsupported(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

/// One VMM instance. Implementations keep their own state; every method that crosses into
/// the VMM has a timeout, and [`Hypervisor::stop`] is idempotent ("already gone" is success).
#[async_trait]
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> HypervisorKind;
    fn capabilities(&self) -> Capabilities;

    /// Checks the spec against what this driver and host can do, and creates what must
    /// exist before the VMM starts (device back-end daemons, sockets). Nothing is booted.
    async fn prepare(&mut self, spec: &VmSpec) -> Result<()>;

    /// Launches the VMM and boots the guest. Returns once the VMM reports the guest
    /// running (the agent is not necessarily up yet). On error everything `prepare` and
    /// `start` created is torn down again.
    async fn start(&mut self) -> Result<()>;

    /// Resolves when the VMM process has exited (for any reason). Can be called many times.
    async fn wait_exit(&self) -> VmExit;

    /// Stops the VM: a graceful VMM shutdown bounded by `grace`, then SIGKILL; then the
    /// device back-ends. Idempotent.
    async fn stop(&mut self, grace: Duration) -> Result<()>;

    /// Host pid of the VMM process while it runs.
    fn pid(&self) -> Option<u32>;

    /// Host pids of every process this driver runs for the VM (VMM and back-ends), for
    /// accounting and leak checks.
    fn pids(&self) -> Vec<u32>;

    /// Resizes the VM (CPU and memory hot-plug), where [`Capabilities`] allow it.
    async fn resize(&mut self, vcpus: Option<u32>, memory_mib: Option<u64>) -> Result<()>;
}
