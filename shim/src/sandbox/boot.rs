//! The boot sequence of a sandbox, holding what was made so far so that a failure at any
//! step undoes exactly that (the ledger already names it for a crash).
use std::{os::unix::fs::DirBuilderExt, path::Path, sync::Arc};

use shoji_agent_api::{
    types::{ConfigureNetworkRequest, Sysctl},
    DEBUG_SHELL_REL,
};
use slog::{info, warn, Logger};
use tokio::sync::watch;

use super::{
    cleanup, console,
    logs::DAEMON_LOGS,
    pin,
    sizing::{Sizing, VmSize},
    state::{Ledger, LogRetention, RecordedPid, SandboxInfo, State},
    BootTimes, Result, Sandbox, SandboxConfig, SandboxError, SHARE_TAG,
};
use crate::{
    agent_client::{AgentClient, ReadyListener},
    call_stats::{CallStats, CALL_STATS_FILE},
    config::Config,
    host_cgroup::{self, PodCgroup, Previous},
    hypervisor::{
        self, clh::ClhOptions, describe_status, qemu::QemuOptions, Accel, DriverOptions,
        Hypervisor, HypervisorKind, ShareDevice, VmEnd, VmExit, VmSpec, VsockDevice, BACKEND_GRACE,
    },
    jail::{Identity, Jail, UidPool},
    logtail, network,
    port_forward::PortForward,
    sharefs::{BindMode, Propagation, ReadOnly, SharedDir, Virtiofsd, VirtiofsdOptions},
};

/// The guest CID. Each VM has its own vsock back-end, so every VM can use the same one.
const GUEST_CID: u32 = 3;
/// Lines of the guest console quoted in a start-up error.
const CONSOLE_TAIL: usize = 12;

pub(super) async fn boot(mut cfg: SandboxConfig, log: Logger) -> Result<Sandbox> {
    cfg.validate()?;
    // Resolved and held for the sandbox's lifetime: an upgrade does not remove them under it.
    let boot_images = pin::pin(&cfg.config.kernel, &cfg.config.initrd).await?;
    cfg.config.kernel = boot_images.kernel.clone();
    cfg.config.initrd = boot_images.initrd.clone();
    let c = &cfg.config;
    let dir = cfg.dir();
    std::fs::create_dir_all(&c.run_dir).map_err(io(format!("create {}", c.run_dir.display())))?;
    // Its files reach the guest's agent (the vsock socket), its console and its state: the
    // host's root only.
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(SandboxError::Exists {
                id: cfg.id.clone(),
                dir,
            })
        }
        r => r.map_err(io(format!("create {}", dir.display())))?,
    }
    let log = log.new(slog::o!("sandbox" => cfg.id.clone()));
    let choice = hypervisor::choice::choose(c).await;
    info!(log, "hypervisor chosen"; "hypervisor" => %choice.kind, "why" => &choice.reason);
    if let Some(blocker) = &choice.blocker {
        warn!(log, "the configured hypervisor cannot run guests here"; "why" => blocker);
    }
    let ledger = match Ledger::create(&dir, initial_state(&cfg, choice.kind), &log) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            return Err(io(format!("write the state file in {}", dir.display()))(e));
        }
    };
    let mut boot = Boot {
        ledger,
        log: log.clone(),
        cgroup_previous: None,
        shared: None,
        virtiofsd: None,
        driver: None,
        port_forward: None,
    };
    match boot.run(&cfg, choice.kind, &dir).await {
        Ok((agent, end, boot_times)) => {
            let driver = boot.driver.take().expect("driver");
            let vmm_pid = driver.pid().unwrap_or(0);
            Ok(Sandbox {
                dir,
                log,
                shutdown_grace: c.timeouts.shutdown,
                agent,
                ledger: boot.ledger.clone(),
                shared: boot.shared.take().expect("shared dir"),
                virtiofsd: boot.virtiofsd.take().expect("virtiofsd"),
                vm: tokio::sync::Mutex::new(Some(driver)),
                cgroup_previous: std::sync::Mutex::new(boot.cgroup_previous.take()),
                vmm_pid,
                end,
                boot_times,
                oom: Default::default(),
                sizing: Sizing::new(
                    VmSize {
                        vcpus: cfg.vcpus,
                        memory_mib: cfg.memory_mib,
                    },
                    VmSize {
                        vcpus: c.max_vcpus,
                        memory_mib: c.max_memory_mib,
                    },
                    c.memory_overhead_mib,
                ),
                port_forward: boot.port_forward.take(),
                _boot_images: boot_images,
            })
        }
        Err(e) => {
            warn!(log, "sandbox start failed, tearing down"; "error" => %e);
            boot.undo(&dir).await;
            Err(e)
        }
    }
}

/// What the boot made so far.
struct Boot {
    ledger: Arc<Ledger>,
    log: Logger,
    cgroup_previous: Option<Previous>,
    shared: Option<SharedDir>,
    virtiofsd: Option<Virtiofsd>,
    driver: Option<Box<dyn Hypervisor>>,
    port_forward: Option<PortForward>,
}

impl Boot {
    /// The sandbox's own uid for its VMM and vsock back-end, when jailing is on.
    fn claim_uid(&self, cfg: &SandboxConfig, dir: &Path) -> Result<Option<Identity>> {
        let c = &cfg.config.jail;
        if !c.enabled {
            return Ok(None);
        }
        let pool = UidPool {
            first: c.first_uid,
            count: c.uid_count,
        };
        let uid = pool.claim(&cfg.id, dir)?;
        let id = Identity {
            uid,
            gid: uid,
            kvm_gid: None,
        };
        // The claim names this directory: a crash before this record leaves a claim that
        // turns stale, and is reclaimed, once cleanup removes the directory.
        self.ledger
            .record(|s| s.jail = Some(id))
            .map_err(io(format!("record in {}", dir.display())))?;
        Ok(Some(id))
    }

    /// Makes the directory where the VMM and its back-ends create their sockets, theirs.
    fn vmm_dir(&self, dir: &Path, identity: Option<Identity>) -> Result<std::path::PathBuf> {
        let vmm = hypervisor::vmm_dir(dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&vmm)
            .map_err(io(format!("create {}", vmm.display())))?;
        if let Some(id) = identity {
            Jail::grant(id, &vmm)?;
        }
        Ok(vmm)
    }

    async fn run(
        &mut self,
        cfg: &SandboxConfig,
        kind: HypervisorKind,
        dir: &Path,
    ) -> Result<(AgentClient, watch::Receiver<Option<VmExit>>, BootTimes)> {
        let c = &cfg.config;
        let started = tokio::time::Instant::now();
        let record = |e| io(format!("record in {}", dir.display()))(e);

        // The VMM and its daemons are born in the pod cgroup: the shim joins it first.
        if let Some(path) = cfg.cgroup.as_deref().filter(|p| host_cgroup::supported(p)) {
            let cgroup = PodCgroup::plan(path)?;
            self.ledger
                .record(|s| s.cgroup = Some(cgroup.clone()))
                .map_err(record)?;
            self.cgroup_previous = Some(cgroup.enter(std::process::id()).await?);
        }
        let network = match &cfg.netns {
            Some(netns) => {
                let net = network::discover(netns).await?;
                self.ledger
                    .record(|s| s.network = Some(net.bridges.clone()))
                    .map_err(record)?;
                network::setup(&net.bridges).await?;
                Some(net)
            }
            None => None,
        };
        let identity = self.claim_uid(cfg, dir)?;
        self.vmm_dir(dir, identity)?;
        let shared = self
            .shared
            .insert(SharedDir::create(&dir.join("shared"), &dir.join("export"))?);
        if c.debug_console {
            share_debug_shell(shared, &self.log);
        }
        let vsock = super::agent_socket(dir);
        let ready = ReadyListener::bind(&vsock)?;
        if let Some(id) = identity {
            // The vsock back-end (or CH) connects to it for the guest's announcement.
            Jail::grant(id, ready.path())?;
        }
        let virtiofsd = self.virtiofsd.insert(Virtiofsd::spawn(
            &VirtiofsdOptions {
                binary: c.virtiofsd.path.clone(),
                cache: c.virtiofsd.cache.clone(),
                shared_dir: shared.export().to_path_buf(),
                socket: dir.join("virtiofsd.sock"),
                log: dir.join("virtiofsd.log"),
            },
            shared.namespace(),
            self.ledger.as_ref(),
        )?);
        let driver = self.driver.insert(hypervisor::new(
            driver_options(c, kind).await,
            self.ledger.clone(),
            &self.log,
        ));
        let accel = driver.capabilities().accel;
        let jail = identity.map(|id| Identity {
            kvm_gid: (accel == Accel::Kvm).then(kvm_group).flatten(),
            ..id
        });
        self.ledger.note(|s| {
            if let Some(info) = &mut s.info {
                info.accel = Some(accel);
            }
        });
        // Room for the vCPUs a resize may add, where the backend hot-plugs them.
        let max_vcpus = match driver.capabilities().cpu_hotplug {
            true => c.max_vcpus.max(cfg.vcpus),
            false => cfg.vcpus,
        };
        let spec = VmSpec {
            id: cfg.id.clone(),
            dir: dir.to_path_buf(),
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            kernel_args: cfg.guest_kernel_args(),
            vcpus: cfg.vcpus,
            max_vcpus,
            memory_mib: cfg.memory_mib,
            free_page_reporting: c.free_page_reporting,
            share: Some(ShareDevice {
                tag: SHARE_TAG.into(),
                socket: dir.join("virtiofsd.sock"),
                backend: virtiofsd.exit_watch(),
            }),
            vsock: VsockDevice {
                cid: GUEST_CID,
                socket: vsock.clone(),
            },
            nets: network
                .as_ref()
                .map(|n| n.devices.clone())
                .unwrap_or_default(),
            console_log: dir.join("console.log"),
            jail,
        };
        // virtiofsd comes up while the driver prepares its own back-ends.
        driver.prepare(&spec).await?;
        virtiofsd.ready(c.timeouts.vm_start).await?;
        let daemons_ready = started.elapsed();
        driver.start().await?;
        let vmm_running = started.elapsed();
        // The VM's end as the sandbox sees it: the driver's (VMM or its back-ends),
        // virtiofsd's, or the agent link's, whichever comes first.
        let vm_end = VmEnd::new();
        vm_end.follow(driver.exit_watch());
        let virtiofsd_log = dir.join("virtiofsd.log");
        vm_end.watch_backend(virtiofsd.exit_watch(), move |status| {
            format!(
                "virtiofsd exited ({}): {}",
                describe_status(status),
                logtail::last_line(&virtiofsd_log)
            )
        });
        let mut end = vm_end.subscribe();
        console::bound(spec.console_log.clone(), end.clone());
        console::bound_daemon_logs(
            DAEMON_LOGS.iter().map(|f| dir.join(f)).collect(),
            end.clone(),
        );

        let timeout = c.timeouts.agent_ready;
        let console = || logtail::quoted(&spec.console_log, CONSOLE_TAIL);
        tokio::select! {
            r = ready.wait_ready(timeout) => {
                if r.is_err() {
                    return Err(SandboxError::NotReady { timeout, console: console() });
                }
            }
            exit = end.wait_for(Option::is_some) => {
                let exit = exit.ok().and_then(|e| e.clone()).unwrap_or_else(|| VmExit {
                    status: None,
                    reason: "unknown".into(),
                });
                return Err(SandboxError::VmExited { exit, console: console() });
            }
        }
        drop(ready);
        driver.guest_ready();
        let times = BootTimes {
            daemons_ready,
            vmm_running,
            agent_ready: started.elapsed(),
        };
        self.ledger.note(|s| s.boot = Some(times.into()));
        let agent = AgentClient::connect(&vsock, c.timeouts.agent_call).await?;
        CallStats::persist_until(
            agent.stats().clone(),
            dir.join(CALL_STATS_FILE),
            end.clone(),
        );
        let link = agent.clone();
        vm_end.on(BACKEND_GRACE, async move {
            VmExit {
                status: None,
                reason: format!(
                    "the link to the agent was lost: {}",
                    link.wait_broken().await
                ),
            }
        });
        let mut pod = network.map(|n| n.guest).unwrap_or_default();
        pod.sysctls = cfg
            .sysctls
            .iter()
            .map(|(name, value)| Sysctl {
                name: name.clone(),
                value: value.clone(),
                ..Default::default()
            })
            .collect();
        pod.pod = cfg.pod_name.is_some();
        if pod != ConfigureNetworkRequest::default() {
            agent.configure_network(pod).await?;
        }
        if let Some(netns) = &cfg.netns {
            // Not worth failing the pod for: it runs without, and containerd's forwards are
            // refused (docs/operating.md).
            match PortForward::start(netns, agent.clone(), &self.log).await {
                Ok(pf) => self.port_forward = Some(pf),
                Err(e) => warn!(self.log, "port-forward unavailable"; "error" => %e),
            }
        }
        info!(self.log, "sandbox ready"; "agent_ready_ms" => times.agent_ready.as_millis() as u64,
            "daemons_ready_ms" => times.daemons_ready.as_millis() as u64,
            "vmm_running_ms" => times.vmm_running.as_millis() as u64,
            "hypervisor" => ?driver.kind(), "accel" => ?driver.capabilities().accel);
        Ok((agent, end, times))
    }

    /// Undoes a failed boot: processes first (gracelessly), then every host resource.
    async fn undo(&mut self, dir: &Path) {
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.stop(std::time::Duration::ZERO).await;
        }
        if let Some(virtiofsd) = self.virtiofsd.take() {
            virtiofsd.stop(std::time::Duration::ZERO).await;
        }
        if let Some(shared) = &self.shared {
            shared.close();
        }
        let state = self.ledger.snapshot();
        if let (Some(cg), Some(previous)) = (&state.cgroup, &self.cgroup_previous) {
            cg.leave(std::process::id(), previous);
        }
        if let Err(e) = cleanup::release(dir, &state, &self.log).await {
            warn!(self.log, "teardown after a failed start is incomplete"; "error" => %e);
        }
    }
}

/// The ledger as the boot begins: what the sandbox is and where its logs will go.
fn initial_state(cfg: &SandboxConfig, hypervisor: HypervisorKind) -> State {
    let c = &cfg.config;
    State {
        id: cfg.id.clone(),
        info: Some(SandboxInfo {
            pod_namespace: cfg.pod_namespace.clone(),
            pod_name: cfg.pod_name.clone(),
            hypervisor,
            accel: None,
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            debug_console: c.debug_console,
            owner: Some(RecordedPid::me()),
        }),
        logs: (c.log_retention > 0).then(|| LogRetention {
            dir: c.log_dir.clone(),
            keep: c.log_retention,
        }),
        ..Default::default()
    }
}

/// Shares the host's static busybox with the guest for `shoji console` (read-only). A
/// debugging aid never fails a boot: without it the agent says the shell is missing.
fn share_debug_shell(shared: &SharedDir, log: &Logger) {
    let busybox = std::path::Path::new(crate::cli::rootfs::BUSYBOX);
    let mode = BindMode {
        recursive: false,
        read_only: ReadOnly::Top,
        propagation: Propagation::Private,
    };
    if let Err(e) = shared.bind(busybox, std::path::Path::new(DEBUG_SHELL_REL), mode) {
        warn!(log, "the debug console will have no shell"; "error" => %e);
    }
}

/// The driver for the chosen hypervisor, and how it runs its VMM.
async fn driver_options(c: &Config, kind: HypervisorKind) -> DriverOptions {
    match kind {
        HypervisorKind::Qemu => {
            let (accel, accel_reason) = crate::kvm::qemu_accel(c.qemu.accel).await;
            DriverOptions::Qemu(QemuOptions {
                binary: c.qemu.path.clone(),
                vhost_vsock: c.vhost_device_vsock.path.clone(),
                accel,
                accel_reason,
                tcg_tb_size_mib: c.qemu.tcg_tb_size_mib,
                start_timeout: c.timeouts.vm_start,
            })
        }
        HypervisorKind::Clh => DriverOptions::Clh(ClhOptions {
            start_timeout: c.timeouts.vm_start,
            ..ClhOptions::new(c.clh.path.clone())
        }),
    }
}

/// The group that owns /dev/kvm: a jailed VMM opens it as a member.
fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { context, source }
}
