//! The ttrpc `Agent` service on vsock port 1024 (thin: each RPC is one `Runtime` call),
//! the stdio listener on port 1025, and the readiness announcement to the host.
use std::{path::Path, sync::Arc, time::Duration};

use async_trait::async_trait;
use shoji_agent_api::{
    ttrpc_api::{create_agent, Agent},
    types::*,
    AGENT_PORT, IO_PORT, READY_LINE, READY_PORT,
};
use slog::{debug, error, warn};
use tokio::{io::AsyncWriteExt, sync::mpsc};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};
use ttrpc::{r#async::TtrpcContext, Code};

use crate::{
    guest,
    logger::log,
    network,
    oom::OomWatcher,
    reaper::Reaper,
    runtime::{LinuxGuest, Runtime, RuntimeError, RUN_DIR},
    streams,
};

/// How long the agent keeps trying to announce itself.
const READY_ATTEMPTS: u32 = 100;
const READY_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("starting the reaper: {0}")]
    Reaper(std::io::Error),
    #[error("starting the OOM watch: {0}")]
    Oom(std::io::Error),
    #[error("ttrpc server: {0}")]
    Ttrpc(#[from] ttrpc::Error),
    #[error("stdio listener on vsock port {IO_PORT}: {0}")]
    Io(std::io::Error),
}

struct Service {
    runtime: Arc<Runtime>,
}

type Res<T> = ttrpc::Result<T>;

fn status(rpc: &str, e: RuntimeError) -> ttrpc::Error {
    let code = match &e {
        RuntimeError::NotFound(_) => Code::NOT_FOUND,
        RuntimeError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        RuntimeError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        RuntimeError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        RuntimeError::PermissionDenied(_) => Code::PERMISSION_DENIED,
        RuntimeError::Internal(_) => Code::INTERNAL,
    };
    if code == Code::INTERNAL {
        warn!(log(), "request failed"; "rpc" => rpc, "error" => %e);
    } else {
        debug!(log(), "request refused"; "rpc" => rpc, "error" => %e);
    }
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

fn done<T>(rpc: &str, r: Result<T, RuntimeError>) -> Res<T> {
    r.map_err(|e| status(rpc, e))
}

#[async_trait]
impl Agent for Service {
    async fn health(&self, _: &TtrpcContext, _: Empty) -> Res<HealthResponse> {
        let mut r = HealthResponse::new();
        r.version = env!("CARGO_PKG_VERSION").to_string();
        Ok(r)
    }

    async fn guest_details(&self, _: &TtrpcContext, _: Empty) -> Res<GuestDetailsResponse> {
        Ok(guest::details())
    }

    async fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> Res<Empty> {
        done("CreateContainer", self.runtime.create_container(req).await).map(|_| Empty::new())
    }

    async fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> Res<Empty> {
        done("ExecProcess", self.runtime.exec_process(req).await).map(|_| Empty::new())
    }

    async fn start_process(&self, _: &TtrpcContext, req: ProcessRef) -> Res<StartProcessResponse> {
        let pid = done(
            "StartProcess",
            self.runtime
                .start_process(&req.container_id, &req.exec_id)
                .await,
        )?;
        let mut r = StartProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    async fn wait_process(&self, _: &TtrpcContext, req: ProcessRef) -> Res<WaitProcessResponse> {
        let exit = done(
            "WaitProcess",
            self.runtime
                .wait_process(&req.container_id, &req.exec_id)
                .await,
        )?;
        let at = exit
            .at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut r = WaitProcessResponse::new();
        r.exit_status = exit.status;
        r.exited_at_secs = at.as_secs() as i64;
        r.exited_at_nanos = at.subsec_nanos();
        Ok(r)
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> Res<Empty> {
        let r = self
            .runtime
            .signal_process(&req.container_id, &req.exec_id, req.signal, req.all)
            .await;
        done("SignalProcess", r).map(|_| Empty::new())
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> Res<Empty> {
        let r = self
            .runtime
            .resize_tty(&req.container_id, &req.exec_id, req.width, req.height);
        done("ResizeTty", r).map(|_| Empty::new())
    }

    async fn remove_container(&self, _: &TtrpcContext, req: ContainerRef) -> Res<Empty> {
        done(
            "RemoveContainer",
            self.runtime.remove_container(&req.container_id).await,
        )
        .map(|_| Empty::new())
    }

    async fn pause_container(&self, _: &TtrpcContext, req: ContainerRef) -> Res<Empty> {
        done(
            "PauseContainer",
            self.runtime.pause(&req.container_id, true).await,
        )
        .map(|_| Empty::new())
    }

    async fn resume_container(&self, _: &TtrpcContext, req: ContainerRef) -> Res<Empty> {
        done(
            "ResumeContainer",
            self.runtime.pause(&req.container_id, false).await,
        )
        .map(|_| Empty::new())
    }

    async fn update_container(&self, _: &TtrpcContext, req: UpdateContainerRequest) -> Res<Empty> {
        done(
            "UpdateContainer",
            self.runtime.update(&req.container_id, &req.resources_json),
        )
        .map(|_| Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRef,
    ) -> Res<ListProcessesResponse> {
        let mut r = ListProcessesResponse::new();
        r.pids = done("ListProcesses", self.runtime.pids(&req.container_id))?;
        Ok(r)
    }

    async fn container_stats(
        &self,
        _: &TtrpcContext,
        req: ContainerRef,
    ) -> Res<ContainerStatsResponse> {
        done("ContainerStats", self.runtime.stats(&req.container_id))
    }

    async fn wait_oom_event(&self, _: &TtrpcContext, _: Empty) -> Res<OomEvent> {
        match self.runtime.oom.next().await {
            Some(id) => {
                let mut r = OomEvent::new();
                r.container_id = id;
                Ok(r)
            }
            None => done(
                "WaitOomEvent",
                Err(RuntimeError::Internal("the OOM watch stopped".into())),
            ),
        }
    }

    async fn start_debug_console(
        &self,
        _: &TtrpcContext,
        req: DebugConsoleRequest,
    ) -> Res<DebugConsoleResponse> {
        let (exec_id, pid) = done(
            "StartDebugConsole",
            self.runtime.start_debug_console(&req).await,
        )?;
        let mut r = DebugConsoleResponse::new();
        r.exec_id = exec_id;
        r.pid = pid;
        Ok(r)
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> Res<Empty> {
        let r = network::configure(&req).await.map_err(|e| match e {
            network::NetworkError::Invalid(_)
            | network::NetworkError::NoSuchMac(_)
            | network::NetworkError::NoSuchDevice(_) => {
                RuntimeError::InvalidArgument(e.to_string())
            }
            e => RuntimeError::Internal(e.to_string()),
        });
        let sysctls: Vec<(String, String)> =
            req.sysctls.into_iter().map(|s| (s.name, s.value)).collect();
        let r = match r {
            Ok(()) => self.runtime.set_pod_sysctls(&sysctls).await,
            e => e,
        };
        if r.is_ok() && req.pod {
            self.runtime.prepare_pod();
        }
        done("ConfigureNetwork", r).map(|_| Empty::new())
    }
}

/// Connects to the host and says the agent is ready; retried briefly.
async fn announce_ready() -> bool {
    for _ in 0..READY_ATTEMPTS {
        if let Ok(mut s) = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, READY_PORT)).await {
            if s.write_all(READY_LINE.as_bytes()).await.is_ok() {
                return true;
            }
        }
        tokio::time::sleep(READY_RETRY).await;
    }
    false
}

/// The agent's listeners, bound; [`Serving::wait`] runs until one fails.
pub struct Serving {
    server: ttrpc::r#async::Server,
    failed: mpsc::UnboundedReceiver<ServeError>,
    /// Whether the host heard that the agent is ready.
    pub announced: bool,
}

/// Binds the agent API and the stream listener, then tells the host the agent is ready.
/// `debug_console`: the host allowed debug consoles (`shoji.debug_console=1`).
pub async fn start(debug_console: bool) -> Result<Serving, ServeError> {
    let reaper = Reaper::start().map_err(ServeError::Reaper)?;
    let oom = OomWatcher::start().map_err(ServeError::Oom)?;
    let runtime = Arc::new(Runtime::new(
        Arc::new(LinuxGuest::new(reaper)),
        Path::new(RUN_DIR),
        oom,
        debug_console,
    ));
    let (fail_tx, failed) = mpsc::unbounded_channel();
    let service = Arc::new(Service {
        runtime: runtime.clone(),
    });
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("vsock://-1:{AGENT_PORT}"))?
        .register_service(create_agent(service));
    server.start().await?;
    let listener =
        VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, IO_PORT)).map_err(ServeError::Io)?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    tokio::spawn(streams::serve(runtime.clone(), conn));
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EMFILE)
                        || e.raw_os_error() == Some(libc::ENFILE) =>
                {
                    warn!(log(), "stdio listener out of fds"; "error" => %e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = fail_tx.send(ServeError::Io(e));
                    return;
                }
            }
        }
    });
    let announced = announce_ready().await;
    if !announced {
        error!(log(), "could not announce readiness to the host"; "port" => READY_PORT);
    }
    Ok(Serving {
        server,
        failed,
        announced,
    })
}

impl Serving {
    /// Serves until a listener fails. The VM is stopped from the host (the VMM is ended with
    /// everything in it), so there is no orderly way out.
    pub async fn wait(mut self) -> ServeError {
        let failed = self.failed.recv().await;
        let _ = self.server.shutdown().await;
        failed.unwrap_or(ServeError::Io(std::io::ErrorKind::BrokenPipe.into()))
    }
}
