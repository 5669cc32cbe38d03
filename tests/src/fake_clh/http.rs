//! The fake's HTTP/1.1 over the API socket: requests with the fds that ride on them,
//! responses in CH's wire format, and a raw client for tests of the wire format itself.
use std::{
    io::{IoSliceMut, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde_json::{json, Value};

pub(super) struct Request {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) body: Vec<u8>,
}

pub(super) struct Response {
    pub(super) status: u16,
    pub(super) body: Option<String>,
    /// What the process does once the response is written.
    pub(super) then: Then,
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Then {
    Serve,
    /// Exits on its own (vmm.shutdown).
    Exit,
    /// Is killed with SIGKILL, as by the OOM killer (`--fake-die-after`).
    Die,
}

pub(super) fn ok() -> Response {
    Response {
        status: 204,
        body: None,
        then: Then::Serve,
    }
}

pub(super) fn json_response(status: u16, v: Value) -> Response {
    Response {
        status,
        body: Some(v.to_string()),
        then: Then::Serve,
    }
}

pub(super) fn error(status: u16, chain: &[&str]) -> Response {
    json_response(status, json!(chain))
}

/// Reads one HTTP/1.1 request, collecting any fds that arrive with its bytes. `buf` keeps
/// bytes of a following request. `Ok(None)` when the peer closed the connection.
pub(super) fn read_request(
    conn: &UnixStream,
    buf: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if recv_chunk(conn, buf, fds)? == 0 {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        if recv_chunk(conn, buf, fds)? == 0 {
            return Ok(None);
        }
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Ok(Some(Request { method, path, body }))
}

pub(super) fn recv_chunk(
    conn: &UnixStream,
    buf: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 32]);
    let mut iov = [IoSliceMut::new(&mut chunk)];
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: the kernel just installed these fds in our table; we own them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

pub(super) fn encode(r: &Response) -> Vec<u8> {
    let reason = match r.status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n",
        r.status
    );
    match &r.body {
        None => out.push_str("\r\n"),
        Some(b) if b.is_empty() => out.push_str("Content-Length: 0\r\n\r\n"),
        Some(b) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
    }
    out.into_bytes()
}

/// A raw HTTP exchange with the API socket, for checking the wire format itself.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on `conn` and reads the response (Content-Length framed).
pub fn raw_request(
    conn: &mut UnixStream,
    method: &str,
    call: &str,
    body: &str,
) -> std::io::Result<RawResponse> {
    write!(
        conn,
        "{method} /api/v1/{call} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(RawResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
