//! Calls to Cloud Hypervisor's REST API, each with a timeout and CH's error text.
//!
//! Typed calls go through `cloud-hypervisor-client`; `vm.add-net` is written by hand
//! because the tap fds must ride on the request as SCM_RIGHTS, which the client cannot do.
use std::{
    future::Future,
    io::IoSlice,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use cloud_hypervisor_client::{
    apis::{DefaultApi, Error as ClientError},
    models::{NetConfig, VmConfig, VmInfo, VmResize, VmmPingResponse},
    socket_based_api_client, SocketBasedApiClient,
};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::{
    io::{AsyncReadExt, Interest},
    net::UnixStream,
};

use crate::hypervisor::{HypervisorError, Result};

pub struct Api {
    client: SocketBasedApiClient,
    socket: PathBuf,
    timeout: Duration,
}

impl Api {
    /// `timeout` bounds every call that does not take its own.
    pub fn new(socket: &Path, timeout: Duration) -> Api {
        Api {
            client: socket_based_api_client(socket),
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    pub async fn ping(&self, timeout: Duration) -> Result<VmmPingResponse> {
        call("vmm.ping", timeout, self.client.vmm_ping_get()).await
    }

    pub async fn create(&self, config: VmConfig) -> Result<()> {
        call("vm.create", self.timeout, self.client.create_vm(config)).await
    }

    pub async fn boot(&self, timeout: Duration) -> Result<()> {
        call("vm.boot", timeout, self.client.boot_vm()).await
    }

    pub async fn info(&self) -> Result<VmInfo> {
        call("vm.info", self.timeout, self.client.vm_info_get()).await
    }

    pub async fn resize(&self, resize: VmResize) -> Result<()> {
        call("vm.resize", self.timeout, self.client.vm_resize_put(resize)).await
    }

    pub async fn shutdown_vm(&self, timeout: Duration) -> Result<()> {
        call(
            "vm.shutdown",
            timeout.min(self.timeout),
            self.client.shutdown_vm(),
        )
        .await
    }

    pub async fn shutdown_vmm(&self, timeout: Duration) -> Result<()> {
        call(
            "vmm.shutdown",
            timeout.min(self.timeout),
            self.client.shutdown_vmm(),
        )
        .await
    }

    /// `PUT vm.add-net` with the tap fd attached. On a created (not booted) VM CH answers
    /// 204 and only records the device; it is realized by `vm.boot`.
    pub async fn add_net(&self, net: &NetConfig, tap: BorrowedFd<'_>) -> Result<()> {
        let body = serde_json::to_string(net).expect("NetConfig serializes");
        let fds = [tap.as_raw_fd()];
        let request = put_with_fds(&self.socket, "vm.add-net", &body, &fds);
        let (status, body) = tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| timeout_error("vm.add-net", self.timeout))?
            .map_err(|source| HypervisorError::Io {
                context: "cloud-hypervisor API vm.add-net".into(),
                source,
            })?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(HypervisorError::Api {
                call: "vm.add-net".into(),
                status,
                body: readable_error(&body),
            })
        }
    }
}

async fn call<T>(
    name: &'static str,
    timeout: Duration,
    request: impl Future<Output = std::result::Result<T, ClientError>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, request).await {
        Err(_) => Err(timeout_error(name, timeout)),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(ClientError::Api(e))) => Err(HypervisorError::Api {
            call: name.into(),
            status: e.code.as_u16(),
            body: readable_error(&e.body),
        }),
        Ok(Err(e)) => Err(HypervisorError::Io {
            context: format!("cloud-hypervisor API {name}"),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

fn timeout_error(call: &str, timeout: Duration) -> HypervisorError {
    HypervisorError::Timeout {
        what: format!("cloud-hypervisor API call {call}"),
        timeout,
        detail: None,
    }
}

/// CH answers errors with a JSON array of strings, the error chain from outer to inner:
/// joined with ": " it reads like an ordinary error message.
pub fn readable_error(body: &str) -> String {
    match serde_json::from_str::<Vec<String>>(body) {
        Ok(chain) if !chain.is_empty() => chain.join(": "),
        _ if body.trim().is_empty() => "(empty response body)".into(),
        _ => body.trim().to_string(),
    }
}

/// One HTTP/1.1 PUT on a fresh connection, the fds attached to the first byte of the
/// request (CH reads them with the request head). Returns status and body.
async fn put_with_fds(
    socket: &Path,
    call: &str,
    body: &str,
    fds: &[i32],
) -> std::io::Result<(u16, String)> {
    let stream = UnixStream::connect(socket).await?;
    let request = format!(
        "PUT /api/v1/{call} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let bytes = request.as_bytes();
    let mut sent = 0;
    while sent < bytes.len() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                let rights = [ControlMessage::ScmRights(fds)];
                let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
                let iov = [IoSlice::new(&bytes[sent..])];
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        sent += n;
    }
    read_response(stream).await
}

/// Reads one response: status line, headers, and a body of Content-Length bytes (the
/// connection stays open: CH answers `Connection: keep-alive`).
async fn read_response(mut stream: UnixStream) -> std::io::Result<(u16, String)> {
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad HTTP response: {what}"),
        )
    };
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed before the end of the headers"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>().map_err(|_| bad("Content-Length")))
        .transpose()?
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed inside the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_is_joined() {
        let body = r#"["Error from API","The VM could not boot","Cannot open kernel file","No such file or directory (os error 2)"]"#;
        assert_eq!(
            readable_error(body),
            "Error from API: The VM could not boot: Cannot open kernel file: No such file or directory (os error 2)"
        );
        assert_eq!(readable_error(""), "(empty response body)");
        assert_eq!(readable_error("plain text\n"), "plain text");
    }
}
