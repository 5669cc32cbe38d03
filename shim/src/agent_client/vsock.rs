//! The hybrid-vsock side of the agent link: the readiness listener the agent connects to,
//! and dialing a guest port through the VM's vsock socket (`CONNECT <port>`).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use shoji_agent_api::{stream, READY_LINE, READY_PORT};
use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream},
};

use super::{AgentError, Result};

/// Listens on `<vsock socket>_1026` for the agent's `SHOJI-AGENT-READY` line. The socket
/// file is removed when this is dropped.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Binds the listener; call before the VMM starts.
    pub fn bind(vsock_socket: &Path) -> Result<ReadyListener> {
        let path = port_socket(vsock_socket, READY_PORT);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| AgentError::Listen {
            path: path.clone(),
            source,
        })?;
        Ok(ReadyListener { listener, path })
    }

    /// The socket file (for whoever must be let in to connect).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a connection that carries the ready line. Connections carrying anything
    /// else are dropped (only the guest can connect here, but a broken guest must not
    /// count as ready).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let announce = async {
            loop {
                let Ok((mut conn, _)) = self.listener.accept().await else {
                    // e.g. EMFILE: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let line =
                    tokio::time::timeout(Duration::from_secs(2), stream::read_line(&mut conn, 64))
                        .await;
                if let Ok(Ok(line)) = line {
                    if line == READY_LINE.trim_end() {
                        return;
                    }
                }
            }
        };
        tokio::time::timeout(timeout, announce)
            .await
            .map_err(|_| AgentError::NotReady { timeout })
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The Unix socket on which guest connections to host port `port` arrive.
pub fn port_socket(vsock_socket: &Path, port: u32) -> PathBuf {
    let mut s = vsock_socket.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Opens a connection to guest vsock port `port` through the hybrid-vsock socket.
pub async fn dial(vsock_socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let connect = async {
        let mut conn =
            UnixStream::connect(vsock_socket)
                .await
                .map_err(|source| AgentError::Connect {
                    socket: vsock_socket.into(),
                    source,
                })?;
        let handshake = |reason: String| AgentError::Handshake { port, reason };
        conn.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| handshake(e.to_string()))?;
        // Byte by byte, so no payload after the line is consumed. vhost-device-vsock answers
        // `OK <guest port>`, Cloud Hypervisor `OK <host port>`: only the prefix counts.
        let line = stream::read_line(&mut conn, 64)
            .await
            .map_err(|e| handshake(e.to_string()))?;
        if !line.starts_with("OK") {
            return Err(handshake(format!("unexpected answer {line:?}")));
        }
        Ok(conn)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| AgentError::Handshake {
            port,
            reason: format!("no answer within {timeout:?}"),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoji_agent_api::AGENT_PORT;
    use tokio::io::AsyncReadExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("shoji-agent-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn ready_listener_ignores_garbage_then_accepts_the_line() {
        let dir = scratch("ready");
        let vsock = dir.join("vsock.sock");
        let ready = ReadyListener::bind(&vsock).unwrap();
        assert!(dir.join("vsock.sock_1026").exists());
        let path = dir.join("vsock.sock_1026");
        let guest = tokio::spawn(async move {
            let mut c = UnixStream::connect(&path).await.unwrap();
            c.write_all(b"GARBAGE\n").await.unwrap();
            let mut c = UnixStream::connect(&path).await.unwrap();
            c.write_all(READY_LINE.as_bytes()).await.unwrap();
            c
        });
        ready.wait_ready(Duration::from_secs(5)).await.unwrap();
        drop(guest.await.unwrap());
        drop(ready);
        assert!(!dir.join("vsock.sock_1026").exists(), "socket left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn ready_listener_times_out() {
        let dir = scratch("notready");
        let ready = ReadyListener::bind(&dir.join("vsock.sock")).unwrap();
        let err = ready
            .wait_ready(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::NotReady { .. }), "{err}");
        drop(ready);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn dial_checks_only_the_ok_prefix_and_keeps_the_payload() {
        let dir = scratch("dial");
        let sock = dir.join("vsock.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            for answer in ["OK 1024\npayload", "NO\n"] {
                let (mut c, _) = listener.accept().await.unwrap();
                let line = stream::read_line(&mut c, 64).await.unwrap();
                assert_eq!(line, "CONNECT 1024");
                c.write_all(answer.as_bytes()).await.unwrap();
                c.flush().await.unwrap();
                // Keep the connection until the client has read.
                let _ = c.read_u8().await;
            }
        });
        let mut conn = dial(&sock, AGENT_PORT, Duration::from_secs(5))
            .await
            .unwrap();
        let mut payload = [0u8; 7];
        conn.read_exact(&mut payload).await.unwrap();
        assert_eq!(&payload, b"payload");
        drop(conn);
        let err = dial(&sock, AGENT_PORT, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Handshake { port: 1024, .. }),
            "{err}"
        );
        server.await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn dial_to_a_missing_socket_names_it() {
        let err = dial(
            Path::new("/nonexistent/vsock.sock"),
            AGENT_PORT,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vsock.sock"), "{err}");
    }
}
