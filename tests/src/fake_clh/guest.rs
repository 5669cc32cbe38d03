//! The guest behind the fake's hybrid vsock, for `--fake-agent SOCKET`: an agent that a test
//! serves on the Unix socket SOCKET (see [`crate::fake_agent`]) stands in for shoji-agent.
//!
//! As with a real guest and Cloud Hypervisor's hybrid vsock:
//! - once booted, the "agent" announces itself: a connection to `<vsock socket>_<READY_PORT>`
//!   carrying [`READY_LINE`] (retried, as the real agent does, until the host listens);
//! - the host connects to the vsock socket and sends `CONNECT <port>\n`; for the agent's
//!   port the fake answers `OK <port>\n` and relays bytes both ways between that connection
//!   and SOCKET; any other port gets no answer and is closed (nothing listens there).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::Shutdown,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use shoji_agent_api::{AGENT_PORT, READY_LINE, READY_PORT};

/// Starts the guest's side of `vsock` (the bound hybrid-vsock listener at `vsock_path`),
/// relaying the agent's port to `agent`. Threads of their own; they end with the process.
pub(super) fn start(vsock: &UnixListener, vsock_path: &Path, agent: PathBuf) {
    let Ok(listener) = vsock.try_clone() else {
        return;
    };
    let ready = PathBuf::from(format!("{}_{READY_PORT}", vsock_path.display()));
    std::thread::spawn(move || announce(&ready));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let agent = agent.clone();
            std::thread::spawn(move || relay(conn, &agent));
        }
    });
}

/// The agent's readiness announcement: 100 tries, 50 ms apart (as shoji-agent).
fn announce(ready: &Path) {
    for _ in 0..100 {
        if let Ok(mut c) = UnixStream::connect(ready) {
            let _ = c.write_all(READY_LINE.as_bytes());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One host connection: the `CONNECT` handshake, then bytes both ways.
fn relay(host: UnixStream, agent: &Path) {
    let mut reader = BufReader::new(match host.try_clone() {
        Ok(h) => h,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let port = line
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    if port != Some(AGENT_PORT) {
        return;
    }
    let Ok(guest) = UnixStream::connect(agent) else {
        return;
    };
    let mut host_w = host;
    if host_w
        .write_all(format!("OK {AGENT_PORT}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let Ok(mut guest_r) = guest.try_clone() else {
        return;
    };
    // Whatever the handshake read ahead belongs to the agent.
    let early = reader.buffer().to_vec();
    let mut guest_w = guest;
    std::thread::spawn(move || {
        let _ = guest_w.write_all(&early);
        let _ = pump(reader.into_inner(), &mut guest_w);
        let _ = guest_w.shutdown(Shutdown::Write);
    });
    let _ = pump(&mut guest_r, &mut host_w);
    let _ = host_w.shutdown(Shutdown::Both);
}

fn pump(mut from: impl Read, to: &mut UnixStream) -> std::io::Result<u64> {
    std::io::copy(&mut from, to)
}
