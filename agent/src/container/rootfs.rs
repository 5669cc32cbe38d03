//! A container's root filesystem in the guest: an overlay (source as the read-only lower
//! layer, upper and work dirs on the guest's tmpfs under the container's dir) or a bind
//! mount of the source.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs source {0} is not a directory in the guest")]
    NoSource(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("mounting the rootfs at {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
}

/// Where the rootfs of the container whose directory is `dir` is mounted.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("rootfs")
}

/// Mounts the rootfs at [`path`]`(dir)` and returns that path.
pub fn assemble(source: &Path, guest_overlay: bool, dir: &Path) -> Result<PathBuf, RootfsError> {
    if !source.is_absolute() || !source.is_dir() {
        return Err(RootfsError::NoSource(source.to_path_buf()));
    }
    let target = path(dir);
    mkdir(&target)?;
    let result = if guest_overlay {
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        mkdir(&upper)?;
        mkdir(&work)?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            source.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
    } else {
        mount(
            Some(source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    result.map_err(|source| RootfsError::Mount {
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

fn mkdir(path: &Path) -> Result<(), RootfsError> {
    fs::create_dir_all(path).map_err(|source| RootfsError::Io {
        what: "mkdir",
        path: path.to_path_buf(),
        source,
    })
}

/// Unmounts the rootfs (if mounted) and removes the container's dir. Already gone is success.
pub fn teardown(dir: &Path) -> Result<(), RootfsError> {
    let target = dir.join("rootfs");
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(source) => {
            return Err(RootfsError::Mount {
                path: target,
                source,
            })
        }
    }
    // Never recurse into the rootfs: if anything were still mounted there, the source
    // (a host directory on virtio-fs) would be deleted. An empty mount point goes first.
    for path in [target.as_path(), dir] {
        let removed = if path == dir {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(RootfsError::Io {
                    what: "remove",
                    path: path.to_path_buf(),
                    source: e,
                })
            }
            _ => {}
        }
    }
    Ok(())
}
