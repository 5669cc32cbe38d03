//! The hypervisor layer: one trait, one driver per VMM, one constructor.
//!
//! A sandbox builds a [`VmSpec`] (what the VM is made of) and hands it to a driver made by
//! [`new`], which launches the VMM with the device back-ends it owns, boots the guest, and
//! publishes the VM's end on [`Hypervisor::exit_watch`] until [`Hypervisor::stop`]. The
//! virtio-fs back-end (virtiofsd) is the sandbox's, not the driver's: the spec only names
//! its socket. The agent link is the same for every driver: a hybrid-vsock Unix socket
//! ([`VsockDevice::socket`]) with the `CONNECT <port>` handshake.
//!
//! Drivers: [`qemu`] (microvm, virtio-mmio, vhost-user back-ends; KVM or TCG) and [`clh`]
//! (Cloud Hypervisor over its REST API; the production backend on KVM hosts). [`choice`]
//! picks one for `hypervisor = "auto"`.
use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use slog::Logger;
use tokio::sync::watch;

use crate::{
    daemon::{DaemonError, ExitWatch, PidLedger},
    jail::{Identity, Jail, JailError},
    network::{NetDevice, NetworkError},
};

pub mod choice;
pub mod clh;
pub mod qemu;

/// Which VMM drives a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// Cloud Hypervisor.
    Clh,
    Qemu,
}

impl std::fmt::Display for HypervisorKind {
    /// The configuration's name for it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HypervisorKind::Clh => "clh",
            HypervisorKind::Qemu => "qemu",
        })
    }
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
    /// The guest returns memory it freed to the host (see
    /// [`crate::config::Config::free_page_reporting`]).
    pub free_page_reporting: bool,
    /// The virtio-fs share, when the sandbox has one.
    pub share: Option<ShareDevice>,
    pub vsock: VsockDevice,
    pub nets: Vec<NetDevice>,
    /// Where the guest's serial console output goes.
    pub console_log: PathBuf,
    /// Who the VMM and its back-ends run as, jailed; `None`: as the shim (jail off).
    pub jail: Option<Identity>,
}

impl VmSpec {
    /// The jail of a process that serves this VM (`binary`), holding what every one needs:
    /// its binary and the VMM directory. `None` when jailing is off.
    fn jail(&self, binary: &Path) -> Option<Jail> {
        let id = self.jail?;
        Some(
            Jail::new(id, &self.dir.join(JAIL_ROOT))
                .read_only(binary)
                .owned_dir(&vmm_dir(&self.dir)),
        )
    }
}

impl VmSpec {
    /// The VMM's jail: the boot images, its console, /dev/kvm when it uses KVM and the
    /// virtio-fs back-end's socket (made the jail's uid's to connect to).
    fn vmm_jail(&self, binary: &Path, kvm: bool) -> Result<Option<Jail>> {
        let (Some(id), Some(jail)) = (self.jail, self.jail(binary)) else {
            return Ok(None);
        };
        let mut jail = jail
            .read_only(&self.kernel)
            .read_only(&self.initrd)
            .read_only(Path::new("/dev/urandom"))
            .owned_file(&self.console_log);
        if kvm {
            jail = jail.writable(Path::new("/dev/kvm"));
        }
        if let Some(share) = &self.share {
            Jail::grant(id, &share.socket)?;
            jail = jail.writable(&share.socket);
        }
        Ok(Some(jail))
    }
}

/// An empty directory of the sandbox's, where each jail mounts its root.
const JAIL_ROOT: &str = "jail";

/// Where in a sandbox directory the VMM and its back-ends create their sockets: theirs to
/// write, while the sandbox directory itself is the shim's alone.
pub fn vmm_dir(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join("vmm")
}

/// A virtio-fs device whose vhost-user back-end (virtiofsd) the sandbox runs.
#[derive(Debug, Clone)]
pub struct ShareDevice {
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// The back-end's exit: a VMM must not wait on a socket nobody serves any more.
    pub backend: ExitWatch,
}

/// The guest's vsock device, exposed on the host as a hybrid-vsock Unix socket.
#[derive(Debug, Clone)]
pub struct VsockDevice {
    pub cid: u32,
    /// Host→guest: connect here and send `CONNECT <port>\n`. Guest→host connections to
    /// port P arrive on a Unix socket at `<socket>_<P>`.
    pub socket: PathBuf,
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
    /// Memory hot-plug: the VM's memory grows in whole blocks of this many MiB (`None`: it
    /// cannot grow).
    pub memory_hotplug_block_mib: Option<u64>,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code or 128 + signal of the process that ended it, when it could be collected.
    pub status: Option<i32>,
    /// A short explanation: the VMM's last error line, a back-end's death, or "stopped"
    /// after [`Hypervisor::stop`].
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// Launching, readiness or death of the VMM or one of its back-ends.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{what} not found at {path}")]
    Missing { what: &'static str, path: PathBuf },
    /// The request does not make sense (bad spec, wrong state); nothing was started.
    #[error("{call}: {why}")]
    Invalid { call: &'static str, why: String },
    #[error("{what} timed out after {timeout:?}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Timeout {
        what: String,
        timeout: Duration,
        detail: Option<String>,
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
    /// The VM's NICs cannot be handed to the VMM.
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Jail(#[from] JailError),
}

pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

/// One VMM instance. Implementations keep their own state; every method that crosses into
/// the VMM has a timeout, and [`Hypervisor::stop`] is idempotent ("already gone" is success).
#[async_trait]
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> HypervisorKind;
    fn capabilities(&self) -> Capabilities;

    /// Checks the spec against what this driver and host can do, and starts the device
    /// back-ends the driver owns. Nothing is booted.
    async fn prepare(&mut self, spec: &VmSpec) -> Result<()>;

    /// Launches the VMM and boots the guest. Returns once the VMM reports the guest
    /// running (the agent is not necessarily up yet). On error everything `prepare` and
    /// `start` created is torn down again.
    async fn start(&mut self) -> Result<()>;

    /// Set once the VM ended: the VMM (or a back-end the VM cannot live without) exited,
    /// or [`Hypervisor::stop`] ran.
    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>>;

    /// Resolves when the VM has ended (see [`Hypervisor::exit_watch`]).
    async fn wait_exit(&self) -> VmExit {
        wait_exit(self.exit_watch()).await
    }

    /// The guest is up (its agent answered): the driver may release what only the boot
    /// needed. Best effort; nothing about the VM changes.
    fn guest_ready(&self) {}

    /// Stops the VM: a graceful VMM shutdown bounded by `grace`, then SIGKILL; then the
    /// device back-ends. Idempotent.
    async fn stop(&mut self, grace: Duration) -> Result<()>;

    /// Host pid of the VMM process while it runs.
    fn pid(&self) -> Option<u32>;

    /// Resizes the VM (CPU and memory hot-plug), where [`Capabilities`] allow it.
    async fn resize(&mut self, vcpus: Option<u32>, memory_mib: Option<u64>) -> Result<()>;
}

/// Which driver, and how it runs its VMM.
#[derive(Debug, Clone)]
pub enum DriverOptions {
    Qemu(qemu::QemuOptions),
    Clh(clh::ClhOptions),
}

/// Makes the driver. `ledger` learns every process the driver launches, at launch.
pub fn new(
    options: DriverOptions,
    ledger: Arc<dyn PidLedger>,
    log: &Logger,
) -> Box<dyn Hypervisor> {
    match options {
        DriverOptions::Qemu(o) => Box::new(qemu::Qemu::new(o, ledger, log)),
        DriverOptions::Clh(o) => Box::new(clh::Clh::new(o, ledger, log)),
    }
}

/// Resolves with the exit once `exit` reports one.
pub async fn wait_exit(mut exit: watch::Receiver<Option<VmExit>>) -> VmExit {
    match exit.wait_for(Option::is_some).await {
        Ok(e) => e.clone().expect("waited for Some"),
        Err(_) => VmExit {
            status: None,
            reason: "the driver is gone".into(),
        },
    }
}

/// How long a back-end's exit waits for the VMM's before it is reported as the VM's end.
pub(crate) const BACKEND_GRACE: Duration = Duration::from_millis(200);

/// A VM's end, published once by whoever sees it first: the driver stopping the VM, or a
/// watcher of a process the VM cannot live without.
#[derive(Clone)]
pub(crate) struct VmEnd {
    tx: Arc<watch::Sender<Option<VmExit>>>,
    /// Why the driver itself is ending the VM; watchers report this instead of a death.
    planned: Arc<Mutex<Option<String>>>,
}

impl VmEnd {
    pub(crate) fn new() -> VmEnd {
        VmEnd {
            tx: Arc::new(watch::channel(None).0),
            planned: Arc::new(Mutex::new(None)),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<VmExit>> {
        self.tx.subscribe()
    }

    /// The driver is ending the VM on purpose (`reason`, e.g. "stopped").
    pub(crate) fn plan(&self, reason: &str) {
        self.planned
            .lock()
            .unwrap()
            .get_or_insert_with(|| reason.to_string());
    }

    /// After the driver ended the VM: lets the process watchers publish the real exit
    /// status (briefly), else publishes `reason` without one.
    pub(crate) async fn settle(&self, reason: &str) {
        let mut rx = self.tx.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(Option::is_some)).await;
        self.set(VmExit {
            status: None,
            reason: reason.into(),
        });
    }

    /// Publishes `exit` unless an end was already published.
    pub(crate) fn set(&self, exit: VmExit) {
        self.tx.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(exit);
            true
        });
    }

    /// Publishes the VM's end when the VMM exits, explained by `reason(status)` unless the
    /// end was planned.
    pub(crate) fn watch_vmm(
        &self,
        vmm: ExitWatch,
        reason: impl FnOnce(Option<i32>) -> String + Send + 'static,
    ) {
        self.watch(vmm, Duration::ZERO, reason)
    }

    /// Like [`VmEnd::watch_vmm`] for a back-end the VM cannot live without. A back-end also
    /// leaves when the VMM dies: the VMM's own exit, if it comes within [`BACKEND_GRACE`], is
    /// the one reported.
    pub(crate) fn watch_backend(
        &self,
        backend: ExitWatch,
        reason: impl FnOnce(Option<i32>) -> String + Send + 'static,
    ) {
        self.watch(backend, BACKEND_GRACE, reason)
    }

    fn watch(
        &self,
        process: ExitWatch,
        grace: Duration,
        reason: impl FnOnce(Option<i32>) -> String + Send + 'static,
    ) {
        self.on(grace, async move {
            let status = crate::daemon::wait_exit(process).await;
            VmExit {
                status,
                reason: reason(status),
            }
        })
    }

    /// Publishes another end's exit as this one's (a driver's end in the sandbox's).
    pub(crate) fn follow(&self, other: watch::Receiver<Option<VmExit>>) {
        self.on(Duration::ZERO, wait_exit(other))
    }

    /// Publishes the VM's end when `ended` resolves, unless another end is published within
    /// `grace` of it (the cause rather than a consequence), or the end was planned.
    pub(crate) fn on(&self, grace: Duration, ended: impl Future<Output = VmExit> + Send + 'static) {
        let end = self.clone();
        tokio::spawn(async move {
            let exit = ended.await;
            let mut published = end.tx.subscribe();
            let _ = tokio::time::timeout(grace, published.wait_for(Option::is_some)).await;
            let planned = end.planned.lock().unwrap().clone();
            end.set(VmExit {
                reason: planned.unwrap_or(exit.reason),
                ..exit
            });
        });
    }
}

/// "exit status 3" / "killed by signal 9" / "exit status unknown".
pub fn describe_status(status: Option<i32>) -> String {
    match status {
        Some(s) if s > 128 => format!("killed by signal {}", s - 128),
        Some(s) => format!("exit status {s}"),
        None => "exit status unknown".into(),
    }
}
