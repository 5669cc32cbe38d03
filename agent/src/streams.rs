//! The stream listener's router (vsock port 1025, protocol in `shoji_agent_api::stream`): a
//! connection's header names a process's stdio stream, which [`crate::io`] then serves, or a
//! port to forward to, which [`crate::forward`] relays. Anything else is refused with its reason.
use std::{sync::Arc, time::Duration};

use shoji_agent_api::stream::{read_line, StreamRequest, MAX_HEADER};
use slog::debug;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::{forward, io, logger::log, runtime::Runtime};

/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one stream connection: header, verdict, then the data in its direction(s).
pub async fn serve<S>(runtime: Arc<Runtime>, mut conn: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request = match tokio::time::timeout(HEADER_TIMEOUT, read_line(&mut conn, MAX_HEADER)).await
    {
        Ok(Ok(line)) => StreamRequest::parse(&line).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no header within {HEADER_TIMEOUT:?}")),
    };
    let header = match request {
        Ok(StreamRequest::Forward { port }) => {
            return match forward::connect(port).await {
                Ok(target) => forward::relay(conn, target, port).await,
                Err(reason) => refuse(conn, &reason).await,
            }
        }
        Ok(StreamRequest::Process(h)) => h,
        Err(reason) => return refuse(conn, &reason).await,
    };
    let attached = runtime
        .process_io(&header.container_id, &header.exec_id)
        .map_err(|e| e.to_string())
        .and_then(|pio| Ok((pio.attach(header.kind)?, pio)));
    match attached {
        Ok((attached, pio)) => {
            debug!(log(), "stream attached"; "container" => &header.container_id,
                "exec" => &header.exec_id, "stream" => %header.kind);
            io::serve_attached(pio, header.kind, attached, conn).await
        }
        Err(reason) => refuse(conn, &reason).await,
    }
}

/// Answers `ERR <reason>` and closes the stream.
async fn refuse<S: AsyncWrite + Unpin>(mut conn: S, reason: &str) {
    debug!(log(), "refused a stream"; "reason" => reason);
    let line = format!("ERR {}\n", reason.replace('\n', " "));
    let _ = conn.write_all(line.as_bytes()).await;
    let _ = conn.shutdown().await;
}
