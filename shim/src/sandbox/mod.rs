//! One sandbox (pod) = one microVM, from boot to teardown. Used by the containerd Task
//! service and by `shoji vm run`.
//!
//! Start: `<run dir>/<id>/` → `shared/` as its own shared mount, exported read-only as
//! `export/` (see [`SharedDir`]) → ready listener → driver
//! prepare (device daemons) + start (VMM) → the agent announces itself → dial the agent.
//! Any failure tears down whatever was created. Stop reverses it: agent Shutdown → VMM →
//! daemons → mounts → the directory. Everything created is recorded in `state.json` so
//! [`cleanup`] can remove it after the shim died.
//!
//! Containers: mount the rootfs ([`Sandbox::mount_rootfs`]) and volumes
//! ([`Sandbox::mount_volume`]) under the shared directory, then create the container through
//! [`Sandbox::agent`] with the guest paths returned; after the agent removed it,
//! [`Sandbox::unmount_container`].
mod state;

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoji_agent_api::{CMDLINE_HOSTNAME, CMDLINE_LOG_LEVEL, CMDLINE_SHARE_TAG, GUEST_SHARE_DIR};
use slog::{info, warn, Logger};
use tokio::sync::watch;

pub use self::state::{cleanup, CleanupError, RecordedPid, State};
use crate::{
    agent_client::{AgentClient, AgentError, ReadyListener},
    config::Config,
    hypervisor::{
        clh::{Clh, ClhOptions},
        qemu::Qemu,
        Hypervisor, HypervisorError, HypervisorKind, NetDevice, ShareDevice, VmExit, VmSpec,
        VsockDevice,
    },
    sharefs::{self, MountError, SharedDir},
};

/// The virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "shoji";
/// The guest CID. Each VM has its own vsock back-end, so every VM can use the same one.
const GUEST_CID: u32 = 3;
/// How long the agent gets to acknowledge Shutdown before the VMM is stopped anyway.
const SHUTDOWN_CALL: Duration = Duration::from_secs(2);
/// Lines of the guest console quoted in a start-up error.
const CONSOLE_TAIL: usize = 12;

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
    /// Guest NICs (taps in the pod's network namespace).
    pub nets: Vec<NetDevice>,
    /// Guest hostname (default: the first 12 characters of the id).
    pub hostname: Option<String>,
}

impl SandboxConfig {
    /// A sandbox with the configured default size.
    pub fn new(id: &str, config: Config) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            vcpus: config.default_vcpus,
            memory_mib: config.default_memory_mib,
            config,
            kernel_args: Vec::new(),
            nets: Vec::new(),
            hostname: None,
        }
    }

    /// `<run dir>/<id>`.
    pub fn dir(&self) -> PathBuf {
        self.config.run_dir.join(&self.id)
    }
}

/// A containerd-style mount: how one layer of a container's rootfs is mounted on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// `bind` (also `rbind`) or a filesystem type such as `overlay`.
    pub kind: String,
    pub source: String,
    /// mount(8) options (`ro`, `lowerdir=...`).
    pub options: Vec<String>,
}

impl Mount {
    /// A plain host directory as a rootfs.
    pub fn host_dir(dir: &Path, read_only: bool) -> Mount {
        let mut options = vec!["rbind".to_string()];
        if read_only {
            options.push("ro".into());
        }
        Mount {
            kind: "bind".into(),
            source: dir.display().to_string(),
            options,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid {what} {id:?}: {why}")]
    InvalidId {
        what: &'static str,
        id: String,
        why: &'static str,
    },
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
    Agent(#[from] AgentError),
    #[error("the guest agent did not announce itself within {timeout:?}; last console lines:\n{console}")]
    NotReady { timeout: Duration, console: String },
    #[error("the VM exited before its agent was ready ({}); last console lines:\n{console}", exit.reason)]
    VmExited { exit: VmExit, console: String },
    #[error("{rootfs} is not usable as a rootfs: {why}")]
    BadRootfs { rootfs: String, why: String },
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// A running sandbox VM. All methods take `&self`: share it behind an `Arc`.
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    log: Logger,
    shutdown_grace: Duration,
    agent: AgentClient,
    vm: tokio::sync::Mutex<Option<Box<dyn Hypervisor>>>,
    vm_exited: watch::Receiver<bool>,
    shared: SharedDir,
    state: Mutex<State>,
    boot_times: BootTimes,
}

/// How long each start-up phase took, measured from the start of [`Sandbox::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimes {
    /// Device daemons (vhost-user back-ends) up.
    pub daemons_ready: Duration,
    /// The VMM reports the guest running.
    pub vmm_running: Duration,
    /// The agent announced itself (the ttrpc connection follows).
    pub agent_ready: Duration,
}

impl Sandbox {
    /// Boots the sandbox's VM and connects to its agent. On error nothing is left behind.
    pub async fn start(cfg: SandboxConfig, log: Logger) -> Result<Sandbox> {
        validate_id("sandbox id", &cfg.id)?;
        let c = &cfg.config;
        for (what, path) in [("guest kernel", &c.kernel), ("guest initramfs", &c.initrd)] {
            if !path.is_file() {
                return Err(SandboxError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        let dir = cfg.dir();
        std::fs::create_dir_all(&c.run_dir)
            .map_err(io(format!("create {}", c.run_dir.display())))?;
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists {
                    id: cfg.id.clone(),
                    dir,
                })
            }
            r => r.map_err(io(format!("create {}", dir.display())))?,
        }
        let log = log.new(slog::o!("sandbox" => cfg.id.clone()));
        let mut boot = Boot {
            dir: dir.clone(),
            log: log.clone(),
            state: State {
                id: cfg.id.clone(),
                ..Default::default()
            },
            vm: None,
            shared: None,
        };
        match boot.run(&cfg).await {
            Ok((agent, vm_exited, boot_times)) => {
                let shared = boot.shared.take().expect("shared dir created");
                Ok(Sandbox {
                    id: cfg.id.clone(),
                    dir,
                    log,
                    shutdown_grace: c.timeouts.shutdown,
                    agent,
                    vm: tokio::sync::Mutex::new(boot.vm.take()),
                    vm_exited,
                    boot_times,
                    shared,
                    state: Mutex::new(std::mem::take(&mut boot.state)),
                })
            }
            Err(e) => {
                warn!(log, "sandbox start failed, tearing down"; "error" => %e);
                boot.teardown(c.timeouts.shutdown).await;
                Err(e)
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sandbox's host directory (`<run dir>/<id>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn boot_times(&self) -> BootTimes {
        self.boot_times
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Host pids of the VMM and its device daemons.
    pub fn pids(&self) -> Vec<u32> {
        self.state
            .lock()
            .unwrap()
            .pids
            .iter()
            .map(|p| p.pid)
            .collect()
    }

    /// The VMM's host pid (what containerd sees as the task's pid), while it runs.
    pub async fn vmm_pid(&self) -> Option<u32> {
        self.vm.lock().await.as_ref().and_then(|vm| vm.pid())
    }

    /// Mounts a container's rootfs under the shared directory and returns its guest path.
    /// `mounts` are applied in order on the same target (containerd gives one overlay or
    /// bind mount). The guest sees it only once this returns.
    pub fn mount_rootfs(&self, container_id: &str, mounts: &[Mount]) -> Result<String> {
        validate_id("container id", container_id)?;
        if mounts.is_empty() {
            return Err(SandboxError::BadRootfs {
                rootfs: container_id.into(),
                why: "no mounts given".into(),
            });
        }
        let rel = Path::new(container_id).join("rootfs");
        for m in mounts {
            let target = match m.kind.as_str() {
                "bind" | "rbind" => {
                    let src = Path::new(&m.source);
                    if !src.is_dir() {
                        return Err(SandboxError::BadRootfs {
                            rootfs: m.source.clone(),
                            why: "not a directory".into(),
                        });
                    }
                    self.shared
                        .bind(src, &rel, m.options.iter().any(|o| o == "ro"))
                }
                fstype => self.shared.mount_fs(fstype, &m.source, &rel, &m.options),
            };
            match target {
                Ok(t) => self.record_mount(t),
                Err(e) => {
                    let _ = self.unmount_container(container_id);
                    return Err(e.into());
                }
            }
        }
        Ok(guest_path(&rel))
    }

    /// Bind-mounts a host file or directory for a container's volume `name` (one path
    /// component) and returns its guest path. `read_only` is enforced on the host.
    pub fn mount_volume(
        &self,
        container_id: &str,
        name: &str,
        source: &Path,
        read_only: bool,
    ) -> Result<String> {
        validate_id("container id", container_id)?;
        validate_id("volume name", name)?;
        let rel = Path::new(container_id).join("volumes").join(name);
        let target = self.shared.bind(source, &rel, read_only)?;
        self.record_mount(target);
        Ok(guest_path(&rel))
    }

    /// Unmounts a container's rootfs and volumes and removes its directory under the shared
    /// directory. Call after the agent removed the container. Idempotent.
    pub fn unmount_container(&self, container_id: &str) -> Result<()> {
        validate_id("container id", container_id)?;
        let root = self.shared.path().join(container_id);
        sharefs::unmount_tree(&root)?;
        match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(SandboxError::Io {
                    context: format!("remove {}", root.display()),
                    source: e,
                })
            }
            _ => {}
        }
        let mut state = self.state.lock().unwrap();
        state.mounts.retain(|m| !m.starts_with(&root));
        let _ = state.write(&self.dir);
        Ok(())
    }

    fn record_mount(&self, target: PathBuf) {
        let mut state = self.state.lock().unwrap();
        state.mounts.push(target);
        if let Err(e) = state.write(&self.dir) {
            warn!(self.log, "cannot persist state"; "error" => %e);
        }
    }

    /// Resolves when the VMM has exited (guest power-off, crash or [`Sandbox::stop`]).
    pub async fn wait_exit(&self) -> VmExit {
        let mut rx = self.vm_exited.clone();
        let _ = rx.wait_for(|exited| *exited).await;
        match self.vm.lock().await.as_ref() {
            Some(vm) => vm.wait_exit().await,
            None => VmExit {
                status: None,
                reason: "stopped".into(),
            },
        }
    }

    /// Stops everything: agent Shutdown (short timeout) → VMM → device daemons → mounts →
    /// the sandbox directory. Idempotent; whatever is already gone counts as done.
    pub async fn stop(&self) -> Result<()> {
        let mut vm = self.vm.lock().await;
        let Some(mut driver) = vm.take() else {
            return Ok(());
        };
        if !*self.vm_exited.borrow() {
            match self.agent.shutdown(SHUTDOWN_CALL).await {
                // Let the guest finish its power-off before the VMM is told to quit.
                Ok(()) => {
                    let mut exited = self.vm_exited.clone();
                    let _ =
                        tokio::time::timeout(self.shutdown_grace, exited.wait_for(|e| *e)).await;
                }
                Err(e) => {
                    info!(self.log, "agent shutdown call failed, stopping the VMM anyway"; "error" => %e)
                }
            }
        }
        let stopped = driver.stop(self.shutdown_grace).await;
        let unmounted = self.shared.destroy();
        *vm = None;
        drop(vm);
        stopped?;
        unmounted?;
        remove_dir(&self.dir)?;
        info!(self.log, "sandbox stopped");
        Ok(())
    }
}

/// A sandbox dropped without [`Sandbox::stop`] (a panic, an early return) still releases
/// what it holds: its daemons are killed as their handles drop, its mounts are detached and
/// its directory removed. Best effort and synchronous; `stop` is the orderly way.
impl Drop for Sandbox {
    fn drop(&mut self) {
        let Ok(mut vm) = self.vm.try_lock() else {
            return;
        };
        if vm.take().is_some() {
            warn!(self.log, "sandbox dropped without stop(), cleaning up");
            let _ = self.shared.destroy();
            let _ = sharefs::unmount_tree(&self.dir);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The start sequence, holding what was created so far for teardown on failure.
struct Boot {
    dir: PathBuf,
    log: Logger,
    state: State,
    vm: Option<Box<dyn Hypervisor>>,
    shared: Option<SharedDir>,
}

impl Boot {
    async fn run(
        &mut self,
        cfg: &SandboxConfig,
    ) -> Result<(AgentClient, watch::Receiver<bool>, BootTimes)> {
        let c = &cfg.config;
        self.persist();
        let shared = self.shared.insert(SharedDir::create(
            &self.dir.join("shared"),
            &self.dir.join("export"),
        )?);
        let export = shared.export().to_path_buf();
        let vsock = self.dir.join("vsock.sock");
        let ready = ReadyListener::bind(&vsock)?;
        let spec = VmSpec {
            id: cfg.id.clone(),
            dir: self.dir.clone(),
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            kernel_args: kernel_args(cfg),
            vcpus: cfg.vcpus,
            max_vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            share: Some(ShareDevice {
                tag: SHARE_TAG.into(),
                shared_dir: export,
                socket: self.dir.join("virtiofsd.sock"),
                virtiofsd: c.virtiofsd.path.clone(),
                cache: c.virtiofsd.cache.clone(),
            }),
            vsock: VsockDevice {
                cid: GUEST_CID,
                socket: vsock.clone(),
            },
            nets: cfg.nets.clone(),
            console_log: self.dir.join("console.log"),
        };
        let started = tokio::time::Instant::now();
        let vm = self.vm.insert(new_driver(c, &self.log)?);
        let prepared = vm.prepare(&spec).await;
        self.record_pids();
        prepared?;
        let prepared_after = started.elapsed();
        let vm = self.vm.as_mut().expect("driver");
        let launched = vm.start().await;
        self.record_pids();
        launched?;
        let launched_after = started.elapsed();
        let vm = self.vm.as_ref().expect("driver");
        let vmm_pid = vm.pid().ok_or_else(|| HypervisorError::Died {
            what: "VMM",
            status: None,
            detail: "no VMM process after start".into(),
        })?;

        let timeout = c.timeouts.agent_ready;
        tokio::select! {
            r = ready.wait_ready(timeout) => {
                if r.is_err() {
                    return Err(SandboxError::NotReady { timeout, console: console_tail(&spec.console_log) });
                }
            }
            exit = vm.wait_exit() => {
                return Err(SandboxError::VmExited { exit, console: console_tail(&spec.console_log) });
            }
        }
        drop(ready);
        let times = BootTimes {
            daemons_ready: prepared_after,
            vmm_running: launched_after,
            agent_ready: started.elapsed(),
        };
        let agent = AgentClient::connect(&vsock, c.timeouts.agent_call).await?;
        info!(self.log, "sandbox ready"; "agent_ready_ms" => times.agent_ready.as_millis() as u64,
            "daemons_ready_ms" => times.daemons_ready.as_millis() as u64,
            "vmm_running_ms" => times.vmm_running.as_millis() as u64,
            "hypervisor" => ?vm.kind(), "accel" => ?vm.capabilities().accel);

        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            crate::process::wait_pid_exit(vmm_pid).await;
            let _ = tx.send(true);
        });
        Ok((agent, rx, times))
    }

    fn record_pids(&mut self) {
        if let Some(vm) = &self.vm {
            for pid in vm.pids() {
                self.state
                    .add_pid(&format!("{:?}", vm.kind()).to_lowercase(), pid);
            }
        }
        self.persist();
    }

    fn persist(&self) {
        if let Err(e) = self.state.write(&self.dir) {
            warn!(self.log, "cannot persist state"; "error" => %e);
        }
    }

    async fn teardown(&mut self, grace: Duration) {
        if let Some(mut vm) = self.vm.take() {
            if let Err(e) = vm.stop(grace).await {
                warn!(self.log, "teardown: stopping the VM failed"; "error" => %e);
            }
        }
        if let Some(shared) = self.shared.take() {
            if let Err(e) = shared.destroy() {
                warn!(self.log, "teardown: unmounting the shared directory failed"; "error" => %e);
            }
        }
        // Also catches a half-created shared mount and pids the driver lost track of.
        let run_dir = self.dir.parent().unwrap_or(Path::new("/"));
        let id = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Err(e) = cleanup(run_dir, &id).await {
            warn!(self.log, "teardown: cleanup failed"; "error" => %e);
        }
    }
}

/// Creates the driver for the configured hypervisor.
fn new_driver(c: &Config, log: &Logger) -> Result<Box<dyn Hypervisor>> {
    match c.hypervisor {
        HypervisorKind::Qemu => Ok(Box::new(Qemu::new(c, log.clone()))),
        HypervisorKind::Clh => {
            let mut opts = ClhOptions::new(c.clh.path.clone());
            opts.start_timeout = c.timeouts.vm_start;
            Ok(Box::new(Clh::new(opts, log.clone())))
        }
    }
}

/// The driver adds console, panic and timer arguments; these tell the agent what to mount and log.
fn kernel_args(cfg: &SandboxConfig) -> Vec<String> {
    let hostname = cfg
        .hostname
        .clone()
        .unwrap_or_else(|| cfg.id.chars().take(12).collect());
    let mut args = vec![
        format!("{CMDLINE_SHARE_TAG}={SHARE_TAG}"),
        format!("{CMDLINE_LOG_LEVEL}={}", cfg.config.log_level),
        format!("{CMDLINE_HOSTNAME}={hostname}"),
    ];
    args.extend(cfg.config.kernel_args.iter().cloned());
    args.extend(cfg.kernel_args.iter().cloned());
    args
}

fn guest_path(rel: &Path) -> String {
    format!("{GUEST_SHARE_DIR}/{}", rel.display())
}

/// Ids name directories on the host and in the guest and travel in stream headers: a
/// conservative alphabet keeps them from escaping a directory or splitting a header.
pub fn validate_id(what: &'static str, id: &str) -> Result<()> {
    let bad = |why| {
        Err(SandboxError::InvalidId {
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

/// The last lines of the guest console, for error messages.
pub fn console_tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return format!("  (no console output in {})", console.display());
    }
    lines[lines.len().saturating_sub(CONSOLE_TAIL)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SandboxError::Io {
            context: format!("remove {}", dir.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { context, source }
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

    #[test]
    fn kernel_args_name_share_log_and_hostname() {
        let mut cfg = SandboxConfig::new("0123456789abcdef", Config::default());
        cfg.kernel_args.push("x=1".into());
        let args = kernel_args(&cfg);
        assert_eq!(args[0], "shoji.share=shoji");
        assert_eq!(args[1], "shoji.log=info");
        assert_eq!(args[2], "shoji.hostname=0123456789ab");
        assert_eq!(args.last().unwrap(), "x=1");
    }
}
