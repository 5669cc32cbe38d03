//! `start`: lets a created container's init run the user's program.
use std::{path::Path, time::Duration};

use libcontainer::container::Container;
use serde::{Deserialize, Serialize};

use super::{helper, run_helper, HelperError, STATE_ROOT};
use crate::reaper::Reaper;

pub const VERB: &str = "start";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
pub struct Request {
    id: String,
}

pub(super) fn run(req: Request) -> Result<(), String> {
    let mut c =
        Container::load(Path::new(STATE_ROOT).join(&req.id)).map_err(|e| helper::describe(&e))?;
    c.start().map_err(|e| helper::describe(&e))
}

pub async fn start(reaper: &Reaper, id: &str, dir: &Path) -> Result<(), HelperError> {
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
