//! Clients of containerd's CRI streaming server (the URLs `Cri::exec_url` and
//! `Cri::port_forward_url` return), over its websocket protocols.
use std::time::Duration;

use crate::cri::{Error, ExecOutput};

/// Websocket subprotocols of the CRI streaming server for exec, newest first. v5 can close stdin (channel 255).
const STREAM_PROTOCOLS: &str = "v5.channel.k8s.io, v4.channel.k8s.io";
const CHANNEL_STDIN: u8 = 0;
const CHANNEL_STDOUT: u8 = 1;
const CHANNEL_STDERR: u8 = 2;
const CHANNEL_ERROR: u8 = 3;
const CHANNEL_CLOSE: u8 = 255;

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn stream_error(url: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Stream {
        url: url.into(),
        reason,
    }
}

/// Opens the websocket of a streaming URL offering `protocols`; returns it and the protocol
/// the server chose.
async fn ws_connect(url: &str, protocols: &str) -> Result<(WebSocket, String), Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let fail = stream_error(url);
    let mut req = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .map_err(|e| fail(e.to_string()))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        protocols.parse().map_err(|e| fail(format!("{e}")))?,
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let protocol = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((ws, protocol))
}

/// Runs an exec whose URL came from `Cri::exec_url` over the streaming server's websocket protocol (what
/// `kubectl exec` uses since Kubernetes 1.30): sends `stdin` (then closes it, v5 only), collects stdout/stderr
/// and the exit code from the error channel's Status. Bounded by `limit`.
pub async fn exec_stream(
    url: &str,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<ExecOutput, Error> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let fail = stream_error(url);
    let run = async {
        let (mut ws, protocol) = ws_connect(url, STREAM_PROTOCOLS).await?;
        if let Some(data) = stdin {
            let mut msg = vec![CHANNEL_STDIN];
            msg.extend_from_slice(data);
            ws.send(Message::binary(msg))
                .await
                .map_err(|e| fail(e.to_string()))?;
            if protocol.starts_with("v5.") {
                ws.send(Message::binary(vec![CHANNEL_CLOSE, CHANNEL_STDIN]))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
        let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(msg) = ws.next().await {
            match msg.map_err(|e| fail(e.to_string()))? {
                Message::Binary(b) if !b.is_empty() => match b[0] {
                    CHANNEL_STDOUT => stdout.extend_from_slice(&b[1..]),
                    CHANNEL_STDERR => stderr.extend_from_slice(&b[1..]),
                    CHANNEL_ERROR => status.extend_from_slice(&b[1..]),
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        let exit_code = exit_code_from_status(&status).map_err(&fail)?;
        Ok(ExecOutput {
            exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| fail(format!("no end within {limit:?}")))?
}

const CHANNEL_RESIZE: u8 = 4;

/// One step of an interactive terminal session: a new terminal size, or input typed.
pub enum Input<'a> {
    Resize { width: u16, height: u16 },
    Type(&'a str),
}

/// Drives a terminal session on a streaming URL (`Cri::exec_url` or `Cri::attach_url` with a
/// tty): sends each input, then waits until the terminal's output since that input contains
/// the text paired with it. Returns everything the terminal printed. Bounded by `limit`.
pub async fn tty_session(
    url: &str,
    steps: &[(Input<'_>, &str)],
    limit: Duration,
) -> Result<String, Error> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let fail = stream_error(url);
    let mut output = Vec::new();
    let run = async {
        let (mut ws, _) = ws_connect(url, STREAM_PROTOCOLS).await?;
        for (input, want) in steps {
            let msg = match input {
                Input::Resize { width, height } => {
                    let mut m = vec![CHANNEL_RESIZE];
                    let size = serde_json::json!({ "Width": width, "Height": height });
                    m.extend(serde_json::to_vec(&size).map_err(|e| fail(e.to_string()))?);
                    m
                }
                Input::Type(text) => [&[CHANNEL_STDIN], text.as_bytes()].concat(),
            };
            ws.send(Message::binary(msg))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let from = output.len();
            while !String::from_utf8_lossy(&output[from..]).contains(want) {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if b.first() == Some(&CHANNEL_STDOUT) => {
                        output.extend_from_slice(&b[1..])
                    }
                    Some(Ok(Message::Close(_))) | None => {
                        return Err(fail(format!("the session ended before {want:?} showed")))
                    }
                    Some(Err(e)) => return Err(fail(e.to_string())),
                    Some(Ok(_)) => {}
                }
            }
        }
        Ok::<_, Error>(())
    };
    match tokio::time::timeout(limit, run).await {
        Ok(r) => r.map(|()| String::from_utf8_lossy(&output).into_owned()),
        Err(_) => Err(fail(format!(
            "no end within {limit:?}; the terminal printed {:?}",
            String::from_utf8_lossy(&output)
        ))),
    }
}

/// What one forwarded connection brought back.
#[derive(Debug)]
pub struct Forwarded {
    /// The bytes the server in the pod sent.
    pub data: Vec<u8>,
    /// containerd's error for the forward ("" when it ended cleanly).
    pub error: String,
}

/// The websocket port-forward protocol of the CRI streaming server (`v4.channel.k8s.io`; the
/// other one, SPDY, has no Rust client).
const PORT_FORWARD_PROTOCOL: &str = "v4.channel.k8s.io";
const CHANNEL_DATA: u8 = 0;
const CHANNEL_PORT_ERROR: u8 = 1;

/// Runs one connection through a URL from `Cri::port_forward_url` for the single `port`: sends
/// `request`, then collects what comes back until the server ends the stream. Each port has a
/// data and an error channel, each opened by the server with the port (two bytes, little
/// endian); every message is the channel byte then payload. The protocol cannot half-close,
/// so the request must make the server in the pod close (e.g. HTTP/1.0). Bounded by `limit`.
pub async fn port_forward(
    url: &str,
    port: u16,
    request: &[u8],
    limit: Duration,
) -> Result<Forwarded, Error> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{error::ProtocolError, Error as WsError, Message};
    let fail = stream_error(url);
    let run = async {
        let (mut ws, _) = ws_connect(url, PORT_FORWARD_PROTOCOL).await?;
        let mut msg = vec![CHANNEL_DATA];
        msg.extend_from_slice(request);
        ws.send(Message::binary(msg))
            .await
            .map_err(|e| fail(e.to_string()))?;
        // Per channel: the port prefix still to strip, then the payload.
        let mut channels = [(2usize, Vec::new()), (2usize, Vec::new())];
        while let Some(msg) = ws.next().await {
            let b = match msg {
                Ok(Message::Binary(b)) if !b.is_empty() => b,
                Ok(Message::Close(_))
                | Err(WsError::ConnectionClosed)
                | Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => break,
                Ok(_) => continue,
                Err(e) => return Err(fail(e.to_string())),
            };
            let (prefix, payload) = match b[0] {
                CHANNEL_DATA | CHANNEL_PORT_ERROR => &mut channels[usize::from(b[0])],
                other => return Err(fail(format!("message on unknown channel {other}"))),
            };
            payload.extend_from_slice(&b[1..]);
            if *prefix > 0 && payload.len() >= *prefix {
                let announced = payload.drain(..*prefix).collect::<Vec<_>>();
                if announced != port.to_le_bytes() {
                    return Err(fail(format!(
                        "channel announced port {announced:?}, not {port}"
                    )));
                }
                *prefix = 0;
            }
        }
        let [(_, data), (_, error)] = channels;
        Ok(Forwarded {
            data,
            error: String::from_utf8_lossy(&error).into_owned(),
        })
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| fail(format!("no end within {limit:?}")))?
}

/// The exit code in the streaming error channel's `metav1.Status`: Success is 0; NonZeroExitCode carries the
/// code as the `ExitCode` cause.
fn exit_code_from_status(raw: &[u8]) -> Result<i32, String> {
    if raw.is_empty() {
        return Err("stream ended without a status".into());
    }
    let v: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| format!("bad status {raw:?}: {e}"))?;
    if v["status"] == "Success" {
        return Ok(0);
    }
    v["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["reason"] == "ExitCode")
        .and_then(|c| c["message"].as_str()?.parse().ok())
        .ok_or_else(|| format!("exec failed: {v}"))
}
