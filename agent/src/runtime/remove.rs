//! RemoveContainer: kills what runs and deletes the container everywhere. An unknown id is
//! already removed. Waits for a create of the same id to finish first, and runs to its end
//! even if the caller stops waiting.
use std::{sync::Arc, time::Duration};

use slog::{debug, warn};

use super::{internal, Runtime, RuntimeError};
use crate::logger::log;

/// How long RemoveContainer waits for the init to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl Runtime {
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
}
