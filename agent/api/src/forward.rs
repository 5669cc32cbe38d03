//! Port-forward streams: after `SHOJI-IO 1 forward <port>` and the agent's `OK` (see
//! [`crate::stream`]), the stream carries one TCP connection, the host's end (containerd's
//! connection in the pod's network namespace) spliced to the guest's (the agent's connection
//! to `localhost:<port>`).
//!
//! Both directions are framed like stdin (`u32` big-endian length + bytes); a zero-length
//! frame is that direction's end (the receiver shuts down its socket's write side), so a
//! half-close crosses the VM in order without relying on shutdown support in the vsock
//! path. A stream that ends without its end frame is an abort: the receiver resets its
//! socket. The same [`splice`] runs at both ends.
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::stream::{write_frame, StreamError, MAX_FRAME};

/// Bytes read from the socket per frame.
const CHUNK: usize = 32 * 1024;

/// Copies `socket` ↔ `link` until both directions ended with their end frame (then `Ok`),
/// or either side broke (then `Err`: the caller should reset `socket`, and dropping `link`
/// without an end frame tells the other end to reset its own). Memory stays bounded whatever
/// frame sizes the peer announces.
pub async fn splice<S, L>(socket: S, link: L) -> Result<(), StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sock_rd, mut sock_wr) = tokio::io::split(socket);
    let (mut link_rd, mut link_wr) = tokio::io::split(link);
    let outbound = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = sock_rd.read(&mut buf).await?;
            // An empty frame is the end frame.
            write_frame(&mut link_wr, &buf[..n]).await?;
            if n == 0 {
                return Ok::<_, StreamError>(());
            }
        }
    };
    let inbound = async {
        loop {
            let len = link_rd.read_u32().await?;
            if len == 0 {
                sock_wr.shutdown().await?;
                return Ok::<_, StreamError>(());
            }
            if len > MAX_FRAME {
                return Err(StreamError::FrameTooLarge(len));
            }
            let mut frame = (&mut link_rd).take(u64::from(len));
            if tokio::io::copy(&mut frame, &mut sock_wr).await? < u64::from(len) {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    };
    tokio::try_join!(outbound, inbound).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair of loopback TCP sockets.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// client ⇄ [host splice] ⇄ link ⇄ [guest splice] ⇄ server, all in-process.
    struct Relay {
        client: TcpStream,
        server: TcpStream,
        host: tokio::task::JoinHandle<Result<(), StreamError>>,
        guest: tokio::task::JoinHandle<Result<(), StreamError>>,
    }

    async fn relay() -> Relay {
        let (client, host_side) = tcp_pair().await;
        let (guest_side, server) = tcp_pair().await;
        let (host_link, guest_link) = tokio::io::duplex(4096);
        Relay {
            client,
            server,
            host: tokio::spawn(splice(host_side, host_link)),
            guest: tokio::spawn(splice(guest_side, guest_link)),
        }
    }

    const LIMIT: Duration = Duration::from_secs(10);

    /// Writes `data` on `from` and ends that direction; `to` reads exactly `data`, then EOF.
    async fn one_way(
        from: &mut (impl AsyncWrite + Unpin),
        to: &mut (impl AsyncRead + Unpin),
        data: &[u8],
    ) {
        from.write_all(data).await.unwrap();
        from.shutdown().await.unwrap();
        let got = read_all(to).await;
        assert!(got == data, "{} bytes came, {} went", got.len(), data.len());
    }

    /// Everything `from` sends until its EOF, within [`LIMIT`].
    async fn read_all(from: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, from.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        got
    }

    /// The client shuts its write side after the request and still gets the whole reply.
    #[tokio::test]
    async fn a_half_closed_client_still_gets_the_reply() {
        let Relay {
            mut client,
            mut server,
            host,
            guest,
        } = relay().await;
        let request: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let reply: Vec<u8> = request.iter().rev().copied().collect();
        let expected = request.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            // Reads to EOF: only the client's half-close ends this.
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, expected);
            let reply: Vec<u8> = got.iter().rev().copied().collect();
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
        });
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let got = read_all(&mut client).await;
        assert_eq!(got.len(), reply.len());
        assert!(got == reply);
        server_task.await.unwrap();
        host.await.unwrap().unwrap();
        guest.await.unwrap().unwrap();
    }

    /// The server closes first (a response then EOF) while the client keeps writing: the
    /// client sees EOF, and its later data still reaches the server.
    #[tokio::test]
    async fn the_server_may_close_its_side_first() {
        let Relay {
            mut client,
            mut server,
            host,
            guest,
        } = relay().await;
        one_way(&mut server, &mut client, b"banner").await;
        one_way(&mut client, &mut server, b"late").await;
        host.await.unwrap().unwrap();
        guest.await.unwrap().unwrap();
    }

    /// A link that breaks without an end frame is an error, not an EOF.
    #[tokio::test]
    async fn a_broken_link_is_an_error() {
        let (mut client, host_side) = tcp_pair().await;
        let (host_link, mut guest_link) = tokio::io::duplex(4096);
        let host = tokio::spawn(splice(host_side, host_link));
        write_frame(&mut guest_link, b"part").await.unwrap();
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"part");
        // A frame announced longer than what follows, then the link goes.
        guest_link.write_u32(100).await.unwrap();
        guest_link.write_all(b"short").await.unwrap();
        drop(guest_link);
        let err = tokio::time::timeout(LIMIT, host)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(&err, StreamError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{err}"
        );
    }

    /// An announced frame above the limit is refused before anything is read or allocated.
    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let (_client, host_side) = tcp_pair().await;
        let (host_link, mut guest_link) = tokio::io::duplex(4096);
        let host = tokio::spawn(splice(host_side, host_link));
        guest_link.write_u32(MAX_FRAME + 1).await.unwrap();
        let err = tokio::time::timeout(LIMIT, host)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, StreamError::FrameTooLarge(_)), "{err}");
    }
}
