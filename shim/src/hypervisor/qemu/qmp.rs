//! QEMU's machine protocol: one command per fresh connection, bounded in time.
use std::{path::Path, time::Duration};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::hypervisor::{HypervisorError, Result};

/// Bound on one QMP exchange.
const QMP_TIMEOUT: Duration = Duration::from_secs(3);

/// One QMP command (greeting, capabilities, command); returns the `return` value.
pub async fn command(socket: &Path, command: &str) -> Result<Value> {
    let io_err = |context: String| move |source| HypervisorError::Io { context, source };
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(io_err(format!("connect {}", socket.display())))?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        lines
            .next_line()
            .await
            .map_err(io_err("QMP greeting".into()))?;
        let mut result = Value::Null;
        for cmd in ["qmp_capabilities", command] {
            w.write_all(format!("{}\n", json!({ "execute": cmd })).as_bytes())
                .await
                .map_err(io_err(format!("QMP {cmd}")))?;
            result = loop {
                let line = lines
                    .next_line()
                    .await
                    .map_err(io_err(format!("QMP {cmd}")))?;
                // `quit` may close the connection before answering.
                let Some(line) = line else { break Value::Null };
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if let Some(ret) = v.get("return") {
                    break ret.clone();
                }
                if let Some(err) = v.get("error") {
                    return Err(HypervisorError::Api {
                        call: format!("QMP {cmd}"),
                        status: 0,
                        body: err.to_string(),
                    });
                }
                // Anything else is an asynchronous event: skip it.
            };
        }
        Ok(result)
    };
    tokio::time::timeout(QMP_TIMEOUT, exchange)
        .await
        .map_err(|_| HypervisorError::Timeout {
            what: format!("QMP {command}"),
            timeout: QMP_TIMEOUT,
            detail: None,
        })?
}
