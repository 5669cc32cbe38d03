//! `kubectl port-forward` (CRI PortForward) into the pod's VM.
//!
//! containerd (1.7 and 2.x alike) forwards a port by dialing `localhost:<port>` (tcp4, then
//! tcp6) from a thread inside the pod's network namespace on the host. Nothing listens there:
//! the pod's processes run in the VM. So once the pod network exists, the shim binds a
//! listener on 127.0.0.1 of that namespace and adds a nat OUTPUT rule there that redirects
//! locally generated TCP to 127.0.0.1 onto it. Each accepted connection's original
//! destination (`SO_ORIGINAL_DST`) names the guest port; the connection is relayed over an
//! agent stream (`SHOJI-IO 1 forward <port>`), and the agent connects to `localhost:<port>`
//! in the guest ([`shoji_agent_api::forward`] frames both directions, half-close included).
//!
//! A guest port nothing listens on resets containerd's connection, so containerd reports a
//! forwarding error to the client as it does for runc. The rule lives in the pod's namespace,
//! which CNI/containerd delete with the pod: nothing to undo on the host.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
use shoji_agent_api::{forward::splice, stream::StreamError};
use slog::{debug, info, warn, Logger};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
};

use crate::{
    agent_client::{AgentClient, AgentError},
    network::{self, NetworkError},
};

/// Forwarded connections served at once per sandbox; more are reset.
pub const MAX_CONNECTIONS: usize = 64;
/// How long [`PortForward::stop`] waits for the connections to be reset.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// Marks the redirect rule for whoever lists the pod namespace's rules.
const RULE_COMMENT: &str = "shoji port-forward";

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("cannot listen on 127.0.0.1 in network namespace {netns}: {source}")]
    Listen {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot redirect localhost connections in the pod network to the port-forward listener: {0}")]
    Redirect(#[from] NetworkError),
}

/// Why one forwarded connection ended early (it is then reset).
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the relay broke: {0}")]
    Splice(#[from] StreamError),
    #[error("the sandbox stopped")]
    Stopped,
}

/// The listener and its connections; everything ends with [`PortForward::stop`] (or drop).
pub struct PortForward {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl PortForward {
    /// Listens in `netns`, redirects localhost TCP there to the listener, and relays each
    /// connection to the guest through `agent`.
    pub async fn start(
        netns: &Path,
        agent: AgentClient,
        log: &Logger,
    ) -> Result<PortForward, PortForwardError> {
        let listen = |source| PortForwardError::Listen {
            netns: netns.to_path_buf(),
            source,
        };
        let listener = network::in_netns(Some(netns), || {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .await
        .map_err(listen)?;
        let listener = TcpListener::from_std(listener).map_err(listen)?;
        let port = listener.local_addr().map_err(listen)?.port().to_string();
        // Inserted first: a rule an earlier attempt left in this namespace must not win.
        // No exclusion for the listener's own port: a connection to it is redirected to itself.
        let mut rule: Vec<&str> =
            "iptables -w 4 -t nat -I OUTPUT 1 -o lo -p tcp -d 127.0.0.1 -m comment --comment"
                .split(' ')
                .collect();
        rule.extend([RULE_COMMENT, "-j", "REDIRECT", "--to-ports", &port]);
        network::run_in(netns, &rule).await?;
        let log = log.new(slog::o!("port_forward_listener" => port));
        info!(log, "port-forward ready");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, agent, stopped, log));
        Ok(PortForward {
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    /// Stops accepting and resets every forwarded connection; returns once they are gone
    /// (at most [`STOP_GRACE`]). Idempotent.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let task = self.task.lock().unwrap().take();
        if let Some(mut task) = task {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.get_mut().unwrap().take() {
            task.abort();
        }
    }
}

/// The accept loop: one relay task per connection, at most [`MAX_CONNECTIONS`].
async fn serve(
    listener: TcpListener,
    agent: AgentClient,
    stopped: watch::Receiver<bool>,
    log: Logger,
) {
    let mut relays = JoinSet::new();
    let mut stop = stopped.clone();
    loop {
        tokio::select! {
            () = stop_signal(&mut stop) => break,
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) if relays.len() >= MAX_CONNECTIONS => {
                    warn!(log, "port-forward connection refused: too many at once";
                        "limit" => MAX_CONNECTIONS);
                    let _ = conn.set_zero_linger();
                }
                Ok((conn, _)) => {
                    relays.spawn(relay(conn, agent.clone(), stopped.clone(), log.clone()));
                }
                Err(e) => {
                    // e.g. EMFILE: do not spin, nor flood the log.
                    debug!(log, "port-forward accept failed"; "error" => %e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Each relay sees the stop itself and resets its connection.
    while relays.join_next().await.is_some() {}
}

/// Resolves once stop was asked for (or the [`PortForward`] is gone).
async fn stop_signal(stopped: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send: drop it here.
    let _ = stopped.wait_for(|s| *s).await;
}

/// Serves one connection until it ends; an early end resets it, so containerd's copy fails
/// instead of taking the close for the server's answer.
async fn relay(
    mut conn: TcpStream,
    agent: AgentClient,
    mut stopped: watch::Receiver<bool>,
    log: Logger,
) {
    let port = match getsockopt(&conn, OriginalDst) {
        Ok(dst) => u16::from_be(dst.sin_port),
        Err(e) => {
            warn!(log, "port-forward connection without an original destination, reset"; "error" => %e);
            let _ = conn.set_zero_linger();
            return;
        }
    };
    let outcome = tokio::select! {
        r = forward(&mut conn, &agent, port, &log) => r,
        () = stop_signal(&mut stopped) => Err(RelayError::Stopped),
    };
    match outcome {
        Ok(()) => debug!(log, "port-forward connection ended"; "port" => port),
        Err(e) => {
            if let RelayError::Agent(_) = e {
                info!(log, "port-forward refused"; "port" => port, "error" => %e);
            } else {
                debug!(log, "port-forward connection reset"; "port" => port, "error" => %e);
            }
            let _ = conn.set_zero_linger();
        }
    }
}

async fn forward(
    conn: &mut TcpStream,
    agent: &AgentClient,
    port: u16,
    log: &Logger,
) -> Result<(), RelayError> {
    // Relayed writes are whatever arrived: do not hold them back.
    let _ = conn.set_nodelay(true);
    let mut link = agent.open_forward(port).await?;
    debug!(log, "port-forward connected"; "port" => port);
    splice(conn, &mut link).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use shoji_agent_api::{
        stream::{self, StreamRequest, MAX_HEADER},
        IO_PORT,
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::UnixListener,
    };

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    /// A pod network namespace with only loopback, as containerd leaves it before CNI.
    struct TestNs {
        name: String,
        path: PathBuf,
    }

    impl TestNs {
        fn new() -> TestNs {
            let name = format!("shoji-pf-{}", std::process::id());
            for args in [
                vec!["netns", "add", &name],
                vec!["-n", &name, "link", "set", "lo", "up"],
            ] {
                let ok = std::process::Command::new("ip")
                    .args(&args)
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "ip {args:?} failed (tests run as root)");
            }
            TestNs {
                path: format!("/run/netns/{name}").into(),
                name,
            }
        }

        /// A client connection to 127.0.0.1:`port` made inside the namespace.
        async fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
            let s = network::in_netns(Some(&self.path), move || {
                let s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .await?;
            TcpStream::from_std(s)
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &self.name])
                .status();
        }
    }

    /// The guest's part, in-process: the hybrid-vsock socket answers `CONNECT`; a forward
    /// stream connects to 127.0.0.1:<port> of the host namespace (nothing there: `ERR`).
    fn fake_agent(socket: &Path) -> JoinHandle<()> {
        let listener = UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let line = stream::read_line(&mut conn, 64).await.unwrap();
                    conn.write_all(b"OK 1\n").await.unwrap();
                    if line != format!("CONNECT {IO_PORT}") {
                        // The ttrpc connection: held, never called.
                        let _ = conn.read_u8().await;
                        return;
                    }
                    let header = stream::read_line(&mut conn, MAX_HEADER).await.unwrap();
                    let Ok(StreamRequest::Forward { port }) = StreamRequest::parse(&header) else {
                        panic!("not a forward request: {header:?}")
                    };
                    match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
                        Ok(mut target) => {
                            conn.write_all(b"OK\n").await.unwrap();
                            let _ = splice(&mut target, &mut conn).await;
                        }
                        Err(e) => conn
                            .write_all(format!("ERR {e}\n").as_bytes())
                            .await
                            .unwrap(),
                    }
                });
            }
        })
    }

    /// A "guest" server on the host's 127.0.0.1 that answers what it read once the client
    /// half-closed.
    async fn echo_server() -> (u16, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            c.write_all(&got).await.unwrap();
        });
        (port, task)
    }

    async fn read_all(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, c.read_to_end(&mut got))
            .await
            .expect("no end")?;
        Ok(got)
    }

    /// Needs root and iptables, as containerd's port-forward does.
    #[tokio::test]
    async fn localhost_connections_in_the_pod_namespace_reach_the_guest_port() {
        let ns = TestNs::new();
        let dir = std::env::temp_dir().join(format!("shoji-pf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vsock.sock");
        let _agent = fake_agent(&socket);
        let agent = AgentClient::connect(&socket, LIMIT).await.unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let pf = PortForward::start(&ns.path, agent, &log).await.unwrap();
        let rules = network::run_in(&ns.path, &["iptables", "-t", "nat", "-S", "OUTPUT"])
            .await
            .unwrap();
        assert!(rules.contains(RULE_COMMENT), "{rules}");

        // A request, the client's half-close, the whole answer.
        let (port, echo) = echo_server().await;
        let mut c = ns.connect(port).await.unwrap();
        let request = vec![7u8; 100_000];
        c.write_all(&request).await.unwrap();
        c.shutdown().await.unwrap();
        assert!(read_all(&mut c).await.unwrap() == request);
        echo.await.unwrap();

        // Nothing listens on the guest port: the connection is reset, not closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut c = ns.connect(closed_port).await.unwrap();
        let err = read_all(&mut c).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

        // Stop resets a forwarded connection and refuses new ones.
        let guest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = guest.local_addr().unwrap().port();
        let mut c = ns.connect(port).await.unwrap();
        let _guest_end = tokio::time::timeout(LIMIT, guest.accept())
            .await
            .unwrap()
            .unwrap();
        pf.stop().await;
        let err = read_all(&mut c).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        let err = ns.connect(port).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
