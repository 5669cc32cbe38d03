//! One container of the pod as containerd sees it: its kind, its init process and execs.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use super::{
    process::{Process, ProcessRef},
    PodError, Result,
};

/// What a container is in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// CRI's pause container: it stands for the pod and has no process in the guest.
    PodSandbox,
    /// A container that runs in the guest.
    Guest,
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub kind: Kind,
    /// Deleting this container stops the VM (the pause container, or a standalone one).
    pub owns_vm: bool,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: Mutex<bool>,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: PathBuf,
        kind: Kind,
        owns_vm: bool,
        init: Arc<Process>,
    ) -> Container {
        Container {
            id: id.into(),
            bundle,
            kind,
            owns_vm,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: Mutex::new(false),
        }
    }

    pub fn process(&self, which: &ProcessRef) -> Result<Arc<Process>> {
        let ProcessRef::Exec(exec_id) = which else {
            return Ok(self.init.clone());
        };
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

    /// Adds an exec; fails if the id is taken.
    pub fn add_exec(&self, process: Arc<Process>) -> Result<()> {
        let mut execs = self.execs.lock().unwrap();
        let exec_id = process.id.wire_id().to_string();
        if execs.contains_key(&exec_id) {
            return Err(PodError::ExecExists {
                container_id: self.id.clone(),
                exec_id,
            });
        }
        execs.insert(exec_id, process);
        Ok(())
    }

    pub fn remove_exec(&self, exec_id: &str) {
        self.execs.lock().unwrap().remove(exec_id);
    }

    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(self.execs.lock().unwrap().values().cloned());
        all
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap()
    }

    pub fn set_paused(&self, paused: bool) {
        *self.paused.lock().unwrap() = paused;
    }
}
