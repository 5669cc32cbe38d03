//! Port-forward streams (`SHOJI-IO 1 forward <port>`): the host relays one TCP connection
//! containerd opened for `kubectl port-forward`; the agent connects to `localhost:<port>` in
//! the guest, whose network namespace is the pod's, and splices the two
//! ([`shoji_agent_api::forward`]). Nothing listening is refused (`ERR`, by the router), which
//! the host turns into a reset of containerd's connection.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use shoji_agent_api::forward::splice;
use slog::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::logger::log;

/// How long connecting to the guest port may take (loopback: only a full accept queue is slow).
/// Below the host's default bound on the verdict (the agent call timeout), so the host hears why.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers `OK` on `conn` and splices it with `target` until either side ends.
pub async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    mut target: TcpStream,
    port: u16,
) {
    if conn.write_all(b"OK\n").await.is_err() {
        return;
    }
    debug!(log(), "port-forward connected"; "port" => port);
    if let Err(e) = splice(&mut target, &mut conn).await {
        debug!(log(), "port-forward connection broke, resetting it"; "port" => port, "error" => %e);
        let _ = target.set_zero_linger();
    }
}

/// `127.0.0.1:<port>`, else `[::1]:<port>` (a server may listen on one family only), as
/// containerd dials localhost for runc pods.
pub async fn connect(port: u16) -> Result<TcpStream, String> {
    let attempts = async {
        let mut errors = Vec::new();
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            let addr = SocketAddr::new(ip, port);
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    // Relayed writes are whatever arrived: do not hold them back.
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(format!(
            "nothing accepts connections on port {port} in the guest ({})",
            errors.join("; ")
        ))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempts)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "connecting to port {port} in the guest took longer than {CONNECT_TIMEOUT:?}"
            ))
        })
}
