//! `kill`: signals a container's init, or with `all` every process in its cgroup.
use std::{path::Path, time::Duration};

use libcontainer::{container::Container, signal::Signal};
use serde::{Deserialize, Serialize};

use super::{helper, run_helper, HelperError, STATE_ROOT};
use crate::reaper::Reaper;

pub const VERB: &str = "kill";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
pub struct Request {
    id: String,
    signal: i32,
    all: bool,
}

pub(super) fn run(req: Request) -> Result<(), String> {
    let signal = Signal::try_from(req.signal).map_err(|e| helper::describe(&e))?;
    let mut c =
        Container::load(Path::new(STATE_ROOT).join(&req.id)).map_err(|e| helper::describe(&e))?;
    c.kill(signal, req.all).map_err(|e| helper::describe(&e))?;
    // kill() marks the state Stopped at once; record what is really true.
    c.refresh_status().map_err(|e| helper::describe(&e))?;
    c.save().map_err(|e| helper::describe(&e))
}

pub async fn kill(
    reaper: &Reaper,
    id: &str,
    dir: &Path,
    signal: i32,
    all: bool,
) -> Result<(), HelperError> {
    run_helper(
        reaper,
        VERB,
        dir,
        &Request {
            id: id.to_string(),
            signal,
            all,
        },
        &[],
        TIMEOUT,
    )
    .await
}
