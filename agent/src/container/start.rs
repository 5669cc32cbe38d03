//! `start`: lets a created container's init run the user's program.
//!
//! Done by the agent itself, not in a helper: starting is a message on the notify socket the
//! init waits on, and the state file marked running: no process is cloned, so libcontainer's
//! reason for helpers does not apply, and a helper's start alone costs ~100 ms under
//! emulation. libcontainer's own `Container::start` would chdir (process-wide) to reach the
//! socket; the absolute path fits a socket address (ids are at most 64 bytes).
use std::{io::Write, os::unix::net::UnixStream, path::Path, time::Duration};

use libcontainer::{
    container::{Container, ContainerStatus},
    notify_socket::NOTIFY_FILE,
};

use super::{describe, STATE_ROOT};

const TIMEOUT: Duration = Duration::from_secs(30);

/// What libcontainer's init reads (to EOF) before it runs the program.
const START_MESSAGE: &[u8] = b"start container";

fn run(id: &str) -> Result<(), String> {
    let root = Path::new(STATE_ROOT).join(id);
    let mut c = Container::load(root.clone()).map_err(|e| describe(&e))?;
    c.refresh_status().map_err(|e| describe(&e))?;
    if !c.can_start() {
        return Err(format!("container is {:?}, not created", c.status()));
    }
    let socket = root.join(NOTIFY_FILE);
    let mut stream = UnixStream::connect(&socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    stream
        .write_all(START_MESSAGE)
        .map_err(|e| format!("writing to {}: {e}", socket.display()))?;
    drop(stream);
    c.set_status(ContainerStatus::Running)
        .save()
        .map_err(|e| describe(&e))
}

pub async fn start(id: &str) -> Result<(), String> {
    let id = id.to_string();
    match tokio::time::timeout(TIMEOUT, tokio::task::spawn_blocking(move || run(&id))).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(format!("start task failed: {e}")),
        Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
    }
}
