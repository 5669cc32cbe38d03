//! The HTTP endpoint of `shoji metrics` (as kata-monitor serves its sandboxes): `GET
//! /metrics` scrapes the node; anything else is 404. HTTP/1 only, one task per connection,
//! a bounded time per request and at most [`MAX_CONNECTIONS`] at once.
use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::TokioIo;
use slog::{info, warn, Logger};
use tokio::{net::TcpListener, sync::Semaphore};

/// How long one connection may live (a scrape takes at most a few seconds).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// A bound metrics endpoint.
pub struct Endpoint {
    listener: TcpListener,
    run_dir: PathBuf,
    log: Logger,
}

impl Endpoint {
    pub async fn bind(
        addr: SocketAddr,
        run_dir: PathBuf,
        log: Logger,
    ) -> Result<Endpoint, ListenError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError { addr, source })?;
        Ok(Endpoint {
            listener,
            run_dir,
            log,
        })
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the process ends.
    pub async fn serve(self) -> ! {
        info!(self.log, "serving metrics"; "addr" => ?self.listener.local_addr().ok(), "run_dir" => %self.run_dir.display());
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let run_dir = Arc::new(self.run_dir);
        loop {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let (conn, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // e.g. EMFILE: do not spin.
                    warn!(self.log, "accept failed"; "error" => %e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let run_dir = run_dir.clone();
            let log = self.log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, run_dir.clone()));
                let served = http1::Builder::new().serve_connection(TokioIo::new(conn), service);
                match tokio::time::timeout(CONNECTION_TIMEOUT, served).await {
                    Ok(Err(e)) => {
                        warn!(log, "metrics connection failed"; "peer" => %peer, "error" => %e)
                    }
                    Err(_) => warn!(log, "metrics connection timed out"; "peer" => %peer),
                    Ok(Ok(())) => {}
                }
                drop(permit);
            });
        }
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    run_dir: Arc<PathBuf>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = |status: u16, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => response(
            200,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            super::scrape(&run_dir).await,
        ),
        _ => response(404, "text/plain", "not found: try GET /metrics\n".into()),
    })
}
