//! The boot sequence of a sandbox, holding what was made so far so that a failure at any
//! step undoes exactly that (the ledger already names it for a crash). The phases: host
//! resources, launch ([`launch`]), connect, configure the guest.
mod launch;

use std::{os::unix::fs::DirBuilderExt, path::Path, sync::Arc};

use shoji_agent_api::{
    types::{ConfigureNetworkRequest, Sysctl},
    DEBUG_SHELL_REL,
};
use slog::{info, warn, Logger};
use tokio::sync::watch;

use self::launch::Launched;
use super::{
    cleanup, pin,
    sizing::{Sizing, VmSize},
    state::{Ledger, LogRetention, RecordedPid, SandboxInfo, State},
    BootTimes, Result, Sandbox, SandboxConfig, SandboxError,
};
use crate::{
    agent_client::AgentClient,
    call_stats::{CallStats, CALL_STATS_FILE},
    host_cgroup::{self, PodCgroup, Previous},
    hypervisor::{self, Hypervisor, HypervisorKind, VmExit, BACKEND_GRACE},
    jail::{Identity, Jail, UidPool},
    logtail, network,
    port_forward::PortForward,
    sharefs::{BindMode, Propagation, ReadOnly, SharedDir, Virtiofsd},
};

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

/// What `host_resources` made that the later phases use.
struct HostSide {
    network: Option<network::PodNetwork>,
    identity: Option<Identity>,
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

    /// The boot, phase by phase; each records what it made (in `self` and the ledger) before
    /// the next begins, so `undo` finds it whichever phase failed.
    async fn run(
        &mut self,
        cfg: &SandboxConfig,
        kind: HypervisorKind,
        dir: &Path,
    ) -> Result<(AgentClient, watch::Receiver<Option<VmExit>>, BootTimes)> {
        let started = tokio::time::Instant::now();
        let host = self.host_resources(cfg, dir).await?;
        let mut vm = self.launch(cfg, kind, dir, &host, started).await?;
        let agent = self.connect(cfg, dir, &mut vm, started).await?;
        self.configure_guest(cfg, &agent, host.network).await?;
        let times = vm.times();
        self.ledger.note(|s| s.boot = Some(times.into()));
        if let Some(driver) = &self.driver {
            info!(self.log, "sandbox ready"; "agent_ready_ms" => times.agent_ready.as_millis() as u64,
                "daemons_ready_ms" => times.daemons_ready.as_millis() as u64,
                "vmm_running_ms" => times.vmm_running.as_millis() as u64,
                "hypervisor" => ?driver.kind(), "accel" => ?driver.capabilities().accel);
        }
        Ok((agent, vm.end, times))
    }

    /// The host side of the pod, before any process: the pod cgroup (the VMM and its daemons
    /// are born in it: the shim joins it first), taps and redirects in the pod's network
    /// namespace, the sandbox's uid and VMM directory, the shared directory.
    async fn host_resources(&mut self, cfg: &SandboxConfig, dir: &Path) -> Result<HostSide> {
        let record = |e| io(format!("record in {}", dir.display()))(e);
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
        if cfg.config.debug_console {
            share_debug_shell(shared, &self.log);
        }
        Ok(HostSide { network, identity })
    }

    /// Waits for the agent's announcement (or the VM's end), then connects to it.
    async fn connect(
        &mut self,
        cfg: &SandboxConfig,
        dir: &Path,
        vm: &mut Launched,
        started: tokio::time::Instant,
    ) -> Result<AgentClient> {
        let c = &cfg.config;
        let timeout = c.timeouts.agent_ready;
        let console_log = vm.console_log.clone();
        let console = || logtail::quoted(&console_log, CONSOLE_TAIL);
        let mut end = vm.end.clone();
        let ready = vm.ready.take().expect("launch bound it");
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
        if let Some(driver) = &mut self.driver {
            driver.guest_ready();
        }
        vm.agent_ready = started.elapsed();
        let agent = AgentClient::connect(&vm.vsock, c.timeouts.agent_call).await?;
        CallStats::persist_until(
            agent.stats().clone(),
            dir.join(CALL_STATS_FILE),
            vm.end.clone(),
        );
        let link = agent.clone();
        vm.vm_end.on(BACKEND_GRACE, async move {
            VmExit {
                status: None,
                reason: format!(
                    "the link to the agent was lost: {}",
                    link.wait_broken().await
                ),
            }
        });
        Ok(agent)
    }

    /// The guest's side of the pod: its network and sysctls, and port-forward into it.
    async fn configure_guest(
        &mut self,
        cfg: &SandboxConfig,
        agent: &AgentClient,
        network: Option<network::PodNetwork>,
    ) -> Result<()> {
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
        Ok(())
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

fn io(context: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { context, source }
}
