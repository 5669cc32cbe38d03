//! The HTTP endpoint of `shoji metrics` (as kata-monitor serves its sandboxes): `GET
//! /metrics` scrapes the node; anything else is 404. HTTP/1 only, one request per
//! connection, one task per connection, at most [`MAX_CONNECTIONS`] at once. A client that
//! does not send its request within [`HEADER_TIMEOUT`] is dropped, so idle connections
//! cannot keep scrapers out; scrapes within [`SCRAPE_TTL`] of each other share one round of
//! guest calls, so many scrapers cannot load every guest.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use slog::{info, warn, Logger};
use tokio::{
    net::TcpListener,
    sync::{Mutex, Semaphore},
};

/// How long one connection may live (a scrape takes at most a few seconds).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client has to send its request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// How long a scrape's text is served again instead of asking the guests anew.
const SCRAPE_TTL: Duration = Duration::from_secs(2);

/// The node's last scrape, shared by concurrent and close requests.
#[derive(Default)]
struct Cache {
    last: Mutex<Option<(Instant, Arc<String>)>>,
}

impl Cache {
    /// The node's metrics: the last scrape's if recent, else a new one (a request that
    /// arrives during a scrape waits for it and takes its result).
    async fn get(&self, run_dir: &std::path::Path) -> Arc<String> {
        let mut last = self.last.lock().await;
        match last.as_ref() {
            Some((at, text)) if at.elapsed() < SCRAPE_TTL => text.clone(),
            _ => {
                let text = Arc::new(super::scrape(run_dir).await);
                *last = Some((Instant::now(), text.clone()));
                text
            }
        }
    }
}

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
        let cache = Arc::new(Cache::default());
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
            let (run_dir, cache) = (run_dir.clone(), cache.clone());
            let log = self.log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, run_dir.clone(), cache.clone()));
                let served = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(conn), service);
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
    cache: Arc<Cache>,
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
            cache.get(&run_dir).await.to_string(),
        ),
        _ => response(404, "text/plain", "not found: try GET /metrics\n".into()),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        response
    }

    /// Idle connections, as many as are served at once, delay a scrape by at most the time a
    /// client has for its request; scrapes close together share one.
    #[tokio::test]
    async fn idle_clients_cannot_keep_a_scrape_out_and_close_scrapes_are_shared() {
        let run_dir = std::env::temp_dir().join(format!("shoji-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&run_dir).unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let endpoint = Endpoint::bind("127.0.0.1:0".parse().unwrap(), run_dir.clone(), log)
            .await
            .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let server = tokio::spawn(endpoint.serve());
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let began = Instant::now();
        let first = tokio::time::timeout(HEADER_TIMEOUT * 3, get(addr))
            .await
            .expect("a scrape behind idle connections");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(
            began.elapsed() < HEADER_TIMEOUT * 2,
            "{:?}",
            began.elapsed()
        );
        // The same text (its scrape duration included) within the cache's lifetime.
        let body = |r: &str| r.split_once("\r\n\r\n").unwrap().1.to_string();
        let second = get(addr).await;
        assert_eq!(body(&first), body(&second));
        assert!(body(&first).contains("shoji_scrape_duration_seconds"));
        server.abort();
        std::fs::remove_dir_all(run_dir).unwrap();
    }
}
