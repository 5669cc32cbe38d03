//! The containers and processes of one pod, on top of the pod's [`Sandbox`] (its VM).
//!
//! The Task service calls one method here per containerd request. The first container of
//! the shim (CRI's pause container, or a plain `ctr run` container that is its own pod)
//! boots the VM; CRI containers of the same pod join it. Each started process has one
//! waiter task that turns the agent's WaitProcess answer into the process's exit and a
//! TaskExit event (after its output was copied out); a VM that dies ends every process.
mod process;
pub mod spec;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use containerd_shim_protos::{
    cgroups_v2::metrics::{CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat},
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
        TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::MessageField,
    types::task::Status,
};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use shoji_agent_api::types::{CreateContainerRequest, ExecProcessRequest, Rootfs};
use slog::{info, warn, Logger};
use tokio::sync::OnceCell;

pub use self::process::{Exit, Process};
use self::spec::Role;
use crate::{
    agent_client::AgentError,
    bootstrap::SANDBOX_DIR_FILE,
    config::Config,
    events::EventSender,
    host_cgroup::{self, CgroupError, PodCgroup},
    io::{IoError, ProcessIo, StdioPaths},
    network::{self, NetworkError, PodNetwork},
    sandbox::{Mount, Sandbox, SandboxConfig, SandboxError},
};

/// Exit status reported for processes that were running when their VM went away.
pub const VM_GONE_STATUS: u32 = 255;
/// How long a process's output may still be copied out after the agent reported its exit.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("process {exec_id} of container {container_id} not found")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("exec {exec_id} already exists in container {container_id}")]
    ExecExists {
        container_id: String,
        exec_id: String,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0} is not supported by shoji")]
    Unsupported(&'static str),
    #[error("cannot read the OCI spec {path}: {why}")]
    Spec { path: PathBuf, why: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

pub type Result<T, E = PodError> = std::result::Result<T, E>;

/// What containerd asks for in Create.
pub struct CreateRequest {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioPaths,
    /// The runtime's `ConfigPath` option, when containerd passed one.
    pub config_path: Option<PathBuf>,
}

/// What containerd asks for in Exec.
pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// An OCI Process, as JSON.
    pub process_json: Vec<u8>,
}

struct Container {
    id: String,
    bundle: PathBuf,
    role: Role,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: Mutex<bool>,
}

impl Container {
    /// Whether a guest container exists for it (the pause container has none).
    fn in_guest(&self) -> bool {
        self.role != Role::PodSandbox
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| PodError::ProcessNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.into(),
            })
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(self.execs.lock().unwrap().values().cloned());
        all
    }
}

/// State and status of one process, for containerd's State call.
pub struct ProcessState {
    pub bundle: PathBuf,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub exit: Option<Exit>,
}

pub struct Pod {
    namespace: String,
    log: Logger,
    events: EventSender,
    sandbox: OnceCell<Arc<Sandbox>>,
    /// The container whose Create booted the VM; deleting it tears the VM down.
    owner: Mutex<Option<String>>,
    /// The pod's network namespace and what was set up in it for the VM.
    network: Mutex<Option<(PathBuf, PodNetwork)>>,
    /// The host cgroup holding the shim, the VMM and its daemons.
    cgroup: Mutex<Option<PodCgroup>>,
    started: Instant,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl Pod {
    /// `started`: when the shim process started (for the start-up timings it logs).
    pub fn new(namespace: &str, events: EventSender, log: Logger, started: Instant) -> Arc<Pod> {
        Arc::new(Pod {
            namespace: namespace.into(),
            log,
            events,
            sandbox: OnceCell::new(),
            owner: Mutex::new(None),
            network: Mutex::new(None),
            cgroup: Mutex::new(None),
            started,
            containers: Mutex::new(HashMap::new()),
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| PodError::ContainerNotFound(id.into()))
    }

    fn sandbox(&self) -> Result<&Arc<Sandbox>> {
        self.sandbox
            .get()
            .ok_or_else(|| PodError::FailedPrecondition("the pod's VM is not running".into()))
    }

    /// Host pid containerd sees for every task of the pod: the VMM's.
    pub async fn vmm_pid(&self) -> u32 {
        match self.sandbox.get() {
            Some(s) => s.vmm_pid().await.unwrap_or(0),
            None => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.containers.lock().unwrap().is_empty()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Create: boots the VM for the first container of the pod, then creates the container
    /// in it (the pause container gets nothing in the guest). Returns the task's pid.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<u32> {
        let began = Instant::now();
        let spec_path = req.bundle.join("config.json");
        let spec = Spec::load(&spec_path).map_err(|e| PodError::Spec {
            path: spec_path.clone(),
            why: e.to_string(),
        })?;
        if self.containers.lock().unwrap().contains_key(&req.id) {
            return Err(PodError::ContainerExists(req.id));
        }
        let role = spec::role(&spec);
        match &role {
            Role::PodMember { sandbox_id } => {
                if self.sandbox.get().is_none() {
                    return Err(PodError::FailedPrecondition(format!(
                        "pod sandbox {sandbox_id} is not running in this shim"
                    )));
                }
            }
            Role::PodSandbox | Role::Standalone => self.boot(&req, &spec).await?,
        }
        let init = Process::new(&req.id, "", req.stdio.clone());
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            role,
            init: init.clone(),
            execs: Mutex::new(HashMap::new()),
            paused: Mutex::new(false),
        });
        if container.in_guest() {
            match self.create_in_guest(&req, spec).await {
                Ok(io) => init.set_io(io),
                Err(e) => {
                    self.remove_from_guest(&req.id).await;
                    if self.owner.lock().unwrap().as_deref() == Some(req.id.as_str()) {
                        self.stop_vm().await;
                    }
                    return Err(e);
                }
            }
        }
        self.containers
            .lock()
            .unwrap()
            .insert(req.id.clone(), container);
        let pid = self.vmm_pid().await;
        self.events.task_create(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.display().to_string(),
            rootfs: Vec::new(),
            io: MessageField::some(TaskIO {
                stdin: req.stdio.stdin.clone(),
                stdout: req.stdio.stdout.clone(),
                stderr: req.stdio.stderr.clone(),
                terminal: req.stdio.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        // Phase timings, read by hack/bench-ctr.sh for the start-up breakdown.
        info!(self.log, "container created"; "container" => &req.id,
            "create_ms" => began.elapsed().as_millis() as u64,
            "since_shim_start_ms" => self.started.elapsed().as_millis() as u64);
        Ok(pid)
    }

    async fn boot(self: &Arc<Self>, req: &CreateRequest, spec: &Spec) -> Result<()> {
        if self.sandbox.get().is_some() {
            return Err(PodError::FailedPrecondition(format!(
                "container {} would start a second VM in this shim's pod",
                req.id
            )));
        }
        let config = Config::load_from(req.config_path.as_deref())?;
        let default = spec::VmSize {
            vcpus: config.default_vcpus,
            memory_mib: config.default_memory_mib,
        };
        let size = spec::vm_size(spec, default, config.memory_overhead_mib);
        let sandbox_id = spec::grouping(spec, &req.id);
        let mut cfg = SandboxConfig::new(&sandbox_id, config);
        cfg.vcpus = size.vcpus;
        cfg.memory_mib = size.memory_mib;
        cfg.hostname = spec.hostname().clone();
        let network = match spec::network_namespace(spec) {
            // setup removes what it made when it fails half-way.
            Some(netns) => Some((netns.clone(), network::setup(&netns).await?)),
            None => None,
        };
        if let Some((_, net)) = &network {
            cfg.nets = net.devices.clone();
        }
        info!(self.log, "booting the pod's VM"; "sandbox" => &sandbox_id, "vcpus" => size.vcpus, "memory_mib" => size.memory_mib, "nics" => cfg.nets.len());
        let mut cgroup = None;
        let started = async {
            // The VMM and its daemons are born in the pod cgroup: the shim joins it first.
            let cgroups_path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
            if let Some(path) = cgroups_path
                .as_ref()
                .and_then(|p| p.to_str())
                .filter(|p| host_cgroup::supported(p))
            {
                cgroup = Some(PodCgroup::enter(path, std::process::id()).await?);
            }
            let sandbox = Arc::new(Sandbox::start(cfg, self.log.clone()).await?);
            let configured = match &network {
                Some((_, net)) => sandbox
                    .agent()
                    .configure_network(net.guest.clone())
                    .await
                    .map_err(PodError::from),
                None => Ok(()),
            };
            // A second Create racing this one boots no second VM.
            let claimed = configured.and_then(|()| {
                self.sandbox.set(sandbox.clone()).map_err(|_| {
                    PodError::FailedPrecondition("the pod's VM is already being created".into())
                })
            });
            if let Err(e) = claimed {
                let _ = sandbox.stop().await;
                return Err(e);
            }
            Ok::<_, PodError>(sandbox)
        }
        .await;
        let sandbox = match started {
            Ok(s) => s,
            Err(e) => {
                if let Some((netns, net)) = &network {
                    network::teardown(netns, net).await;
                }
                if let Some(cg) = &cgroup {
                    let _ = cg.leave().await;
                }
                return Err(e);
            }
        };
        *self.network.lock().unwrap() = network;
        *self.cgroup.lock().unwrap() = cgroup;
        *self.owner.lock().unwrap() = Some(req.id.clone());
        // Lets `containerd-shim-shoji-v2 delete` find the VM if this shim dies.
        if let Err(e) = std::fs::write(
            req.bundle.join(SANDBOX_DIR_FILE),
            sandbox.dir().as_os_str().as_encoded_bytes(),
        ) {
            warn!(self.log, "cannot record the sandbox directory in the bundle"; "error" => %e);
        }
        tokio::spawn(self.clone().watch_vm(sandbox.clone()));
        tokio::spawn(self.clone().forward_ooms(sandbox));
        Ok(())
    }

    /// Mounts the rootfs and volumes, creates the container in the guest and attaches its
    /// init's stdio (before it starts, so no output is missed).
    async fn create_in_guest(&self, req: &CreateRequest, mut spec: Spec) -> Result<ProcessIo> {
        let sandbox = self.sandbox()?;
        let rootfs_mounts = if req.rootfs.is_empty() {
            // containerd mounted the rootfs into the bundle itself.
            vec![Mount::host_dir(&req.bundle.join("rootfs"), false)]
        } else {
            req.rootfs.clone()
        };
        let rootfs = sandbox.mount_rootfs(&req.id, &rootfs_mounts)?;
        self.share_volumes(sandbox, &req.id, &mut spec)?;
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if terminal != req.stdio.terminal {
            return Err(PodError::InvalidArgument(format!(
                "terminal mismatch: the spec says {terminal}, the request {}",
                req.stdio.terminal
            )));
        }
        let spec_json =
            serde_json::to_vec(&spec).map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        sandbox
            .agent()
            .create_container(CreateContainerRequest {
                container_id: req.id.clone(),
                spec_json,
                rootfs: MessageField::some(Rootfs {
                    source: rootfs,
                    guest_overlay: true,
                    ..Default::default()
                }),
                terminal,
                stdin: req.stdio.has_stdin(),
                ..Default::default()
            })
            .await?;
        self.attach_io(&req.id, "", &req.stdio).await
    }

    /// Rewrites the spec's bind mounts (volumes, /etc/hosts, ...) to their guest paths,
    /// mounting each host source under the shared directory.
    fn share_volumes(&self, sandbox: &Sandbox, container_id: &str, spec: &mut Spec) -> Result<()> {
        let Some(mounts) = spec.mounts().clone() else {
            return Ok(());
        };
        let mut rewritten = Vec::with_capacity(mounts.len());
        for (i, mut m) in mounts.into_iter().enumerate() {
            if spec::is_host_bind(&m) {
                let source = m.source().clone().ok_or_else(|| {
                    PodError::InvalidArgument(format!(
                        "bind mount {} has no source",
                        m.destination().display()
                    ))
                })?;
                if !source.exists() {
                    return Err(PodError::InvalidArgument(format!(
                        "source {} of the mount at {} does not exist",
                        source.display(),
                        m.destination().display()
                    )));
                }
                let guest = sandbox.mount_volume(
                    container_id,
                    &format!("m{i}"),
                    &source,
                    spec::is_read_only(&m),
                )?;
                m.set_source(Some(PathBuf::from(guest)));
            }
            rewritten.push(m);
        }
        spec.set_mounts(Some(rewritten));
        Ok(())
    }

    async fn attach_io(
        &self,
        container_id: &str,
        exec_id: &str,
        stdio: &StdioPaths,
    ) -> Result<ProcessIo> {
        let agent = self.sandbox()?.agent();
        let mut streams = Vec::new();
        for kind in stdio.stream_kinds() {
            streams.push((kind, agent.open_stream(kind, container_id, exec_id).await?));
        }
        Ok(ProcessIo::start(stdio, streams, &self.log).await?)
    }

    /// Start: runs the container's init (or an exec) and starts waiting for its exit.
    pub async fn start(self: &Arc<Self>, container_id: &str, exec_id: &str) -> Result<u32> {
        let container = self.container(container_id)?;
        let process = container.process(exec_id)?;
        if !process.is_created() {
            return Err(PodError::FailedPrecondition(format!(
                "process {container_id}/{exec_id} was already started"
            )));
        }
        let pid = self.vmm_pid().await;
        if !container.in_guest() {
            process.set_running(0);
            self.events.task_start(TaskStart {
                container_id: container_id.into(),
                pid,
                ..Default::default()
            });
            return Ok(pid);
        }
        let began = Instant::now();
        let guest_pid = self
            .sandbox()?
            .agent()
            .start_process(container_id, exec_id)
            .await?;
        process.set_running(guest_pid);
        info!(self.log, "process started"; "container" => container_id, "exec" => exec_id,
            "start_ms" => began.elapsed().as_millis() as u64,
            "since_shim_start_ms" => self.started.elapsed().as_millis() as u64);
        if exec_id.is_empty() {
            self.events.task_start(TaskStart {
                container_id: container_id.into(),
                pid,
                ..Default::default()
            });
        } else {
            self.events.exec_started(TaskExecStarted {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
                pid,
                ..Default::default()
            });
        }
        tokio::spawn(self.clone().wait_process(process, pid));
        Ok(pid)
    }

    /// The waiter of one started process: exit from the agent, then its output, then TaskExit.
    async fn wait_process(self: Arc<Self>, process: Arc<Process>, pid: u32) {
        let Ok(sandbox) = self.sandbox() else { return };
        let exit = match sandbox
            .agent()
            .wait_process(&process.container_id, &process.exec_id)
            .await
        {
            Ok(w) => Exit {
                status: w.exit_status as u32,
                at_secs: w.exited_at_secs,
                at_nanos: w.exited_at_nanos,
            },
            Err(e) => {
                // The VM watcher reports processes of a VM that died; anything else is logged.
                warn!(self.log, "waiting for a process failed"; "container" => &process.container_id, "exec" => &process.exec_id, "error" => %e);
                Exit::now(VM_GONE_STATUS)
            }
        };
        if let Some(io) = process.io() {
            if tokio::time::timeout(OUTPUT_DRAIN, io.wait_output())
                .await
                .is_err()
            {
                warn!(self.log, "output still open after exit, not waiting longer"; "container" => &process.container_id);
            }
        }
        self.report_exit(&process, exit, pid);
    }

    fn report_exit(&self, process: &Process, exit: Exit, pid: u32) {
        if process.set_exited(exit.clone()) {
            self.events.task_exit(TaskExit {
                container_id: process.container_id.clone(),
                id: if process.exec_id.is_empty() {
                    process.container_id.clone()
                } else {
                    process.exec_id.clone()
                },
                pid,
                exit_status: exit.status,
                exited_at: exit.timestamp(),
                ..Default::default()
            });
        }
    }

    /// Ends every process of a VM that went away, so Wait and containerd learn of it.
    async fn watch_vm(self: Arc<Self>, sandbox: Arc<Sandbox>) {
        let exit = sandbox.wait_exit().await;
        let running: Vec<_> = self
            .containers
            .lock()
            .unwrap()
            .values()
            .flat_map(|c| c.all_processes())
            .filter(|p| p.exit().is_none())
            .collect();
        if !running.is_empty() {
            warn!(self.log, "the pod's VM exited"; "reason" => &exit.reason, "status" => ?exit.status, "processes" => running.len());
        }
        for p in running {
            self.report_exit(&p, Exit::now(VM_GONE_STATUS), 0);
        }
    }

    async fn forward_ooms(self: Arc<Self>, sandbox: Arc<Sandbox>) {
        loop {
            tokio::select! {
                _ = sandbox.wait_exit() => return,
                r = sandbox.agent().wait_oom_event() => match r {
                    Ok(container_id) => self.events.task_oom(TaskOOM { container_id, ..Default::default() }),
                    Err(e) => {
                        // Normal when the VM shuts down: the agent closes its connection first.
                        info!(self.log, "OOM event stream ended"; "error" => %e);
                        return;
                    }
                }
            }
        }
    }

    /// Exec: adds a process to a running container; Start runs it.
    pub async fn exec(&self, req: ExecRequest) -> Result<()> {
        let container = self.container(&req.container_id)?;
        if !container.in_guest() {
            return Err(PodError::FailedPrecondition(format!(
                "container {} is a pod sandbox: it has no processes to exec into",
                req.container_id
            )));
        }
        if !container.init.is_running() {
            return Err(PodError::FailedPrecondition(format!(
                "container {} is not running",
                req.container_id
            )));
        }
        let oci: OciProcess = serde_json::from_slice(&req.process_json)
            .map_err(|e| PodError::InvalidArgument(format!("exec process spec: {e}")))?;
        let terminal = oci.terminal().unwrap_or(false);
        if container.execs.lock().unwrap().contains_key(&req.exec_id) {
            return Err(PodError::ExecExists {
                container_id: req.container_id,
                exec_id: req.exec_id,
            });
        }
        let process = Process::new(
            &req.container_id,
            &req.exec_id,
            StdioPaths {
                terminal,
                ..req.stdio
            },
        );
        container
            .execs
            .lock()
            .unwrap()
            .insert(req.exec_id.clone(), process.clone());
        let created = async {
            self.sandbox()?
                .agent()
                .exec_process(ExecProcessRequest {
                    container_id: req.container_id.clone(),
                    exec_id: req.exec_id.clone(),
                    process_json: req.process_json,
                    terminal,
                    stdin: process.stdio.has_stdin(),
                    ..Default::default()
                })
                .await?;
            process.set_io(
                self.attach_io(&req.container_id, &req.exec_id, &process.stdio)
                    .await?,
            );
            Ok::<_, PodError>(())
        }
        .await;
        if let Err(e) = created {
            container.execs.lock().unwrap().remove(&req.exec_id);
            return Err(e);
        }
        self.events.exec_added(TaskExecAdded {
            container_id: req.container_id,
            exec_id: req.exec_id,
            ..Default::default()
        });
        Ok(())
    }

    pub async fn state(&self, container_id: &str, exec_id: &str) -> Result<ProcessState> {
        let container = self.container(container_id)?;
        let process = container.process(exec_id)?;
        let paused = *container.paused.lock().unwrap();
        Ok(ProcessState {
            bundle: container.bundle.clone(),
            pid: self.vmm_pid().await,
            status: process.status(paused),
            stdio: process.stdio.clone(),
            exit: process.exit(),
        })
    }

    pub async fn wait(&self, container_id: &str, exec_id: &str) -> Result<Exit> {
        let process = self.container(container_id)?.process(exec_id)?;
        Ok(process.wait().await)
    }

    /// Kill: signals a process (or, with `all`, every process of the container).
    pub async fn kill(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let container = self.container(container_id)?;
        let process = container.process(exec_id)?;
        if process.exit().is_some() {
            return Err(PodError::ProcessNotFound {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
            });
        }
        if !container.in_guest() {
            // The pause container stands for the pod: any terminating signal ends it.
            let pid = self.vmm_pid().await;
            self.report_exit(&process, Exit::now(128 + signal), pid);
            return Ok(());
        }
        match self
            .sandbox()?
            .agent()
            .signal_process(container_id, exec_id, signal, all)
            .await
        {
            Err(e) if e.is_not_found() => Err(PodError::ProcessNotFound {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
            }),
            r => Ok(r?),
        }
    }

    /// Delete: removes an exited (or never started) process; for the init process, the
    /// container in the guest, its mounts, and — for the container that booted it — the VM.
    pub async fn delete(&self, container_id: &str, exec_id: &str) -> Result<Exit> {
        let container = self.container(container_id)?;
        let process = container.process(exec_id)?;
        if process.is_running() {
            return Err(PodError::FailedPrecondition(format!(
                "process {container_id}/{} is still running",
                if exec_id.is_empty() { "init" } else { exec_id }
            )));
        }
        let exit = process.exit().unwrap_or_else(|| Exit::now(0));
        let pid = self.vmm_pid().await;
        // Releases a stdin FIFO whose writer never came (its open would block forever).
        let released = if exec_id.is_empty() {
            container.all_processes()
        } else {
            vec![process.clone()]
        };
        for p in released {
            if let Some(io) = p.io() {
                io.close_stdin();
            }
        }
        if !exec_id.is_empty() {
            container.execs.lock().unwrap().remove(exec_id);
            return Ok(exit);
        }
        if container.in_guest() {
            self.remove_from_guest(container_id).await;
        }
        self.containers.lock().unwrap().remove(container_id);
        if self.owner.lock().unwrap().as_deref() == Some(container_id) {
            self.stop_vm().await;
        }
        self.events.task_delete(TaskDelete {
            container_id: container_id.into(),
            id: container_id.into(),
            pid,
            exit_status: exit.status,
            exited_at: exit.timestamp(),
            ..Default::default()
        });
        Ok(exit)
    }

    /// Removes a container from the guest and its mounts from the host; failures are logged
    /// (a VM that is gone has nothing left to remove).
    async fn remove_from_guest(&self, container_id: &str) {
        let Ok(sandbox) = self.sandbox() else { return };
        if let Err(e) = sandbox.agent().remove_container(container_id).await {
            warn!(self.log, "removing the container in the guest failed"; "container" => container_id, "error" => %e);
        }
        if let Err(e) = sandbox.unmount_container(container_id) {
            warn!(self.log, "unmounting the container failed"; "container" => container_id, "error" => %e);
        }
    }

    /// Stops the VM and unplugs it from the pod network. Idempotent.
    pub async fn stop_vm(&self) {
        if let Some(sandbox) = self.sandbox.get() {
            if let Err(e) = sandbox.stop().await {
                warn!(self.log, "stopping the pod's VM failed"; "error" => %e);
            }
        }
        let network = self.network.lock().unwrap().take();
        if let Some((netns, net)) = network {
            network::teardown(&netns, &net).await;
        }
        let cgroup = self.cgroup.lock().unwrap().take();
        if let Some(cg) = cgroup {
            if let Err(e) = cg.leave().await {
                warn!(self.log, "removing the pod cgroup failed"; "error" => %e);
            }
        }
    }

    pub async fn pause(&self, container_id: &str) -> Result<()> {
        let container = self.container(container_id)?;
        if container.in_guest() {
            self.sandbox()?
                .agent()
                .pause_container(container_id)
                .await?;
        }
        *container.paused.lock().unwrap() = true;
        self.events.task_paused(TaskPaused {
            container_id: container_id.into(),
            ..Default::default()
        });
        Ok(())
    }

    pub async fn resume(&self, container_id: &str) -> Result<()> {
        let container = self.container(container_id)?;
        if container.in_guest() {
            self.sandbox()?
                .agent()
                .resume_container(container_id)
                .await?;
        }
        *container.paused.lock().unwrap() = false;
        self.events.task_resumed(TaskResumed {
            container_id: container_id.into(),
            ..Default::default()
        });
        Ok(())
    }

    /// Guest pids of the container's processes.
    pub async fn pids(&self, container_id: &str) -> Result<Vec<u32>> {
        let container = self.container(container_id)?;
        if !container.in_guest() {
            return Ok(Vec::new());
        }
        Ok(self.sandbox()?.agent().list_processes(container_id).await?)
    }

    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let container = self.container(container_id)?;
        container.process(exec_id)?;
        Ok(self
            .sandbox()?
            .agent()
            .resize_tty(container_id, exec_id, width, height)
            .await?)
    }

    pub fn close_io(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let process = self.container(container_id)?.process(exec_id)?;
        if let Some(io) = process.io() {
            io.close_stdin();
        }
        Ok(())
    }

    /// Update: new cgroup limits (LinuxResources JSON) for a container.
    pub async fn update(&self, container_id: &str, resources_json: &[u8]) -> Result<()> {
        let container = self.container(container_id)?;
        serde_json::from_slice::<LinuxResources>(resources_json)
            .map_err(|e| PodError::InvalidArgument(format!("resources: {e}")))?;
        if !container.in_guest() {
            return Ok(());
        }
        Ok(self
            .sandbox()?
            .agent()
            .update_container(container_id, resources_json.to_vec())
            .await?)
    }

    /// Stats as containerd's cgroup v2 metrics, from the container's cgroup in the guest.
    pub async fn stats(&self, container_id: &str) -> Result<Metrics> {
        let container = self.container(container_id)?;
        if !container.in_guest() {
            return Ok(Metrics::default());
        }
        let s = self
            .sandbox()?
            .agent()
            .container_stats(container_id)
            .await?;
        Ok(Metrics {
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                nr_periods: s.cpu_nr_periods,
                nr_throttled: s.cpu_nr_throttled,
                throttled_usec: s.cpu_throttled_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: s.memory_usage_bytes,
                usage_limit: s.memory_limit_bytes,
                max_usage: s.memory_max_usage_bytes,
                anon: s.memory_rss_bytes,
                file: s.memory_cache_bytes,
                inactive_file: s
                    .memory_usage_bytes
                    .saturating_sub(s.memory_working_set_bytes),
                ..Default::default()
            }),
            memory_events: MessageField::some(MemoryEvents {
                oom_kill: s.oom_kill_count,
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// The runtime options containerd passes in Create: `runtimeoptions.v1.Options`
/// (`type_url = 1, config_path = 2, config_body = 3`), which has no Rust binding in
/// containerd-shim-protos. Returns the ConfigPath when present.
pub fn config_path_option(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = containerd_shim_protos::protobuf::CodedInputStream::from_bytes(value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            return input
                .read_string()
                .ok()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
        }
        let skipped = match wire {
            0 => input.read_uint64().map(drop),
            1 => input.read_fixed64().map(drop),
            2 => input.read_bytes().map(drop),
            5 => input.read_fixed32().map(drop),
            _ => return None,
        };
        skipped.ok()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_is_read_from_runtime_options() {
        // field 1 (type_url) = "x", field 2 (config_path) = "/etc/shoji/a.toml"
        let mut v = vec![0x0a, 1, b'x', 0x12, 17];
        v.extend_from_slice(b"/etc/shoji/a.toml");
        assert_eq!(
            config_path_option("runtimeoptions.v1.Options", &v),
            Some(PathBuf::from("/etc/shoji/a.toml"))
        );
        assert_eq!(config_path_option("containerd.runc.v1.Options", &v), None);
        assert_eq!(
            config_path_option("runtimeoptions.v1.Options", &[0x0a, 1, b'x']),
            None
        );
    }
}
