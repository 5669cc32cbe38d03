//! ExecProcess: registers an extra process of a running container (its spec written, its
//! stdio made); StartProcess runs it.
use std::{fs, sync::Arc};

use shoji_agent_api::types::ExecProcessRequest;

use super::{
    internal,
    process::{prune_reported_execs, Process},
    Runtime, RuntimeError,
};
use crate::{container::guest_spec, io::ProcessIo};

impl Runtime {
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
}
