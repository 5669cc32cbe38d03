//! The listening end of libcontainer's console socket: a tty process's pty master arrives
//! on it (SCM_RIGHTS).
use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::net::UnixListener;

/// The listening end of libcontainer's console socket, over which a tty process's pty
/// master arrives.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// A new socket in `dir`.
    pub fn bind(dir: &Path) -> io::Result<ConsoleSocket> {
        // sun_path holds 108 bytes: a short counter name, not the container id.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&path);
        Ok(ConsoleSocket {
            listener: UnixListener::bind(&path)?,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pty master sent by the container's init (already queued once the helper succeeded).
    pub async fn receive(&self, timeout: Duration) -> io::Result<OwnedFd> {
        let receive = async {
            let (conn, _) = self.listener.accept().await?;
            loop {
                conn.readable().await?;
                let got = conn.try_io(tokio::io::Interest::READABLE, || {
                    let mut name = [0u8; 256];
                    let mut iov = [io::IoSliceMut::new(&mut name)];
                    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
                    let msg = recvmsg::<()>(
                        conn.as_raw_fd(),
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(fds) = cmsg {
                            if let Some(fd) = fds.first() {
                                // SAFETY: SCM_RIGHTS gave us a new descriptor we now own.
                                return Ok(Some(unsafe {
                                    <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(*fd)
                                }));
                            }
                        }
                    }
                    Ok(None)
                });
                match got {
                    Ok(Some(fd)) => return Ok(fd),
                    Ok(None) => {
                        return Err(io::Error::other("console socket message carried no fd"))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        tokio::time::timeout(timeout, receive)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no pty master on the console socket",
                ))
            })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
