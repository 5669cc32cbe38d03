//! WaitProcess: a process's exit, answered once its output was delivered (or
//! [`DRAIN_AFTER_EXIT`] passed: what it left running may hold the output open).
use std::sync::atomic::Ordering;

use super::{internal, Runtime, RuntimeError};
use crate::{io::DRAIN_AFTER_EXIT, reaper::Exit};

impl Runtime {
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
}
