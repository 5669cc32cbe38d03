//! `kubectl port-forward` (CRI PortForward) through containerd's streaming server (websocket,
//! `v4.channel.k8s.io`), on containerd 1.7 and 2.x, side by side on runc and on shoji with the
//! same expectations: busybox httpd's page from inside the pod, 512 KiB of random bytes intact,
//! three forwards at once, and a port nothing listens on ending with containerd's forwarding
//! error, after which forwards still work. The runc runs prove the protocol code; on shoji the
//! connection containerd dials in the pod's network namespace crosses into the VM
//! (shim/src/port_forward.rs, agent/src/forward.rs).
use std::time::Duration;

use sha2::{Digest, Sha256};
use shoji_tests::{
    containerd::Version,
    cri::{self, Cri, Forwarded},
    image::BUSYBOX,
    pods::{check, sh_ok, Pods},
    scenario::{self, Env, Runtime, ShojiRuntime},
};

/// Upper bound for one test, so a hang fails instead of stalling CI.
const TEST_LIMIT: Duration = Duration::from_secs(400);
/// Upper bound for one forwarded connection (containerd holds each ~1 s after the server closed).
const FORWARD: Duration = Duration::from_secs(30);
/// How long httpd may take to listen after StartContainer (a VM under TCG).
const HTTPD_UP: Duration = Duration::from_secs(60);
const HTTPD_PORT: u16 = 8080;
/// Nothing listens on it in the pod.
const CLOSED_PORT: u16 = 9;
const PAGE: &str = "shoji busybox httpd";
const BIG: usize = 512 * 1024;

type Result<T = ()> = scenario::Result<T>;

async fn on(version: Version, runtime: &Runtime, net: u8) {
    scenario::in_env(TEST_LIMIT, version, runtime, Some(net), forwards).await
}

/// One forwarded connection to `port` of `pod`, carrying `request`.
async fn forward(cri: &Cri, pod: &str, port: u16, request: &[u8]) -> Result<Forwarded> {
    let url = cri.port_forward_url(pod, &[port]).await?;
    Ok(cri::port_forward(&url, port, request, FORWARD).await?)
}

/// GET `path` from httpd through a forward; returns the body of a 200 answer.
async fn get(cri: &Cri, pod: &str, path: &str) -> Result<Vec<u8>> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let resp = forward(cri, pod, HTTPD_PORT, request.as_bytes()).await?;
    let split = resp.data.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&resp.data[..split.unwrap_or(resp.data.len())]);
    match split {
        Some(at) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(resp.data[at + 4..].to_vec())
        }
        _ => Err(format!(
            "GET {path} through the forward: head {head:?}, error {:?}",
            resp.error
        )
        .into()),
    }
}

fn has_page(body: &[u8]) -> bool {
    String::from_utf8_lossy(body).contains(PAGE)
}

async fn forwards(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("forward", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let web = cri::container_config(
            "web",
            BUSYBOX,
            &["httpd", "-f", "-p", &HTTPD_PORT.to_string(), "-h", "/www"],
        );
        let web = pods.start(&pod, &cfg, &web).await?;

        // The page, once httpd listens.
        let deadline = tokio::time::Instant::now() + HTTPD_UP;
        loop {
            match get(&cri, &pod, "/index.html").await {
                Ok(body) if has_page(&body) => break,
                Ok(body) => {
                    return Err(format!("the page: {:?}", String::from_utf8_lossy(&body)).into())
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(format!("no page within {HTTPD_UP:?}: {e}").into())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }

        // Random bytes, more than one frame's worth, arrive intact.
        let sum = sh_ok(
            &cri,
            &web,
            &format!("head -c {BIG} /dev/urandom > /www/big && sha256sum /www/big"),
        )
        .await?;
        let body = get(&cri, &pod, "/big").await?;
        let got = format!("{:x}", Sha256::digest(&body));
        check(body.len() == BIG && sum.starts_with(&got), || {
            format!(
                "/big through the forward: {} bytes, sha256 {got}; in the pod: {sum}",
                body.len()
            )
        })?;

        // Three at once.
        let (a, b, c) = tokio::join!(
            get(&cri, &pod, "/index.html"),
            get(&cri, &pod, "/index.html"),
            get(&cri, &pod, "/index.html"),
        );
        for body in [a?, b?, c?] {
            check(has_page(&body), || {
                format!("a concurrent forward: {:?}", String::from_utf8_lossy(&body))
            })?;
        }

        // Nothing listens: the stream ends with containerd's error and no data...
        let resp = forward(&cri, &pod, CLOSED_PORT, b"hello\n").await?;
        check(
            resp.data.is_empty()
                && resp
                    .error
                    .contains(&format!("error forwarding port {CLOSED_PORT}")),
            || format!("forward to port {CLOSED_PORT}, where nothing listens: {resp:?}"),
        )?;
        // ... and the next forward still works.
        let body = get(&cri, &pod, "/index.html").await?;
        check(has_page(&body), || {
            format!(
                "the forward after a refused one: {:?}",
                String::from_utf8_lossy(&body)
            )
        })
    })
    .await
}

#[tokio::test]
async fn port_forward_runc_1_7() {
    on(Version::V1_7, &Runtime::runc(), 235).await
}

#[tokio::test]
async fn port_forward_shoji_1_7() {
    on(Version::V1_7, &ShojiRuntime::new("").runtime, 232).await
}

#[tokio::test]
async fn port_forward_runc_2() {
    on(Version::V2, &Runtime::runc(), 233).await
}

#[tokio::test]
async fn port_forward_shoji_2() {
    on(Version::V2, &ShojiRuntime::new("").runtime, 234).await
}
