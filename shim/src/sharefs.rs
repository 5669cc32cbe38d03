//! The directory a sandbox exports to its guest, and the virtiofsd that serves it.
//!
//! virtiofsd only sees mounts added under its shared directory after it started if they
//! propagate into its mount namespace, and `/` is often a private mount. So the directory
//! is made a shared mount point of its own before virtiofsd starts (REFERENCE §2), and
//! every container rootfs or volume is mounted under it afterwards.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

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
            return Err(HypervisorError::Missing {
                what: "virtiofsd",
                path: share.virtiofsd.clone(),
            });
        }
        let _ = std::fs::remove_file(&share.socket);
        let mut cmd = Command::new(&share.virtiofsd);
        cmd.arg(format!("--socket-path={}", share.socket.display()))
            .arg(format!("--shared-dir={}", share.shared_dir.display()))
            .arg(format!("--cache={}", share.cache))
            .args([
                "--sandbox=namespace",
                "--thread-pool-size=1",
                "--announce-submounts",
                "--xattr",
            ]);
        let daemon =
            Daemon::spawn("virtiofsd", cmd, log).map_err(|source| HypervisorError::Spawn {
                what: "virtiofsd",
                source,
            })?;
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
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("no output (see {})", log.display()))
}

/// A failed mount operation, naming what was mounted where.
#[derive(Debug, thiserror::Error)]
#[error("{op} {target}: {source}")]
pub struct MountError {
    pub op: String,
    pub target: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn mount_err(op: impl Into<String>, target: &Path) -> impl FnOnce(nix::Error) -> MountError + '_ {
    let op = op.into();
    move |e| MountError {
        op,
        target: target.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

/// The directory shared with the guest: its own shared mount point (bind D D, make it
/// private, then shared), so rootfs and volume mounts added under it later propagate into
/// virtiofsd's mount namespace (REFERENCE §2). Mount everything under it before telling
/// the agent, so the guest never caches an empty directory.
///
/// virtiofsd exports a second view of it ([`SharedDir::export`]): a read-only slave bind
/// made before any container mount. Mounts added to D propagate into the view with their
/// own flags (a read-write volume stays writable), but the guest cannot create, change or
/// remove anything in D itself.
#[derive(Debug)]
pub struct SharedDir {
    path: PathBuf,
    export: PathBuf,
}

impl SharedDir {
    /// Creates `path` as a shared mount point and `export` as its read-only view. Call
    /// before virtiofsd starts. On error, what was mounted stays for the caller's teardown
    /// ([`unmount_tree`] of a parent directory).
    pub fn create(path: &Path, export: &Path) -> Result<SharedDir, MountError> {
        for dir in [path, export] {
            std::fs::create_dir_all(dir).map_err(|source| MountError {
                op: "mkdir".into(),
                target: dir.into(),
                source,
            })?;
        }
        let none = None::<&str>;
        mount(Some(path), path, none, MsFlags::MS_BIND, none).map_err(mount_err("bind", path))?;
        mount(none, path, none, MsFlags::MS_PRIVATE, none)
            .map_err(mount_err("make-private", path))?;
        mount(none, path, none, MsFlags::MS_SHARED, none)
            .map_err(mount_err("make-shared", path))?;
        mount(Some(path), export, none, MsFlags::MS_BIND, none)
            .map_err(mount_err("bind", export))?;
        mount(none, export, none, MsFlags::MS_SLAVE, none)
            .map_err(mount_err("make-slave", export))?;
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(none, export, none, ro, none).map_err(mount_err("remount read-only", export))?;
        Ok(SharedDir {
            path: path.to_path_buf(),
            export: export.to_path_buf(),
        })
    }

    /// The read-only view to hand to virtiofsd.
    pub fn export(&self) -> &Path {
        &self.export
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bind-mounts `source` (a directory or a file) at `rel` under the shared directory,
    /// read-only if asked. Returns the host target.
    pub fn bind(&self, source: &Path, rel: &Path, read_only: bool) -> Result<PathBuf, MountError> {
        let target = self.path.join(rel);
        let is_dir = source
            .metadata()
            .map_err(|e| MountError {
                op: "stat bind source".into(),
                target: source.into(),
                source: e,
            })?
            .is_dir();
        make_mountpoint(&target, is_dir)?;
        let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
        mount(Some(source), &target, None::<&str>, flags, None::<&str>)
            .map_err(mount_err(format!("bind {}", source.display()), &target))?;
        if read_only {
            let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = mount(None::<&str>, &target, None::<&str>, ro, None::<&str>) {
                let _ = unmount(&target);
                return Err(mount_err("remount read-only", &target)(e));
            }
        }
        Ok(target)
    }

    /// Mounts a filesystem (e.g. containerd's overlay snapshot) at `rel` under the shared
    /// directory; `options` are the mount(8) options. Returns the host target.
    pub fn mount_fs(
        &self,
        fstype: &str,
        source: &str,
        rel: &Path,
        options: &[String],
    ) -> Result<PathBuf, MountError> {
        let target = self.path.join(rel);
        make_mountpoint(&target, true)?;
        let (flags, data) = split_options(options);
        mount(
            Some(source),
            &target,
            Some(fstype),
            flags,
            Some(data.as_str()),
        )
        .map_err(mount_err(format!("mount {fstype} {source}"), &target))?;
        Ok(target)
    }

    /// Unmounts the view, everything under the shared directory and the directory itself,
    /// then removes both.
    pub fn destroy(&self) -> Result<(), MountError> {
        for dir in [&self.export, &self.path] {
            unmount_tree(dir)?;
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(MountError {
                        op: "remove".into(),
                        target: dir.clone(),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn make_mountpoint(target: &Path, dir: bool) -> Result<(), MountError> {
    let err = |source| MountError {
        op: "create mount point".into(),
        target: target.into(),
        source,
    };
    if dir {
        std::fs::create_dir_all(target).map_err(err)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target)
            .map(drop)
            .map_err(err)
    }
}

/// Splits mount(8) options into flags and the filesystem's data string.
fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Unmounts one mount point: a plain unmount first, a lazy one when busy (virtiofsd holds
/// inodes until the guest lets go). Not mounted or gone counts as success.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(nix::Error::EBUSY) => match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(mount_err("lazy unmount", target)(e)),
        },
        Err(e) => Err(mount_err("unmount", target)(e)),
    }
}

/// Unmounts `root` and every mount below it, deepest first (read from /proc/self/mountinfo).
pub fn unmount_tree(root: &Path) -> Result<(), MountError> {
    let mut targets = mounts_under(root);
    targets.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    targets.iter().try_for_each(|t| unmount(t))
}

/// Mount points equal to or below `root`, each listed once per stacked mount.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            PathBuf::from(
                p.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|p| p.starts_with(root))
        .collect()
}
