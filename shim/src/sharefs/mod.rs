//! The directory a sandbox exports to its guest, and the virtiofsd that serves it.
//!
//! virtiofsd only sees mounts added under its shared directory after it started if they
//! propagate into its mount namespace, and `/` is often a private mount. So the directory
//! is made a shared mount point of its own before virtiofsd starts, and every container
//! rootfs or volume is mounted under it afterwards (mounts before the agent is told, so
//! the guest never caches an empty directory).
mod mounts;
mod virtiofsd;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use nix::mount::{mount, MsFlags};

use self::mounts::{make_mountpoint, mount_err, restrict, split_options};
pub use self::{
    mounts::{mounts_under, remove_tree, unmount, unmount_tree, BindMode, MountError, ReadOnly},
    virtiofsd::{Virtiofsd, VirtiofsdOptions},
};

/// The shared directory: its own shared mount point (bind D D, make it private, then
/// shared), so mounts added under it later propagate into virtiofsd's mount namespace.
///
/// virtiofsd exports a second view of it ([`SharedDir::export`]): a read-only slave bind
/// made before any container mount. Mounts added to D propagate into the view with their
/// own flags (a read-write volume stays writable), but the guest cannot create, change or
/// remove anything in D itself.
#[derive(Debug)]
pub struct SharedDir {
    path: PathBuf,
    export: PathBuf,
    /// Set when teardown begins: a mount racing it would outlive the unmount.
    closed: AtomicBool,
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
            closed: AtomicBool::new(false),
        })
    }

    /// The read-only view to hand to virtiofsd.
    pub fn export(&self) -> &Path {
        &self.export
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_target(&self, rel: &Path) -> Result<PathBuf, MountError> {
        let target = self.path.join(rel);
        if self.closed.load(Ordering::SeqCst) {
            return Err(MountError {
                op: "mount (the sandbox is stopping)".into(),
                target,
                source: std::io::ErrorKind::NotConnected.into(),
            });
        }
        Ok(target)
    }

    /// Bind-mounts `source` (a directory or a file) at `rel` under the shared directory as
    /// `mode` says, always nosuid and nodev on the host. Returns the host target.
    pub fn bind(&self, source: &Path, rel: &Path, mode: BindMode) -> Result<PathBuf, MountError> {
        let target = self.open_target(rel)?;
        let is_dir = source
            .metadata()
            .map_err(|e| MountError {
                op: "stat bind source".into(),
                target: source.into(),
                source: e,
            })?
            .is_dir();
        make_mountpoint(&target, is_dir)?;
        let mut flags = MsFlags::MS_BIND;
        if mode.recursive {
            flags |= MsFlags::MS_REC;
        }
        mount(Some(source), &target, None::<&str>, flags, None::<&str>)
            .map_err(mount_err(format!("bind {}", source.display()), &target))?;
        if let Err(e) = restrict(&target, mode.read_only) {
            let _ = unmount_tree(&target);
            return Err(e);
        }
        Ok(target)
    }

    /// The mounts nested below `rel` (not `rel` itself), as paths relative to the shared
    /// directory, parents first.
    pub fn nested_mounts(&self, rel: &Path) -> Vec<PathBuf> {
        let root = self.path.join(rel);
        let mut nested: Vec<PathBuf> = mounts_under(&root)
            .into_iter()
            .filter(|p| p != &root)
            .filter_map(|p| p.strip_prefix(&self.path).ok().map(Path::to_path_buf))
            .collect();
        nested.sort();
        nested.dedup();
        nested.sort_by_key(|p| p.components().count());
        nested
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
        let target = self.open_target(rel)?;
        make_mountpoint(&target, true)?;
        let (flags, data) = split_options(options);
        let flags = flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
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

    /// Unmounts `rel` and everything below it and removes its directories (never crossing
    /// a mount that would not go). Idempotent.
    pub fn remove(&self, rel: &Path) -> Result<(), MountError> {
        let root = self.path.join(rel);
        unmount_tree(&root)?;
        remove_tree(&root)
    }

    /// Refuses new mounts from now on: teardown has begun, and a mount racing it would
    /// outlive the unmount.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ro` makes the bind read-only and leaves the mounts below it as they are (runc's
    /// behaviour); `rro` makes all of them read-only; a plain `bind` does not bring them.
    #[test]
    fn read_only_binds_follow_ro_rro_and_recursion() {
        let base = std::env::temp_dir().join(format!("shoji-sharefs-{}", std::process::id()));
        let src = base.join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        let none = None::<&str>;
        mount(
            Some("tmpfs"),
            &src.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        let shared = SharedDir::create(&base.join("shared"), &base.join("export")).unwrap();
        let writable = |p: &Path| std::fs::write(p.join("probe"), b"x").is_ok();
        let bind = |rel: &str, opts: &[&str]| {
            let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
            shared
                .bind(&src, Path::new(rel), BindMode::from_options(&opts))
                .unwrap()
        };
        let ro = bind("ro", &["rbind", "ro"]);
        assert!(!writable(&ro));
        assert!(writable(&ro.join("sub")));
        let rro = bind("rro", &["rbind", "rro"]);
        assert!(!writable(&rro));
        assert!(!writable(&rro.join("sub")));
        let flat = bind("flat", &["bind"]);
        assert!(writable(&flat));
        assert!(!mounts_under(&flat).iter().any(|m| m.ends_with("sub")));
        shared.close();
        assert!(shared
            .bind(&src, Path::new("late"), BindMode::from_options(&[]))
            .is_err());
        unmount_tree(&base).unwrap();
        remove_tree(&base).unwrap();
    }
}
