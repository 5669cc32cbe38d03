//! StartProcess: a created container's init runs its program, or a registered exec is made
//! and runs. A process starts once; an exec whose start failed has exited.
use std::{fs, sync::Arc};

use super::{
    helper_err,
    process::{Launch, Process},
    Container, Runtime, RuntimeError,
};

impl Runtime {
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
        self.os
            .start(&c.id)
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
        let launch = Launch::new(child, &self.console_dir())?;
        let born = std::time::Instant::now();
        let pid = self
            .os
            .exec(&c.id, &p.dir, launch.stdio())
            .await
            .map_err(helper_err(format!(
                "exec {:?} in container {:?}",
                p.exec_id, c.id
            )))?;
        // libcontainer has read it; it can be large (the argument list).
        let _ = fs::remove_file(p.dir.join("process.json"));
        p.set_pid(&self.os, pid, born, None);
        launch.finish(&p.io).await?;
        Ok(pid)
    }
}
