//! Cloud Hypervisor driver (REST API over a Unix socket).
//!
//! `start` launches `cloud-hypervisor` with its API socket, log and event monitor in the
//! sandbox directory, waits for `vmm.ping`, then `vm.create` (the whole VM but its NICs) →
//! `vm.add-net` per tap (fd passed with SCM_RIGHTS) → `vm.boot`, and confirms with
//! `vm.info`. The VMM's exit ends the VM, reported with its last error line and events.
//! Stop: `vm.shutdown` → `vmm.shutdown` → SIGKILL when the grace period runs out.
//! What a real Cloud Hypervisor answers to each call: docs/cloud-hypervisor.md.
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use cloud_hypervisor_client::models::{VmResize, VmState};
use slog::{debug, info, warn, Logger};
use tokio::sync::watch;

use super::{
    Accel, Capabilities, Hypervisor, HypervisorError, HypervisorKind, Result, VmEnd, VmExit, VmSpec,
};
use crate::{
    daemon::{Daemon, DaemonError, PidLedger},
    jail::{Jail, JailNet},
};

mod api;
mod logs;
mod vm_config;

use self::logs::Files;
pub use api::readable_error;
pub use vm_config::{net_config, vm_config, HOTPLUG_ALIGN_MIB, KERNEL_ARGS};

/// How the driver runs Cloud Hypervisor.
#[derive(Debug, Clone)]
pub struct ClhOptions {
    /// The `cloud-hypervisor` binary.
    pub binary: PathBuf,
    /// VMM launch until `vmm.ping` answers.
    pub start_timeout: Duration,
    /// Any single API call but `vm.boot`.
    pub api_timeout: Duration,
    /// `vm.boot` (creates every device; bounded by CH's own 60 s vhost-user wait otherwise).
    pub boot_timeout: Duration,
    /// Address space reserved for memory hot-plug beyond the boot memory (0: none).
    pub memory_hotplug_mib: u64,
}

impl ClhOptions {
    pub fn new(binary: PathBuf) -> ClhOptions {
        ClhOptions {
            binary,
            start_timeout: Duration::from_secs(10),
            api_timeout: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(15),
            // ACPI hot-plug only reserves guest address space until memory is added.
            memory_hotplug_mib: 4096,
        }
    }
}

/// One Cloud Hypervisor VM. See the module documentation for the sequence.
pub struct Clh {
    opts: ClhOptions,
    ledger: Arc<dyn PidLedger>,
    log: Logger,
    spec: Option<VmSpec>,
    vmm: Option<Daemon>,
    api: Option<api::Api>,
    /// Current size, for resize checks.
    vcpus: u32,
    memory_mib: u64,
    end: VmEnd,
}

impl Clh {
    pub fn new(opts: ClhOptions, ledger: Arc<dyn PidLedger>, log: &Logger) -> Clh {
        Clh {
            opts,
            ledger,
            log: log.new(slog::o!("hypervisor" => "clh")),
            spec: None,
            vmm: None,
            api: None,
            vcpus: 0,
            memory_mib: 0,
            end: VmEnd::new(),
        }
    }

    fn running_vmm(&self) -> Option<&Daemon> {
        self.vmm.as_ref().filter(|d| d.exited().is_none())
    }

    /// An API call that failed because the VMM died (connection reset, no answer) is
    /// reported as the VMM's death, with the VMM's own error.
    async fn blame_dead_vmm(&self, e: HypervisorError, spec: &VmSpec) -> HypervisorError {
        let Some(vmm) = &self.vmm else { return e };
        if !matches!(
            e,
            HypervisorError::Io { .. } | HypervisorError::Timeout { .. }
        ) {
            return e;
        }
        // The pidfd may fire a moment after the connection broke.
        let Ok(status) = tokio::time::timeout(Duration::from_millis(200), vmm.wait()).await else {
            return e;
        };
        let error = Files::new(&spec.dir)
            .vmm_error()
            .unwrap_or_else(|| "no error output".into());
        DaemonError::Died {
            what: "cloud-hypervisor",
            status,
            detail: format!("{error} (the step that failed: {e})"),
        }
        .into()
    }

    /// CH's jail: the VMM's, and the log and event files it opens by name.
    fn jail(&self, spec: &VmSpec, files: &Files) -> Result<Option<Jail>> {
        let kvm = Path::new("/dev/kvm").exists();
        Ok(spec
            .vmm_jail(&self.opts.binary, kvm)?
            .map(|jail| jail.owned_file(&files.log).owned_file(&files.events)))
    }

    async fn launch_and_boot(&mut self, spec: &VmSpec) -> Result<()> {
        let files = Files::new(&spec.dir);
        let api_socket = &files.api_socket;
        // CH refuses to bind over existing sockets; these are ours to replace.
        for stale in [api_socket, &spec.vsock.socket] {
            remove_file(stale)?;
        }
        let netns = crate::network::pod_netns(&spec.nets)?;

        let mut cmd = Command::new(&self.opts.binary);
        cmd.arg("--api-socket")
            .arg(format!("path={}", api_socket.display()))
            .arg("--log-file")
            .arg(&files.log)
            .arg("--event-monitor")
            .arg(format!("path={}", files.events.display()))
            // Its own default, stated: the VMM runs under its seccomp filter.
            .args(["--seccomp", "true"]);
        let open_netns = |ns: &Path| {
            File::open(ns).map_err(|source| HypervisorError::Io {
                context: format!("opening network namespace {}", ns.display()),
                source,
            })
        };
        match (self.jail(spec, &files)?, netns) {
            (Some(jail), Some(ns)) => jail.net(JailNet::Enter(open_netns(ns)?)).apply(&mut cmd)?,
            (Some(jail), None) => jail.apply(&mut cmd)?,
            (None, Some(ns)) => crate::network::enter_on_exec(&mut cmd, open_netns(ns)?),
            (None, None) => {}
        }
        let vmm = Daemon::spawn("cloud-hypervisor", cmd, &files.stdio, self.ledger.as_ref())?;
        info!(self.log, "cloud-hypervisor launched"; "pid" => vmm.pid(), "api_socket" => %api_socket.display());
        let reason_files = files.clone();
        self.end.watch_vmm(vmm.exit_watch(), move |status| {
            reason_files.exit_reason(status)
        });
        let vmm = self.vmm.insert(vmm);

        let api = api::Api::new(api_socket, self.opts.api_timeout);
        let ping = wait_for_api(&api, vmm, &files, self.opts.start_timeout).await?;
        info!(self.log, "cloud-hypervisor API ready"; "version" => ping.version, "build" => ping.build_version);
        let api = self.api.insert(api);

        api.create(vm_config(spec, self.opts.memory_hotplug_mib))
            .await?;
        if !spec.nets.is_empty() {
            let taps = crate::network::open_taps(&spec.nets).await?;
            for (i, (net, fd)) in spec.nets.iter().zip(&taps).enumerate() {
                api.add_net(&net_config(net, i), fd.as_fd()).await?;
                debug!(self.log, "tap handed to cloud-hypervisor"; "tap" => &net.tap, "fd" => fd.as_raw_fd());
            }
            // CH holds its own copies now; ours close here.
        }
        if let Some(share) = &spec.share {
            // A vhost-user socket nobody serves makes vm.boot block for 60 s inside CH.
            if let Some(status) = *share.backend.borrow() {
                return Err(DaemonError::Died {
                    what: "virtiofsd",
                    status,
                    detail: "the virtio-fs back-end exited before vm.boot".into(),
                }
                .into());
            }
            if !share.socket.exists() {
                return Err(HypervisorError::Missing {
                    what: "virtiofsd socket",
                    path: share.socket.clone(),
                });
            }
        }
        let booted = Instant::now();
        api.boot(self.opts.boot_timeout).await?;
        let state = api.info().await?.state;
        if state != VmState::Running {
            return Err(HypervisorError::Api {
                call: "vm.info".into(),
                status: 200,
                body: format!("VM state is {state} after vm.boot, expected Running"),
            });
        }
        info!(self.log, "VM running"; "boot_ms" => booted.elapsed().as_millis() as u64);
        Ok(())
    }

    /// Ends the VMM (gracefully within `grace`, else SIGKILL) and removes the sockets.
    /// `grace` zero skips the API (a failed start has nothing to shut down cleanly).
    async fn teardown(&mut self, reason: &str, grace: Duration) {
        self.end.plan(reason);
        let deadline = tokio::time::Instant::now() + grace;
        if let Some(vmm) = self.running_vmm() {
            if let Some(api) = self.api.as_ref().filter(|_| !grace.is_zero()) {
                for (name, result) in [
                    ("vm.shutdown", api.shutdown_vm(remaining(deadline)).await),
                    ("vmm.shutdown", api.shutdown_vmm(remaining(deadline)).await),
                ] {
                    if let Err(e) = result {
                        debug!(self.log, "graceful shutdown step failed"; "call" => name, "error" => %e);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, vmm.wait()).await.is_err() {
                warn!(self.log, "cloud-hypervisor did not exit in time, killing it"; "pid" => vmm.pid(), "grace" => ?grace);
                vmm.kill().await;
            }
        }
        if self.vmm.is_some() {
            self.end.settle(reason).await;
        } else {
            self.end.set(VmExit {
                status: None,
                reason: reason.into(),
            });
        }
        self.api = None;
        if let Some(spec) = &self.spec {
            for path in [Files::new(&spec.dir).api_socket, spec.vsock.socket.clone()] {
                if let Err(e) = remove_file(&path) {
                    warn!(self.log, "cannot remove socket"; "error" => %e);
                }
            }
        }
    }
}

#[async_trait]
impl Hypervisor for Clh {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Clh
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            accel: Accel::Kvm,
            cpu_hotplug: true,
            memory_hotplug_block_mib: (self.opts.memory_hotplug_mib > 0)
                .then_some(HOTPLUG_ALIGN_MIB),
        }
    }

    async fn prepare(&mut self, spec: &VmSpec) -> Result<()> {
        if self.spec.is_some() {
            return Err(invalid("prepare", "this driver already ran a VM".into()));
        }
        validate(spec, &self.opts.binary)?;
        self.vcpus = spec.vcpus;
        self.memory_mib = spec.memory_mib;
        self.spec = Some(spec.clone());
        Ok(())
    }

    async fn start(&mut self) -> Result<()> {
        let spec = self
            .spec
            .clone()
            .ok_or_else(|| invalid("start", "prepare() was not called".into()))?;
        if self.vmm.is_some() {
            return Err(invalid("start", "the VMM was already started".into()));
        }
        match self.launch_and_boot(&spec).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = self.blame_dead_vmm(e, &spec).await;
                warn!(self.log, "start failed, tearing down"; "error" => %e);
                self.teardown(&format!("start failed: {e}"), Duration::ZERO)
                    .await;
                Err(e)
            }
        }
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.end.subscribe()
    }

    async fn stop(&mut self, grace: Duration) -> Result<()> {
        self.teardown("stopped", grace).await;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.running_vmm().map(|d| d.pid())
    }

    async fn resize(&mut self, vcpus: Option<u32>, memory_mib: Option<u64>) -> Result<()> {
        if vcpus.is_none() && memory_mib.is_none() {
            return Ok(());
        }
        let spec = self
            .spec
            .as_ref()
            .ok_or_else(|| invalid("resize", "the VM was never prepared".into()))?;
        let api = match (&self.api, self.running_vmm()) {
            (Some(api), Some(_)) => api,
            _ => return Err(invalid("resize", "the VM is not running".into())),
        };
        if let Some(n) = vcpus {
            if n == 0 || n > spec.max_vcpus {
                return Err(invalid(
                    "resize",
                    format!("{n} vCPUs is outside 1..={}", spec.max_vcpus),
                ));
            }
        }
        if let Some(m) = memory_mib {
            let max = spec.memory_mib + self.opts.memory_hotplug_mib;
            if m < self.memory_mib || m > max {
                return Err(invalid(
                    "resize",
                    format!(
                        "{m} MiB is outside {}..={max} MiB (memory is only ever added)",
                        self.memory_mib
                    ),
                ));
            }
            // CH refuses any other size ("The requested hotplug memory addition is not a
            // valid size"): each addition is one ACPI DIMM of whole blocks.
            if !(m - self.memory_mib).is_multiple_of(HOTPLUG_ALIGN_MIB) {
                return Err(invalid(
                    "resize",
                    format!(
                        "{m} MiB adds {} MiB to {} MiB, not a multiple of the {HOTPLUG_ALIGN_MIB} MiB hot-plug block",
                        m - self.memory_mib,
                        self.memory_mib
                    ),
                ));
            }
        }
        api.resize(VmResize {
            desired_vcpus: vcpus.map(|n| n as i32),
            desired_ram: memory_mib.map(|m| (m << 20) as i64),
            ..VmResize::new()
        })
        .await?;
        info!(self.log, "VM resized"; "vcpus" => ?vcpus, "memory_mib" => ?memory_mib);
        self.vcpus = vcpus.unwrap_or(self.vcpus);
        self.memory_mib = memory_mib.unwrap_or(self.memory_mib);
        Ok(())
    }
}

fn invalid(call: &'static str, why: String) -> HypervisorError {
    HypervisorError::Invalid { call, why }
}

fn remaining(deadline: tokio::time::Instant) -> Duration {
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HypervisorError::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Everything that would only fail later, and less clearly, inside CH.
fn validate(spec: &VmSpec, binary: &Path) -> Result<()> {
    for (what, path) in [
        ("cloud-hypervisor", binary),
        ("sandbox directory", spec.dir.as_path()),
        ("guest kernel", spec.kernel.as_path()),
        ("guest initramfs", spec.initrd.as_path()),
    ] {
        if !path.exists() {
            return Err(HypervisorError::Missing {
                what,
                path: path.to_path_buf(),
            });
        }
    }
    if spec.vcpus == 0 || spec.max_vcpus < spec.vcpus {
        return Err(invalid(
            "prepare",
            format!(
                "vcpus {} / max_vcpus {} (need 1 ≤ vcpus ≤ max)",
                spec.vcpus, spec.max_vcpus
            ),
        ));
    }
    if spec.memory_mib < 64 {
        return Err(invalid(
            "prepare",
            format!(
                "{} MiB of memory is below the 64 MiB minimum",
                spec.memory_mib
            ),
        ));
    }
    if spec.vsock.cid < 3 {
        return Err(invalid(
            "prepare",
            format!(
                "vsock CID {} is reserved (guests use 3 and up)",
                spec.vsock.cid
            ),
        ));
    }
    crate::network::pod_netns(&spec.nets)?;
    Ok(())
}

/// Polls `vmm.ping` until it answers, failing early when the VMM exits.
async fn wait_for_api(
    api: &api::Api,
    vmm: &Daemon,
    files: &Files,
    timeout: Duration,
) -> Result<cloud_hypervisor_client::models::VmmPingResponse> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        if let Some(status) = vmm.exited() {
            return Err(DaemonError::Died {
                what: "cloud-hypervisor",
                status,
                detail: files
                    .vmm_error()
                    .unwrap_or_else(|| format!("no output (see {})", files.stdio.display())),
            }
            .into());
        }
        if files.api_socket.exists() {
            match api.ping(Duration::from_secs(1)).await {
                Ok(ping) => return Ok(ping),
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        if Instant::now() >= deadline {
            return Err(HypervisorError::Timeout {
                what: "cloud-hypervisor API (vmm.ping)".into(),
                timeout,
                detail: last_error
                    .or_else(|| Some(format!("{} never appeared", files.api_socket.display()))),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
