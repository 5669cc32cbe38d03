//! The guest's container runtime: the containers, their processes, and every lifecycle
//! operation.
//!
//! The server validates nothing itself; each RPC is one method here. Container verbs that
//! need libcontainer run in helpers (`container`); cgroup work is direct (`cgroup`).
mod console;
mod create;
mod pod;
mod process;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use libcontainer::oci_spec::runtime::LinuxResources;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use shoji_agent_api::{
    types::{ContainerStatsResponse, ExecProcessRequest},
    DEBUG_CONSOLE_CONTAINER,
};
use slog::{debug, warn};

use crate::{
    cgroup,
    container::{self, guest_spec, rootfs, HelperError},
    io::{ConsoleSocket, ProcessIo, DRAIN_AFTER_EXIT},
    logger::log,
    oom::OomWatcher,
    reaper::{Exit, Reaper},
};

pub use self::console::DebugConsoles;
use self::process::{prune_reported_execs, Process};

const CONTAINERS_DIR: &str = "/run/shoji/containers";
const PTY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long RemoveContainer waits for the init to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long an exec is remembered after WaitProcess reported its exit.
const EXEC_RETENTION: Duration = Duration::from_secs(60);

/// What went wrong, by the ttrpc status code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
}

impl From<guest_spec::SpecError> for RuntimeError {
    fn from(e: guest_spec::SpecError) -> Self {
        RuntimeError::InvalidArgument(e.to_string())
    }
}

fn internal<E: std::fmt::Display>(context: &str) -> impl FnOnce(E) -> RuntimeError + '_ {
    move |e| RuntimeError::Internal(format!("{context}: {e}"))
}

fn helper_err(context: String) -> impl FnOnce(HelperError) -> RuntimeError {
    move |e| RuntimeError::Internal(format!("{context}: {e}"))
}

pub struct Container {
    id: String,
    dir: PathBuf,
    rootfs: PathBuf,
    cgroup: PathBuf,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>, RuntimeError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                RuntimeError::NotFound(format!(
                    "container {:?} has no process with exec id {exec_id:?}",
                    self.id
                ))
            })
    }

    fn processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(self.execs.lock().unwrap().values().cloned());
        all
    }
}

#[derive(Default)]
struct Table {
    containers: HashMap<String, Arc<Container>>,
    /// One lock per container id, held while it is created or removed: a removal waits for
    /// a create of the same id to finish instead of failing or interleaving with it.
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

pub struct Runtime {
    reaper: Arc<Reaper>,
    table: Mutex<Table>,
    pod: pod::Pod,
    pub oom: OomWatcher,
    consoles: DebugConsoles,
}

impl Runtime {
    /// `debug_console`: the host allowed debug consoles at boot (`shoji.debug_console=1`).
    pub fn new(reaper: Arc<Reaper>, oom: OomWatcher, debug_console: bool) -> Runtime {
        Runtime {
            reaper,
            table: Mutex::new(Table::default()),
            pod: pod::Pod::default(),
            oom,
            consoles: DebugConsoles::new(debug_console),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, RuntimeError> {
        self.table
            .lock()
            .unwrap()
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(format!("no container {id:?}")))
    }

    /// Process `exec_id` of container `id`, or of the debug consoles.
    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, RuntimeError> {
        if id == DEBUG_CONSOLE_CONTAINER {
            return self.consoles.process(exec_id);
        }
        self.container(id)?.process(exec_id)
    }

    pub fn process_io(&self, id: &str, exec_id: &str) -> Result<Arc<ProcessIo>, RuntimeError> {
        Ok(self.process(id, exec_id)?.io.clone())
    }

    /// Takes container `id`'s lock (waiting for a create or removal of it to finish).
    async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .table
            .lock()
            .unwrap()
            .locks
            .entry(id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Forgets `id`'s lock once nobody else holds or waits for it.
    fn unlock(&self, id: &str, guard: tokio::sync::OwnedMutexGuard<()>) {
        let mut t = self.table.lock().unwrap();
        drop(guard);
        if t.locks.get(id).is_some_and(|l| Arc::strong_count(l) == 1)
            && !t.containers.contains_key(id)
        {
            t.locks.remove(id);
        }
    }

    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<(), RuntimeError> {
        guest_spec::validate_id("exec", &req.exec_id)?;
        let c = self.container(&req.container_id)?;
        if c.init.exited().is_some() {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {:?} is not running",
                c.id
            )));
        }
        let process = guest_spec::exec_process(&req.process_json, req.terminal)?;
        guest_spec::check_executable(&c.rootfs, &process)?;
        let dir = c.dir.join("execs").join(&req.exec_id);
        let mut execs = c.execs.lock().unwrap();
        prune_reported_execs(&mut execs);
        if execs.contains_key(&req.exec_id) {
            return Err(RuntimeError::AlreadyExists(format!(
                "container {:?} already has an exec {:?}",
                c.id, req.exec_id
            )));
        }
        fs::create_dir_all(&dir).map_err(internal("creating the exec directory"))?;
        let json = serde_json::to_vec(&process).map_err(internal("serializing the process"))?;
        fs::write(dir.join("process.json"), json).map_err(internal("writing process.json"))?;
        let (pio, child) = if req.terminal {
            (ProcessIo::tty(), None)
        } else {
            let (pio, child) = ProcessIo::pipes(req.stdin).map_err(internal("stdio pipes"))?;
            (pio, Some(child))
        };
        execs.insert(
            req.exec_id.clone(),
            Arc::new(Process::new(&req.exec_id, dir, pio, child)),
        );
        Ok(())
    }

    pub async fn start_process(&self, id: &str, exec_id: &str) -> Result<u32, RuntimeError> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        {
            let mut started = p.started.lock().unwrap();
            if *started {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "process {id:?}/{exec_id:?} was already started"
                )));
            }
            *started = true;
        }
        let result = if exec_id.is_empty() {
            self.start_init(&c).await
        } else {
            self.start_exec(&c, &p).await
        };
        match result {
            Ok(pid) => {
                p.io.discard_unattached_later();
                Ok(pid as u32)
            }
            Err(e) => {
                if !exec_id.is_empty() {
                    p.mark_gone();
                }
                Err(e)
            }
        }
    }

    async fn start_init(&self, c: &Container) -> Result<i32, RuntimeError> {
        if let Some(exit) = c.init.exited() {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {:?} exited (status {}) before it was started",
                c.id, exit.status
            )));
        }
        container::start::start(&c.id)
            .await
            .map_err(|e| RuntimeError::Internal(format!("starting container {:?}: {e}", c.id)))?;
        c.init
            .pid()
            .ok_or_else(|| RuntimeError::Internal("the init has no pid".into()))
    }

    async fn start_exec(&self, c: &Container, p: &Arc<Process>) -> Result<i32, RuntimeError> {
        if c.init.exited().is_some() {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {:?} is not running",
                c.id
            )));
        }
        let child = p.child_stdio.lock().unwrap().take();
        let console = if child.is_none() {
            Some(ConsoleSocket::bind().map_err(internal("console socket"))?)
        } else {
            None
        };
        let born = std::time::Instant::now();
        let pid = container::exec::exec(
            &self.reaper,
            &c.id,
            &p.dir,
            child.as_ref().map(|c| c.fds()),
            console.as_ref().map(|c| c.path()),
        )
        .await
        .map_err(helper_err(format!(
            "exec {:?} in container {:?}",
            p.exec_id, c.id
        )))?;
        drop(child);
        // libcontainer has read it; it can be large (the argument list).
        let _ = fs::remove_file(p.dir.join("process.json"));
        p.set_pid(&self.reaper, pid, born, None);
        if let Some(console) = console {
            let master = console
                .receive(PTY_TIMEOUT)
                .await
                .map_err(internal("receiving the pty master"))?;
            p.io.set_master(master)
                .map_err(internal("keeping the pty master"))?;
        }
        Ok(pid)
    }

    /// The exit of a process, once its output was delivered (or [`DRAIN_AFTER_EXIT`] passed).
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<Exit, RuntimeError> {
        let p = self.process(id, exec_id)?;
        let mut rx = p.exit.subscribe();
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(internal("waiting for the exit"))?
            .expect("waited for Some");
        let deadline = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
        p.io.drained(deadline).await;
        p.reported.store(true, Ordering::Relaxed);
        Ok(exit)
    }

    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), RuntimeError> {
        if id == DEBUG_CONSOLE_CONTAINER {
            return self.consoles.signal(exec_id, signal);
        }
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let sig = Signal::try_from(signal as i32).map_err(|_| {
            RuntimeError::InvalidArgument(format!("{signal} is not a signal number"))
        })?;
        if all || exec_id.is_empty() {
            if !all && c.init.exited().is_some() {
                return Err(RuntimeError::NotFound(format!(
                    "container {id:?}: process already exited"
                )));
            }
            let killed = match (all, c.init.pid()) {
                (true, _) => container::kill::all(&c.cgroup, sig).await,
                (false, Some(pid)) => container::kill::one(pid, sig),
                (false, None) => Err(container::kill::KillError::Gone),
            };
            // The init may exit between the check above and the kill: that is the
            // "already exited" answer, not an internal error.
            let gone = || {
                c.init.exited().is_some()
                    || c.init
                        .pid()
                        .is_some_and(|pid| kill(Pid::from_raw(pid), None).is_err())
            };
            return match killed {
                Err(_) if gone() => Err(RuntimeError::NotFound(format!(
                    "container {id:?}: process already exited"
                ))),
                r => r.map_err(internal(&format!("signalling container {id:?}"))),
            };
        }
        let pid = match (p.pid(), p.exited()) {
            (_, Some(_)) => {
                return Err(RuntimeError::NotFound(format!(
                    "process {id:?}/{exec_id:?} already exited"
                )))
            }
            (None, None) => {
                return Err(RuntimeError::FailedPrecondition(format!(
                    "process {id:?}/{exec_id:?} was not started"
                )))
            }
            (Some(pid), None) => pid,
        };
        kill(Pid::from_raw(pid), sig).map_err(internal("kill"))
    }

    pub fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), RuntimeError> {
        let p = self.process(id, exec_id)?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        p.io.resize(clamp(width), clamp(height))
            .map_err(RuntimeError::FailedPrecondition)
    }

    /// Kills what runs, deletes the container everywhere. Unknown ids are already removed.
    /// Waits for a create of the same id to finish first, and runs to its end even if the
    /// caller stops waiting.
    pub async fn remove_container(self: &Arc<Self>, id: &str) -> Result<(), RuntimeError> {
        let runtime = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let guard = runtime.lock(&id).await;
            let removed = runtime.table.lock().unwrap().containers.remove(&id);
            if let Some(c) = removed {
                runtime.destroy(&id, &c.dir).await;
                for p in c.processes() {
                    p.mark_gone();
                }
                // Wait for the init's reaping so no exit arrives for a container that no
                // longer exists.
                let mut rx = c.init.exit.subscribe();
                if c.init.pid().is_some()
                    && tokio::time::timeout(KILL_WAIT, rx.wait_for(|e| e.is_some()))
                        .await
                        .is_err()
                {
                    warn!(log(), "container init did not die"; "container" => &id);
                }
                debug!(log(), "container removed"; "container" => &id);
            }
            runtime.unlock(&id, guard);
        })
        .await
        .map_err(internal("the removal task"))
    }

    /// Best-effort teardown of everything a container may own; logs what it cannot undo.
    /// No libcontainer helper: once every process of the cgroup is gone, what libcontainer
    /// keeps is its state directory, so killing, the cgroup and the files are done here.
    async fn destroy(&self, id: &str, dir: &Path) {
        self.oom.unwatch(id);
        let cg = cgroup::dir(id);
        if let Err(e) = cgroup::kill_all(&cg) {
            warn!(log(), "killing the container's processes failed"; "container" => id, "error" => %e);
        }
        if let Err(e) = cgroup::remove(&cg).await {
            warn!(log(), "removing the cgroup failed"; "container" => id, "error" => %e);
        }
        match fs::remove_dir_all(Path::new(container::STATE_ROOT).join(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(log(), "removing libcontainer's state failed"; "container" => id, "error" => %e)
            }
            _ => {}
        }
        if let Err(e) = rootfs::teardown(dir) {
            warn!(log(), "removing the container's files failed"; "container" => id, "error" => %e);
        }
        // virtiofsd keeps an fd for every inode the guest still caches, and the host
        // cannot unmount the container's rootfs under the share until they are forgotten.
        if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "2") {
            debug!(log(), "dropping dentry and inode caches failed"; "error" => %e);
        }
    }

    pub async fn pause(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        let c = self.container(id)?;
        cgroup::freeze(&c.cgroup, frozen)
            .await
            .map_err(internal("freezer"))
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), RuntimeError> {
        let c = self.container(id)?;
        let r: LinuxResources = serde_json::from_slice(resources_json).map_err(|e| {
            RuntimeError::InvalidArgument(format!("invalid OCI LinuxResources JSON: {e}"))
        })?;
        cgroup::update(&c.cgroup, &r).map_err(|e| RuntimeError::InvalidArgument(e.to_string()))
    }

    /// Starts the pod's pause process in the background, so the first container need not
    /// wait for it (it waits only if the pause is still starting).
    pub fn prepare_pod(self: &Arc<Self>) {
        let runtime = self.clone();
        tokio::spawn(async move {
            if let Err(e) = runtime.pod.pause().await {
                warn!(log(), "starting the pod's pause process failed"; "error" => %e);
            }
        });
    }

    pub async fn set_pod_sysctls(&self, sysctls: &[(String, String)]) -> Result<(), RuntimeError> {
        self.pod.set_sysctls(sysctls).await
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>, RuntimeError> {
        cgroup::pids(&self.container(id)?.cgroup).map_err(internal("listing processes"))
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStatsResponse, RuntimeError> {
        cgroup::stats(&self.container(id)?.cgroup).map_err(internal("reading cgroup stats"))
    }
}
