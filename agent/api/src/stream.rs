//! Stdio streams: one vsock connection to [`crate::IO_PORT`] per stream of a process.
//!
//! The host opens the connection and sends one header line,
//! `SHOJI-IO 1 <kind> <container_id> <exec_id>\n` (exec_id `-` for the init process),
//! or `SHOJI-IO 1 forward <port>\n` for a port-forward connection ([`crate::forward`]),
//! and the agent answers `OK\n` or `ERR <reason>\n`. After that:
//! * `stdout` / `stderr`: guest → host raw bytes; the agent closes the connection once the
//!   process's pipe reached EOF, so every byte written before exit arrives.
//! * `stdin`: host → guest in frames (`u32` big-endian length + bytes); a zero-length
//!   frame is end-of-input (the agent then closes the process's stdin). Framing keeps EOF
//!   ordered after the data without relying on half-close support in the vsock path.
//! * `tty`: both directions: output raw guest → host, input framed host → guest.
//!
//! Attach streams after CreateContainer/ExecProcess and before StartProcess: the agent
//! only reads output while a stream is attached, so nothing is lost (the pipe holds it).
use std::{fmt, str::FromStr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest stdin frame the agent accepts.
pub const MAX_FRAME: u32 = 1 << 20;
/// Longest header line accepted (kind + two ids of at most 256 bytes each).
pub const MAX_HEADER: usize = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    Tty,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
            StreamKind::Tty => "tty",
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StreamKind {
    type Err = StreamError;
    fn from_str(s: &str) -> Result<Self, StreamError> {
        Ok(match s {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            "tty" => StreamKind::Tty,
            other => {
                return Err(StreamError::BadHeader(format!(
                    "unknown stream kind {other:?}"
                )))
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("bad stream header: {0}")]
    BadHeader(String),
    #[error("stdin frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge(u32),
    #[error("agent refused the stream: {0}")]
    Refused(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The header that opens a stdio stream of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub kind: StreamKind,
    pub container_id: String,
    /// "" for the init process.
    pub exec_id: String,
}

impl StreamHeader {
    pub fn encode(&self) -> String {
        let exec = if self.exec_id.is_empty() {
            "-"
        } else {
            &self.exec_id
        };
        format!("SHOJI-IO 1 {} {} {}\n", self.kind, self.container_id, exec)
    }

    pub fn parse(line: &str) -> Result<Self, StreamError> {
        let bad = |why: &str| StreamError::BadHeader(format!("{why}: {:?}", truncate(line)));
        let mut parts = line.trim_end_matches('\n').split(' ');
        if parts.next() != Some("SHOJI-IO") || parts.next() != Some("1") {
            return Err(bad("expected `SHOJI-IO 1 <kind> <container> <exec>`"));
        }
        let kind = parts.next().ok_or_else(|| bad("missing kind"))?.parse()?;
        let container_id = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("missing container id"))?;
        let exec_id = parts.next().ok_or_else(|| bad("missing exec id"))?;
        if parts.next().is_some() {
            return Err(bad("trailing fields"));
        }
        Ok(StreamHeader {
            kind,
            container_id: container_id.to_string(),
            exec_id: if exec_id == "-" {
                String::new()
            } else {
                exec_id.to_string()
            },
        })
    }
}

/// What a stream connection asks the agent for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    /// One stdio stream of a process.
    Process(StreamHeader),
    /// A TCP connection to `localhost:<port>` in the guest, spliced to this stream.
    Forward { port: u16 },
}

/// The kind word of a port-forward header.
const FORWARD: &str = "forward";

impl StreamRequest {
    pub fn encode(&self) -> String {
        match self {
            StreamRequest::Process(h) => h.encode(),
            StreamRequest::Forward { port } => format!("SHOJI-IO 1 {FORWARD} {port}\n"),
        }
    }

    pub fn parse(line: &str) -> Result<Self, StreamError> {
        let fields: Vec<&str> = line.trim_end_matches('\n').split(' ').collect();
        match fields.as_slice() {
            ["SHOJI-IO", "1", FORWARD, rest @ ..] => match rest {
                [port] => parse_port(port).map(|port| StreamRequest::Forward { port }),
                _ => None,
            }
            .ok_or_else(|| {
                StreamError::BadHeader(format!(
                    "expected `SHOJI-IO 1 forward <port 1-65535>`: {:?}",
                    truncate(line)
                ))
            }),
            _ => StreamHeader::parse(line).map(StreamRequest::Process),
        }
    }
}

/// A TCP port in plain decimal, 1..=65535 (no sign, no leading zero: one spelling per port).
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Reads one `\n`-terminated line byte by byte (so no payload after it is consumed).
pub async fn read_line<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<String, StreamError> {
    let mut buf = Vec::with_capacity(64);
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if buf.len() >= max {
            return Err(StreamError::BadHeader(format!(
                "line longer than {max} bytes"
            )));
        }
        buf.push(b);
    }
    String::from_utf8(buf).map_err(|_| StreamError::BadHeader("line is not UTF-8".into()))
}

/// Host side: sends the header and waits for the agent's verdict.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &StreamRequest,
) -> Result<(), StreamError> {
    s.write_all(request.encode().as_bytes()).await?;
    s.flush().await?;
    let answer = read_line(s, MAX_HEADER).await?;
    match answer.strip_prefix("ERR ") {
        Some(reason) => Err(StreamError::Refused(reason.to_string())),
        None if answer == "OK" => Ok(()),
        None => Err(StreamError::BadHeader(format!(
            "unexpected answer {:?}",
            truncate(&answer)
        ))),
    }
}

/// Writes one stdin frame; an empty `data` is end-of-input.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> Result<(), StreamError> {
    for chunk in data.chunks(MAX_FRAME as usize) {
        w.write_u32(chunk.len() as u32).await?;
        w.write_all(chunk).await?;
    }
    if data.is_empty() {
        w.write_u32(0).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Reads one stdin frame into `buf`; returns false at end-of-input (a zero-length frame).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, StreamError> {
    let len = r.read_u32().await?;
    if len > MAX_FRAME {
        return Err(StreamError::FrameTooLarge(len));
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf).await?;
    Ok(len != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for exec in ["", "e1"] {
            let h = StreamHeader {
                kind: StreamKind::Stderr,
                container_id: "c1".into(),
                exec_id: exec.into(),
            };
            assert_eq!(StreamHeader::parse(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn header_rejects_garbage() {
        for bad in [
            "",
            "GET / HTTP/1.1",
            "SHOJI-IO 1 stdfoo c -",
            "SHOJI-IO 1 stdout",
            "SHOJI-IO 1 stdout c - x",
        ] {
            assert!(StreamHeader::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            StreamRequest::Forward { port: 1 },
            StreamRequest::Forward { port: 8080 },
            StreamRequest::Forward { port: 65535 },
            StreamRequest::Process(StreamHeader {
                kind: StreamKind::Tty,
                container_id: "c1".into(),
                exec_id: "e1".into(),
            }),
        ] {
            assert_eq!(StreamRequest::parse(&r.encode()).unwrap(), r);
        }
        assert_eq!(
            StreamRequest::parse("SHOJI-IO 1 forward 80").unwrap(),
            StreamRequest::Forward { port: 80 }
        );
    }

    #[test]
    fn forward_requests_reject_garbage() {
        for bad in [
            "SHOJI-IO 1 forward",
            "SHOJI-IO 1 forward ",
            "SHOJI-IO 1 forward 0",
            "SHOJI-IO 1 forward 080",
            "SHOJI-IO 1 forward +80",
            "SHOJI-IO 1 forward -1",
            "SHOJI-IO 1 forward 65536",
            "SHOJI-IO 1 forward 4294967376",
            "SHOJI-IO 1 forward 8080 -",
            "SHOJI-IO 1 forward 80x",
            "SHOJI-IO 1 forward 0x50",
            "SHOJI-IO 1 forward  80",
            "SHOJI-IO 2 forward 80",
            "SHOJI-IO 1 FORWARD 80",
            "SHOJI-IO 1 forward \u{0661}",
        ] {
            assert!(StreamRequest::parse(bad).is_err(), "{bad:?} accepted");
        }
        // Process headers still go through their own checks.
        assert!(StreamRequest::parse("SHOJI-IO 1 stdfoo c -").is_err());
    }

    #[tokio::test]
    async fn frames_carry_data_then_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"hello").await.unwrap();
            write_frame(&mut a, b"").await.unwrap();
        });
        let mut buf = Vec::new();
        assert!(read_frame(&mut b, &mut buf).await.unwrap());
        assert_eq!(buf, b"hello");
        assert!(!read_frame(&mut b, &mut buf).await.unwrap());
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_it_is_read() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_u32(&mut a, u32::MAX)
            .await
            .unwrap();
        let mut buf = Vec::new();
        let err = read_frame(&mut b, &mut buf).await.unwrap_err();
        assert!(matches!(err, StreamError::FrameTooLarge(u32::MAX)), "{err}");
        assert!(buf.capacity() < 1 << 20, "nothing was allocated for it");
    }
}
