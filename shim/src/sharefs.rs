//! The directory a sandbox exports to its guest, and the virtiofsd that serves it.
//!
//! virtiofsd only sees mounts added under its shared directory after it started if they
//! propagate into its mount namespace, and `/` is often a private mount. So the directory
//! is made a shared mount point of its own before virtiofsd starts (REFERENCE §2), and
//! every container rootfs or volume is mounted under it afterwards.
use std::{path::Path, process::Command, time::Duration};

use crate::{
    hypervisor::{HypervisorError, Result, ShareDevice},
    process::Daemon,
};

/// A running virtiofsd serving one [`ShareDevice`].
pub struct Virtiofsd {
    daemon: Daemon,
}

impl Virtiofsd {
    /// Starts virtiofsd and returns once its vhost-user socket accepts connections.
    pub async fn start(share: &ShareDevice, log: &Path, timeout: Duration) -> Result<Virtiofsd> {
        if !share.virtiofsd.exists() {
            return Err(HypervisorError::Missing { what: "virtiofsd", path: share.virtiofsd.clone() });
        }
        let _ = std::fs::remove_file(&share.socket);
        let mut cmd = Command::new(&share.virtiofsd);
        cmd.arg(format!("--socket-path={}", share.socket.display()))
            .arg(format!("--shared-dir={}", share.shared_dir.display()))
            .arg(format!("--cache={}", share.cache))
            .args(["--sandbox=namespace", "--thread-pool-size=1", "--announce-submounts", "--xattr"]);
        let daemon = Daemon::spawn("virtiofsd", cmd, log)
            .map_err(|source| HypervisorError::Spawn { what: "virtiofsd", source })?;
        let ready = async {
            loop {
                if let Some(status) = daemon.exited() {
                    return Err(HypervisorError::Died {
                        what: "virtiofsd",
                        status,
                        detail: last_line(log),
                    });
                }
                if share.socket.exists() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        match tokio::time::timeout(timeout, ready).await {
            Ok(Ok(())) => Ok(Virtiofsd { daemon }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                daemon.kill().await;
                Err(HypervisorError::Timeout {
                    what: "virtiofsd socket".into(),
                    timeout,
                    detail: Some(last_line(log)),
                })
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    /// Stops virtiofsd (it normally exits by itself when the VMM disconnects). Idempotent.
    pub async fn stop(&self, grace: Duration) {
        self.daemon.stop(grace).await;
    }
}

/// The last non-empty line of a daemon's log, to put in an error message.
pub fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|s| s.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string))
        .unwrap_or_else(|| format!("no output (see {})", log.display()))
}
