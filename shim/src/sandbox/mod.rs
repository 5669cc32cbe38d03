//! One sandbox = one microVM and every host resource that exists because of it: the pod
//! cgroup the shim joins, the taps in the pod's network namespace, the shared directory and
//! its mounts, virtiofsd, the VMM and its back-ends, sockets and logs in the sandbox
//! directory. Used by the pod layer, `shoji vm run` and the tests.
//!
//! Boot ([`boot`]): directory and ledger → pod cgroup → taps → shared directory → ready
//! listener → virtiofsd + driver prepare → VMM start → the agent announces itself → dial the
//! agent → pod network configured in the guest → port-forward listener in the pod netns.
//! Every resource on the host is recorded in the ledger ([`state`]) before it is made (the
//! port-forward's listener and rule are not: they go with the shim and the pod netns); any
//! failure undoes what was made ([`cleanup`]).
//! Containers: [`container`] (mounts → CreateContainer → stdio → start → wait → remove).
//! Stop: port-forward → VMM → virtiofsd → the same undo as a failed boot (nothing in the
//! guest is cleaned up piece by piece: the VM goes whole).
mod boot;
mod cleanup;
mod console;
mod container;
pub mod logs;
mod lookup;
mod oom;
pub mod pin;
mod sizing;
mod spec;
mod state;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use slog::{info, warn, Logger};
use tokio::sync::watch;

use self::state::Ledger;
pub use self::{
    cleanup::{cleanup, CleanupError},
    console::CONSOLE_MAX,
    container::{ContainerRequest, ExecRequest, Mount},
    lookup::{unique_prefix, Place},
    state::{BootRecord, LogRetention, RecordedPid, SandboxInfo, State, STATE_FILE},
};
use crate::{
    agent_client::{AgentClient, AgentError},
    config::Config,
    daemon::DaemonError,
    host_cgroup::{CgroupError, Previous},
    hypervisor::{self, Hypervisor, HypervisorError, VmExit},
    network::NetworkError,
    port_forward::PortForward,
    sharefs::{MountError, SharedDir, Virtiofsd},
};

/// The virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "shoji";

/// The hybrid-vsock socket that reaches the guest's agent, in the VMM directory of the
/// sandbox directory `dir` (the vsock back-end, or CH, creates it).
pub fn agent_socket(dir: &std::path::Path) -> std::path::PathBuf {
    crate::hypervisor::vmm_dir(dir).join("vsock.sock")
}

/// What one sandbox is made of.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Sandbox id: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 64 bytes (see [`validate_id`]).
    pub id: String,
    /// Runtime settings (paths, timeouts, hypervisor); `config.run_dir` is the base directory.
    pub config: Config,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Kernel arguments for this sandbox, after the configured ones.
    pub kernel_args: Vec<String>,
    /// Guest hostname (default: the first 12 characters of the id).
    pub hostname: Option<String>,
    /// The pod's network namespace (CNI made it): each of its interfaces gets a tap.
    pub netns: Option<PathBuf>,
    /// The pod's host cgroup (cgroupfs path), joined by the shim before the VM's processes
    /// are launched so they are born in it.
    pub cgroup: Option<String>,
    /// The pod's sysctls (name, value), set by the agent (which checks them).
    pub sysctls: Vec<(String, String)>,
    /// The pod's namespace and name, when the spec says (recorded for `shoji ps`).
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

impl SandboxConfig {
    /// A sandbox with the configured default size, no network and no host cgroup.
    pub fn new(id: &str, config: Config) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            vcpus: config.default_vcpus,
            memory_mib: config.default_memory_mib,
            config,
            kernel_args: Vec::new(),
            hostname: None,
            netns: None,
            cgroup: None,
            sysctls: Vec::new(),
            pod_namespace: None,
            pod_name: None,
        }
    }

    /// `<run dir>/<id>`.
    pub fn dir(&self) -> PathBuf {
        self.config.run_dir.join(&self.id)
    }
}

/// An id that could escape its directory or split a header.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what} {id:?}: {why}")]
pub struct IdError {
    what: &'static str,
    id: String,
    why: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The request names something that cannot be (a missing volume source, a bad hostname).
    #[error("{0}")]
    Invalid(String),
    #[error("{what} not found at {path}")]
    Missing { what: &'static str, path: PathBuf },
    #[error("sandbox {id} already exists at {dir} (a stale sandbox is removed with `containerd-shim-shoji-v2 delete` or `shoji cleanup`)")]
    Exists { id: String, dir: PathBuf },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Uid(#[from] crate::jail::uids::UidError),
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the guest agent did not announce itself within {timeout:?}; last console lines:\n{console}")]
    NotReady { timeout: Duration, console: String },
    #[error("the VM ended before its agent was ready ({}); last console lines:\n{console}", exit.reason)]
    VmExited { exit: VmExit, console: String },
    #[error("{rootfs} is not usable as a rootfs: {why}")]
    BadRootfs { rootfs: String, why: String },
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
}

impl SandboxError {
    /// The agent answered NOT_FOUND (an unknown container or process).
    pub fn is_not_found(&self) -> bool {
        matches!(self, SandboxError::Agent(e) if e.is_not_found())
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// How long each start-up phase took, measured from the start of [`Sandbox::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimes {
    /// Host resources (cgroup, taps, shared directory) and device back-ends ready.
    pub daemons_ready: Duration,
    /// The VMM reports the guest running.
    pub vmm_running: Duration,
    /// The agent announced itself (the ttrpc connection follows).
    pub agent_ready: Duration,
}

/// A running sandbox VM. All methods take `&self`: share it behind an `Arc`.
pub struct Sandbox {
    dir: PathBuf,
    log: Logger,
    shutdown_grace: Duration,
    agent: AgentClient,
    ledger: Arc<Ledger>,
    shared: SharedDir,
    virtiofsd: Virtiofsd,
    /// Taken by the first [`Sandbox::stop`]; the lock serializes concurrent stops.
    vm: tokio::sync::Mutex<Option<Box<dyn Hypervisor>>>,
    /// Where the shim was before it joined the pod cgroup.
    cgroup_previous: Mutex<Option<Previous>>,
    vmm_pid: u32,
    /// The VM's end: the VMM, a device back-end or virtiofsd exited, or stop ran.
    end: watch::Receiver<Option<VmExit>>,
    boot_times: BootTimes,
    sizing: sizing::Sizing,
    /// The pod's OOM priority on the host, from its containers' specs.
    oom: oom::OomPriority,
    /// `kubectl port-forward` into the VM, for a pod with a network (see [`crate::port_forward`]).
    port_forward: Option<PortForward>,
    /// The kernel and initramfs it booted from, kept from an upgrade's pruning (see [`pin`]).
    _boot_images: pin::BootImages,
}

impl Sandbox {
    /// Boots the sandbox's VM and connects to its agent. On error nothing is left behind.
    pub async fn start(cfg: SandboxConfig, log: Logger) -> Result<Sandbox> {
        boot::boot(cfg, log).await
    }

    /// The sandbox's host directory (`<run dir>/<id>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn boot_times(&self) -> BootTimes {
        self.boot_times
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Host pids of the VM's processes (VMM, back-ends, virtiofsd) that still run.
    pub fn pids(&self) -> Vec<u32> {
        self.ledger.live_pids()
    }

    /// The VMM's host pid (what containerd sees as the task's pid); it stays the answer
    /// after the VM is gone, so it is read without any lock.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm_pid
    }

    /// Resolves when the VM has ended: guest power-off, a crash, the death of a process it
    /// cannot live without, or [`Sandbox::stop`].
    pub async fn wait_exit(&self) -> VmExit {
        hypervisor::wait_exit(self.end.clone()).await
    }

    /// Stops everything: port-forward → VMM → virtiofsd → mounts → taps → pod cgroup → the
    /// sandbox directory. Idempotent; whatever is already gone counts as done.
    pub async fn stop(&self) -> Result<()> {
        let mut vm = self.vm.lock().await;
        let Some(mut driver) = vm.take() else {
            return Ok(());
        };
        // Forwarded connections are reset now rather than broken by the VM's end.
        if let Some(pf) = &self.port_forward {
            pf.stop().await;
        }
        // Nothing in the guest is cleaned up piece by piece: the VM goes whole. Writes of the
        // containers reached the host already (virtio-fs is write-through).
        let began = Instant::now();
        let stopped = driver.stop(self.shutdown_grace).await;
        let vmm = began.elapsed();
        self.virtiofsd.stop(Duration::from_secs(1)).await;
        let virtiofsd = began.elapsed();
        self.release().await?;
        stopped?;
        info!(self.log, "sandbox stopped"; "vmm_stopped_ms" => vmm.as_millis() as u64,
            "virtiofsd_stopped_ms" => virtiofsd.as_millis() as u64,
            "released_ms" => began.elapsed().as_millis() as u64);
        Ok(())
    }

    /// The shim leaves the pod cgroup, then every host resource is removed.
    async fn release(&self) -> Result<()> {
        self.shared.close();
        if let Err(e) = self.shared.unmount_all() {
            warn!(self.log, "unmounting the shared directory failed"; "error" => %e);
        }
        let state = self.ledger.snapshot();
        if let (Some(cg), Some(previous)) =
            (&state.cgroup, self.cgroup_previous.lock().unwrap().take())
        {
            cg.leave(std::process::id(), &previous);
        }
        cleanup::release(&self.dir, &state, &self.log).await?;
        Ok(())
    }
}

/// A sandbox dropped without [`Sandbox::stop`] (a panic, an early return) still releases
/// what it can synchronously: its daemons are killed as their handles drop and its mounts
/// are detached. `stop` (or `shoji cleanup`) is the complete way.
impl Drop for Sandbox {
    fn drop(&mut self) {
        let Ok(mut vm) = self.vm.try_lock() else {
            return;
        };
        if vm.take().is_some() {
            warn!(self.log, "sandbox dropped without stop(), cleaning up");
            self.shared.close();
            let _ = self.shared.unmount_all();
        }
    }
}

/// Ids name directories on the host and in the guest and travel in stream headers: a
/// conservative alphabet keeps them from escaping a directory or splitting a header.
pub fn validate_id(what: &'static str, id: &str) -> Result<(), IdError> {
    let bad = |why| {
        Err(IdError {
            what,
            id: id.chars().take(80).collect(),
            why,
        })
    };
    if id.is_empty() || id.len() > 64 {
        return bad("must be 1 to 64 bytes long");
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("must start with a letter or digit");
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return bad("may contain only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for good in ["a", "abc-123_x.y", &"a".repeat(64)] {
            validate_id("id", good).unwrap();
        }
        for bad in ["", "-a", ".", "..", "a/b", "a b", "a\n", &"a".repeat(65)] {
            assert!(validate_id("id", bad).is_err(), "{bad:?} accepted");
        }
    }
}
