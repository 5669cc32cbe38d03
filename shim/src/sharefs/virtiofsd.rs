//! virtiofsd: the vhost-user back-end that serves a sandbox's exported directory to the
//! guest. One per VM; it exits by itself when the VMM disconnects.
use std::{path::PathBuf, process::Command, time::Duration};

use super::MountNamespace;
use crate::daemon::{Daemon, DaemonError, ExitWatch, PidLedger};

/// How to run virtiofsd for one VM.
#[derive(Debug, Clone)]
pub struct VirtiofsdOptions {
    pub binary: PathBuf,
    /// `--cache` mode: never, auto, always or metadata.
    pub cache: String,
    /// The directory exported (the shared directory's read-only view).
    pub shared_dir: PathBuf,
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    pub log: PathBuf,
}

pub struct Virtiofsd {
    daemon: Daemon,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Launches virtiofsd; [`Virtiofsd::ready`] waits for its socket, so other daemons can
    /// start meanwhile.
    /// `namespace`: the shared directory's mount namespace, where it runs.
    pub fn spawn(
        opts: &VirtiofsdOptions,
        namespace: &MountNamespace,
        ledger: &dyn PidLedger,
    ) -> Result<Virtiofsd, DaemonError> {
        let _ = std::fs::remove_file(&opts.socket);
        let mut cmd = Command::new(&opts.binary);
        cmd.arg(format!("--socket-path={}", opts.socket.display()))
            .arg(format!("--shared-dir={}", opts.shared_dir.display()))
            .arg(format!("--cache={}", opts.cache))
            .args([
                "--sandbox=namespace",
                // Its default, stated: a system call outside its filter kills it.
                "--seccomp=kill",
                // The guest cannot make device nodes or file capabilities on the host.
                "--modcaps=-mknod:-setfcap",
                "--thread-pool-size=1",
                "--announce-submounts",
                "--xattr",
            ]);
        namespace
            .enter_on_exec(&mut cmd)
            .map_err(|e| DaemonError::Spawn {
                what: "virtiofsd",
                source: e.source,
            })?;
        Ok(Virtiofsd {
            daemon: Daemon::spawn("virtiofsd", cmd, &opts.log, ledger)?,
            socket: opts.socket.clone(),
        })
    }

    /// Resolves once the vhost-user socket exists. (Not by connecting: virtiofsd serves
    /// exactly one connection, the VMM's.)
    pub async fn ready(&self, timeout: Duration) -> Result<(), DaemonError> {
        let socket = self.socket.clone();
        self.daemon
            .wait_ready("vhost-user socket", timeout, move || {
                // It binds before it sandboxes itself: in the shim's network namespace.
                crate::procfs::unix_listening(std::process::id(), &socket)
            })
            .await
    }

    pub fn exit_watch(&self) -> ExitWatch {
        self.daemon.exit_watch()
    }

    /// Stops virtiofsd (it normally exits by itself when the VMM disconnects) and removes
    /// its socket. Idempotent.
    pub async fn stop(&self, grace: Duration) {
        self.daemon.stop(grace).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}
