//! The guest's container runtime: the containers, their processes, and every lifecycle
//! operation, one verb per file.
//!
//! The server validates nothing itself; each RPC is one method here. The runtime keeps the
//! rules; what it asks of the guest kernel and libcontainer goes through [`GuestOs`]
//! (`guest_os.rs`), faked in the unit tests (`tests.rs`).
mod console;
mod create;
mod exec;
#[cfg(test)]
mod fake;
mod guest_os;
mod pause;
mod pod;
mod process;
mod remove;
mod resize;
mod signal;
mod start;
mod stats;
#[cfg(test)]
mod tests;
mod update;
mod wait;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use shoji_agent_api::DEBUG_CONSOLE_CONTAINER;

use crate::{
    container::{guest_spec, HelperError},
    io::ProcessIo,
    oom::OomWatcher,
};

use self::process::Process;
pub use self::{
    console::DebugConsoles,
    guest_os::{GuestOs, LinuxGuest},
};

/// Where the agent keeps its runtime files in the guest.
pub const RUN_DIR: &str = "/run/shoji";

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
    os: Arc<dyn GuestOs>,
    /// Holds `containers/<id>` (a container's bundle, rootfs and execs) and `console/`.
    run_dir: PathBuf,
    table: Mutex<Table>,
    pod: pod::Pod,
    pub oom: OomWatcher,
    consoles: DebugConsoles,
}

impl Runtime {
    /// `run_dir`: see [`RUN_DIR`]. `debug_console`: the host allowed debug consoles at boot
    /// (`shoji.debug_console=1`).
    pub fn new(
        os: Arc<dyn GuestOs>,
        run_dir: &Path,
        oom: OomWatcher,
        debug_console: bool,
    ) -> Runtime {
        Runtime {
            os,
            run_dir: run_dir.to_path_buf(),
            table: Mutex::new(Table::default()),
            pod: pod::Pod::default(),
            oom,
            consoles: DebugConsoles::new(debug_console),
        }
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join("containers").join(id)
    }

    fn console_dir(&self) -> PathBuf {
        self.run_dir.join("console")
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

    /// Ends everything a container may own in the guest (best effort, logged).
    async fn destroy(&self, id: &str, dir: &Path) {
        self.oom.unwatch(id);
        self.os.destroy(id, &crate::cgroup::dir(id), dir).await;
    }
}
