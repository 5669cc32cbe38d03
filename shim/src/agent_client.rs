//! The host's link to shoji-agent: readiness, hybrid-vsock dialing, the typed ttrpc client and
//! stream connections ([`streams`]).
//!
//! Order matters: bind a [`ReadyListener`] *before* the VMM starts, wait for
//! the agent's announcement, and only then dial ([`AgentClient::connect`]). A host `CONNECT`
//! that reaches vhost-device-vsock while the device is still starting can wedge it for the
//! life of the VM; the announcement is also the fastest readiness signal (no polling).
//!
//! Hybrid vsock (vhost-device-vsock, Cloud Hypervisor, Firecracker): host→guest is a Unix
//! stream connection to the VM's vsock socket plus the line `CONNECT <port>\n`, answered by
//! `OK <n>\n`; guest→host connections to port P arrive on the Unix socket `<socket>_<P>`
//! ([`vsock`]).
mod streams;
mod vsock;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use shoji_agent_api::{
    stream::{StreamError, StreamKind},
    ttrpc_api,
    types::*,
    AGENT_PORT,
};
use ttrpc::{context, Code};

pub use self::vsock::{dial, port_socket, ReadyListener};
use crate::call_stats::CallStats;

/// How long one long-poll call (WaitProcess, WaitOomEvent) stays open before it is
/// re-issued. Between two polls the agent's health is checked, so a dead agent is noticed.
pub const LONG_POLL: Duration = Duration::from_secs(30);
/// How often [`AgentClient::wait_broken`] checks the link.
const LINK_CHECK: Duration = Duration::from_millis(500);
/// Health calls in a row that may go unanswered before the link counts as lost.
const LINK_MISSES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen for the agent's announcement on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not announce itself within {timeout:?}")]
    NotReady { timeout: Duration },
    #[error("cannot connect to the VM's vsock socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock handshake for guest port {port} failed: {reason}")]
    Handshake { port: u32, reason: String },
    #[error("agent call {call} timed out after {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    /// The agent answered with an error status (e.g. `NOT_FOUND` for an unknown container).
    #[error("agent call {call} failed ({code:?}): {message}")]
    Rpc {
        call: &'static str,
        code: Code,
        message: String,
    },
    /// The connection to the agent broke (the VM died or the agent closed it).
    #[error("agent call {call}: connection failed: {source}")]
    Transport {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    #[error("{kind} stream of {container_id}/{exec_id}: {source}")]
    Stream {
        kind: StreamKind,
        container_id: String,
        exec_id: String,
        #[source]
        source: StreamError,
    },
    #[error("port-forward stream to guest port {port}: {source}")]
    Forward {
        port: u16,
        #[source]
        source: StreamError,
    },
}

impl AgentError {
    /// The ttrpc status code, when the agent answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            AgentError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NOT_FOUND)
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Most characters of a guest's error message kept: the guest is untrusted, and its text
/// ends up in containerd's errors and the shim's log.
const GUEST_MESSAGE_MAX: usize = 1024;

fn bounded(message: &str) -> String {
    let mut m: String = message.chars().take(GUEST_MESSAGE_MAX).collect();
    if m.len() < message.len() {
        m.push_str(" [cut]");
    }
    m
}

/// Typed client of the agent's ttrpc service. Every call has a timeout; cloning is cheap
/// and clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    rpc: ttrpc_api::AgentClient,
    vsock_socket: PathBuf,
    call_timeout: Duration,
    stats: Arc<CallStats>,
}

impl AgentClient {
    /// Dials the agent port and builds the ttrpc client. `call_timeout` bounds the dial and
    /// every ordinary call.
    pub async fn connect(vsock_socket: &Path, call_timeout: Duration) -> Result<AgentClient> {
        let conn = dial(vsock_socket, AGENT_PORT, call_timeout).await?;
        let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(conn));
        Ok(AgentClient {
            rpc: ttrpc_api::AgentClient::new(client),
            vsock_socket: vsock_socket.into(),
            call_timeout,
            stats: Arc::default(),
        })
    }

    /// Latency and errors of this client's calls (long polls excepted).
    pub fn stats(&self) -> &Arc<CallStats> {
        &self.stats
    }

    /// Runs one call bounded by `timeout`, on the wire (so the agent drops it too) and locally.
    async fn call<T, F, Fut>(&self, call: &'static str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce(ttrpc_api::AgentClient, context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let ctx = context::with_duration(timeout);
        let began = tokio::time::Instant::now();
        // The local bound is a little longer so the agent's DEADLINE_EXCEEDED wins when it can.
        let answer = tokio::time::timeout(
            timeout + Duration::from_millis(500),
            f(self.rpc.clone(), ctx),
        )
        .await;
        if timeout != LONG_POLL {
            let ok = matches!(answer, Ok(Ok(_)));
            self.stats.record(call, began.elapsed(), ok);
        }
        match answer {
            Err(_) => Err(AgentError::Timeout { call, timeout }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ttrpc::Error::RpcStatus(s))) if s.code() == Code::DEADLINE_EXCEEDED => {
                Err(AgentError::Timeout { call, timeout })
            }
            Ok(Err(ttrpc::Error::RpcStatus(s))) => Err(AgentError::Rpc {
                call,
                code: s.code(),
                message: bounded(s.message()),
            }),
            Ok(Err(ttrpc::Error::Others(m))) if m.starts_with("Receive packet timeout") => {
                Err(AgentError::Timeout { call, timeout })
            }
            Ok(Err(source)) => Err(AgentError::Transport { call, source }),
        }
    }

    /// Resolves when the link to the agent is lost: the connection broke, or [`LINK_MISSES`]
    /// Health calls in a row went unanswered. Returns the last error.
    pub async fn wait_broken(&self) -> AgentError {
        let mut misses = 0;
        loop {
            tokio::time::sleep(LINK_CHECK).await;
            match self.health().await {
                Ok(_) => misses = 0,
                Err(e @ AgentError::Timeout { .. }) => {
                    misses += 1;
                    if misses >= LINK_MISSES {
                        return e;
                    }
                }
                Err(e) => return e,
            }
        }
    }

    pub async fn health(&self) -> Result<HealthResponse> {
        self.call("Health", self.call_timeout, |c, ctx| async move {
            c.health(ctx, &Empty::new()).await
        })
        .await
    }

    pub async fn guest_details(&self) -> Result<GuestDetailsResponse> {
        self.call("GuestDetails", self.call_timeout, |c, ctx| async move {
            c.guest_details(ctx, &Empty::new()).await
        })
        .await
    }

    /// Creates a container; its init process exists but does not run yet. Container
    /// creation runs the OCI runtime in the guest, so it gets twice the call timeout.
    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<()> {
        self.call(
            "CreateContainer",
            self.call_timeout * 2,
            |c, ctx| async move { c.create_container(ctx, &req).await },
        )
        .await
        .map(drop)
    }

    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<()> {
        self.call("ExecProcess", self.call_timeout, |c, ctx| async move {
            c.exec_process(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Runs a created process; returns its guest pid.
    pub async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        let req = process_ref(container_id, exec_id);
        self.call("StartProcess", self.call_timeout, |c, ctx| async move {
            c.start_process(ctx, &req).await
        })
        .await
        .map(|r| r.pid)
    }

    /// Waits, without a deadline, until the process has exited and its output is drained.
    /// Polls in [`LONG_POLL`] slices; between two the agent must answer Health, so a dead
    /// VM ends the wait with an error instead of hanging.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse> {
        let req = process_ref(container_id, exec_id);
        self.long_poll("WaitProcess", |c, ctx| {
            let req = req.clone();
            async move { c.wait_process(ctx, &req).await }
        })
        .await
    }

    /// Waits, without a deadline, for the next OOM kill in any container (see [`Self::wait_process`]).
    pub async fn wait_oom_event(&self) -> Result<String> {
        self.long_poll("WaitOomEvent", |c, ctx| async move {
            c.wait_oom_event(ctx, &Empty::new()).await
        })
        .await
        .map(|e| e.container_id)
    }

    async fn long_poll<T, F, Fut>(&self, call: &'static str, f: F) -> Result<T>
    where
        F: Fn(ttrpc_api::AgentClient, context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        loop {
            match self.call(call, LONG_POLL, &f).await {
                Err(AgentError::Timeout { .. }) => {
                    self.health().await?;
                }
                other => return other,
            }
        }
    }

    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.call("SignalProcess", self.call_timeout, |c, ctx| async move {
            c.signal_process(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<()> {
        let req = ResizeTtyRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            width,
            height,
            ..Default::default()
        };
        self.call("ResizeTty", self.call_timeout, |c, ctx| async move {
            c.resize_tty(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Removes a container (kills what still runs). Unknown containers succeed.
    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let req = container_ref(container_id);
        self.call("RemoveContainer", self.call_timeout, |c, ctx| async move {
            c.remove_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<()> {
        let req = container_ref(container_id);
        self.call("PauseContainer", self.call_timeout, |c, ctx| async move {
            c.pause_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<()> {
        let req = container_ref(container_id);
        self.call("ResumeContainer", self.call_timeout, |c, ctx| async move {
            c.resume_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Applies new resources; `resources_json` is an OCI LinuxResources document.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<()> {
        let req = UpdateContainerRequest {
            container_id: container_id.into(),
            resources_json,
            ..Default::default()
        };
        self.call("UpdateContainer", self.call_timeout, |c, ctx| async move {
            c.update_container(ctx, &req).await
        })
        .await
        .map(drop)
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = container_ref(container_id);
        self.call("ListProcesses", self.call_timeout, |c, ctx| async move {
            c.list_processes(ctx, &req).await
        })
        .await
        .map(|r| r.pids)
    }

    pub async fn container_stats(&self, container_id: &str) -> Result<ContainerStatsResponse> {
        let req = container_ref(container_id);
        self.call("ContainerStats", self.call_timeout, |c, ctx| async move {
            c.container_stats(ctx, &req).await
        })
        .await
    }

    pub async fn configure_network(&self, req: ConfigureNetworkRequest) -> Result<()> {
        self.call("ConfigureNetwork", self.call_timeout, |c, ctx| async move {
            c.configure_network(ctx, &req).await
        })
        .await
        .map(drop)
    }

    /// Starts a debug shell in the guest (only if the VM was booted allowing it); returns
    /// its exec id (of [`shoji_agent_api::DEBUG_CONSOLE_CONTAINER`]) and guest pid.
    pub async fn start_debug_console(&self, req: DebugConsoleRequest) -> Result<(String, u32)> {
        self.call(
            "StartDebugConsole",
            self.call_timeout,
            |c, ctx| async move { c.start_debug_console(ctx, &req).await },
        )
        .await
        .map(|r| (r.exec_id, r.pid))
    }
}

fn process_ref(container_id: &str, exec_id: &str) -> ProcessRef {
    ProcessRef {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

fn container_ref(container_id: &str) -> ContainerRef {
    ContainerRef {
        container_id: container_id.into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoji_agent_api::stream;
    use tokio::{io::AsyncWriteExt, net::UnixListener};

    /// A link that breaks (the peer closes the connection) is noticed at the next check.
    #[tokio::test]
    async fn a_broken_link_is_noticed() {
        let dir = std::env::temp_dir().join(format!("shoji-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vsock.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            stream::read_line(&mut conn, 64).await.unwrap();
            conn.write_all(b"OK 1024\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(conn);
        });
        let agent = AgentClient::connect(&sock, Duration::from_secs(5))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), agent.wait_broken())
            .await
            .expect("the broken link was not noticed");
        assert!(matches!(err, AgentError::Transport { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        server.await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn guest_messages_are_bounded() {
        assert_eq!(bounded("no such container"), "no such container");
        let long = bounded(&"x".repeat(1 << 20));
        assert!(long.len() < GUEST_MESSAGE_MAX + 10 && long.ends_with("[cut]"));
    }
}
