//! Stream connections to the agent's IO port ([`shoji_agent_api::stream`]): a process's stdio,
//! or one port-forwarded TCP connection.
use shoji_agent_api::{
    stream::{self, StreamError, StreamHeader, StreamKind, StreamRequest},
    IO_PORT,
};
use tokio::net::UnixStream;

use super::{vsock::dial, AgentClient, AgentError, Result};

impl AgentClient {
    /// Opens one stdio stream of a process: after this returns, stdout/stderr/tty output can
    /// be read raw and stdin written in frames. Attach before StartProcess so no output is
    /// missed.
    pub async fn open_stream(
        &self,
        kind: StreamKind,
        container_id: &str,
        exec_id: &str,
    ) -> Result<UnixStream> {
        let request = StreamRequest::Process(StreamHeader {
            kind,
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        });
        self.open(&request, |source| AgentError::Stream {
            kind,
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            source,
        })
        .await
    }

    /// Opens a port-forward stream: the agent connected to `localhost:<port>` in the guest,
    /// and the stream is ready for [`shoji_agent_api::forward::splice`]. Nothing listening
    /// there is [`StreamError::Refused`] with the agent's reason.
    pub async fn open_forward(&self, port: u16) -> Result<UnixStream> {
        self.open(&StreamRequest::Forward { port }, |source| {
            AgentError::Forward { port, source }
        })
        .await
    }

    /// Dials the IO port, sends `request` and waits for the verdict, all bounded by the
    /// call timeout.
    async fn open(
        &self,
        request: &StreamRequest,
        fail: impl FnOnce(StreamError) -> AgentError,
    ) -> Result<UnixStream> {
        let mut conn = dial(&self.vsock_socket, IO_PORT, self.call_timeout).await?;
        match tokio::time::timeout(self.call_timeout, stream::open(&mut conn, request)).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(fail(e)),
            Err(_) => Err(fail(StreamError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.call_timeout),
            )))),
        }
    }
}
