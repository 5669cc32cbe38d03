//! Scraping `shoji metrics` in tests: a free local address, a plain HTTP GET, and the
//! Prometheus text parsed by a real parser (`prometheus-parse`).
use std::{
    io::{Read, Write},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use prometheus_parse::{Sample, Scrape, Value};

/// Starts `shoji ... metrics --listen <a free local address>` (`cmd` is `shoji` with its
/// global options) and waits until it listens; returns the process (killed on drop) and
/// the address.
pub fn start(mut cmd: Command) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = cmd
        .args(["metrics", "--listen", &addr])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn shoji metrics");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "shoji metrics did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, addr)
}

/// A running `shoji metrics`, killed when dropped.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on `addr` (HTTP/1.0); returns the status line and the body.
pub fn get(addr: &str, path: &str) -> (String, String) {
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to shoji metrics");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(conn, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Scrapes `/metrics` on `addr` and parses it.
pub fn scrape(addr: &str) -> (Scrape, String) {
    let (status, body) = get(addr, "/metrics");
    assert!(status.contains("200"), "{status}\n{body}");
    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    (parsed, body)
}

/// The first sample of `metric` carrying all of `labels`.
pub fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

/// A gauge, counter or untyped sample's value (NaN for a histogram or summary).
pub fn value(s: &Sample) -> f64 {
    match s.value {
        Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}
