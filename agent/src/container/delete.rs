//! `delete`: kills what is left of a container and removes libcontainer's state and cgroup.
//! An unknown container is already deleted.
use std::{path::Path, time::Duration};

use libcontainer::container::Container;
use serde::{Deserialize, Serialize};

use super::{helper, run_helper, HelperError, STATE_ROOT};
use crate::reaper::Reaper;

pub const VERB: &str = "delete";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
pub struct Request {
    id: String,
}

pub(super) fn run(req: Request) -> Result<(), String> {
    let root = Path::new(STATE_ROOT).join(&req.id);
    if !root.join("state.json").exists() {
        // Never created, or created only halfway: nothing of libcontainer's to delete.
        return std::fs::remove_dir_all(&root)
            .or_else(ignore_not_found)
            .map_err(|e| e.to_string());
    }
    let mut c = Container::load(root).map_err(|e| helper::describe(&e))?;
    c.delete(true).map_err(|e| helper::describe(&e))
}

fn ignore_not_found(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

pub async fn delete(reaper: &Reaper, id: &str, dir: &Path) -> Result<(), HelperError> {
    run_helper(
        reaper,
        VERB,
        dir,
        &Request { id: id.to_string() },
        &[],
        TIMEOUT,
    )
    .await
}
