//! The directory a sandbox exports to its guest, and the virtiofsd that serves it.
//!
//! Every mount of it lives in the sandbox's own mount namespace ([`MountNamespace`]), where
//! virtiofsd runs too. virtiofsd only sees mounts added under its shared directory after it
//! started if they propagate into its own namespace, so the directory is made a shared
//! mount point of its own before virtiofsd starts, and every container rootfs or volume is
//! mounted under it afterwards (mounts before the agent is told, so the guest never caches
//! an empty directory).
mod mounts;
mod namespace;
mod virtiofsd;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use nix::mount::{mount, MsFlags};

use self::{
    mounts::{make_mountpoint, mount_err, restrict, split_options},
    namespace::{attach, clone_tree},
};
pub use self::{
    mounts::{
        mounts_under, remove_tree, unmount, unmount_tree, BindMode, MountError, Propagation,
        ReadOnly,
    },
    namespace::MountNamespace,
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
    /// Where all of it is mounted; the mounts go with it.
    ns: MountNamespace,
    /// Set when teardown begins: a mount racing it would outlive the unmount.
    closed: AtomicBool,
}

impl SharedDir {
    /// Creates `path` as a shared mount point and `export` as its read-only view, in a new
    /// mount namespace. Call before virtiofsd starts.
    pub fn create(path: &Path, export: &Path) -> Result<SharedDir, MountError> {
        for dir in [path, export] {
            std::fs::create_dir_all(dir).map_err(|source| MountError {
                op: "mkdir".into(),
                target: dir.into(),
                source,
            })?;
        }
        let ns = MountNamespace::create()?;
        ns.run(|| -> Result<(), MountError> {
            let none = None::<&str>;
            mount(Some(path), path, none, MsFlags::MS_BIND, none)
                .map_err(mount_err("bind", path))?;
            mount(none, path, none, MsFlags::MS_PRIVATE, none)
                .map_err(mount_err("make-private", path))?;
            mount(none, path, none, MsFlags::MS_SHARED, none)
                .map_err(mount_err("make-shared", path))?;
            mount(Some(path), export, none, MsFlags::MS_BIND, none)
                .map_err(mount_err("bind", export))?;
            mount(none, export, none, MsFlags::MS_SLAVE, none)
                .map_err(mount_err("make-slave", export))?;
            let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(none, export, none, ro, none).map_err(mount_err("remount read-only", export))
        })??;
        Ok(SharedDir {
            path: path.to_path_buf(),
            export: export.to_path_buf(),
            ns,
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

    /// The mount namespace everything is mounted in (virtiofsd must run in it).
    pub fn namespace(&self) -> &MountNamespace {
        &self.ns
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
    /// `mode` says, always nosuid and nodev on the host. The source is seen as the caller
    /// sees it (a copy made here, attached in the sandbox's namespace). Returns the target.
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
        let tree = clone_tree(source, mode.recursive)?;
        restrict(&tree, source, mode)?;
        self.ns.run(|| {
            make_mountpoint(&target, is_dir)?;
            attach(&tree, &target)
        })??;
        Ok(target)
    }

    /// The mounts nested below `rel` (not `rel` itself), as paths relative to the shared
    /// directory, parents first.
    pub fn nested_mounts(&self, rel: &Path) -> Result<Vec<PathBuf>, MountError> {
        let root = self.path.join(rel);
        let mut nested: Vec<PathBuf> = self
            .ns
            .run(|| mounts_under(&root))?
            .into_iter()
            .filter(|p| p != &root)
            .filter_map(|p| p.strip_prefix(&self.path).ok().map(Path::to_path_buf))
            .collect();
        nested.sort();
        nested.dedup();
        nested.sort_by_key(|p| p.components().count());
        Ok(nested)
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
        let (flags, data) = split_options(options);
        let flags = flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        self.ns.run(|| {
            make_mountpoint(&target, true)?;
            mount(
                Some(source),
                &target,
                Some(fstype),
                flags,
                Some(data.as_str()),
            )
            .map_err(mount_err(format!("mount {fstype} {source}"), &target))
        })??;
        Ok(target)
    }

    /// Unmounts `rel` and everything below it and removes its directories (never crossing
    /// a mount that would not go). Idempotent.
    pub fn remove(&self, rel: &Path) -> Result<(), MountError> {
        let root = self.path.join(rel);
        self.ns.run(|| {
            unmount_tree(&root)?;
            remove_tree(&root)
        })?
    }

    /// Refuses new mounts from now on: teardown has begun, and a mount racing it would
    /// outlive the unmount.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Unmounts everything (the directories stay for the caller's teardown). Idempotent.
    pub fn unmount_all(&self) -> Result<(), MountError> {
        self.ns.run(|| {
            unmount_tree(&self.export)?;
            unmount_tree(&self.path)
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("shoji-sharefs-{name}-{}", std::process::id()))
    }

    fn tmpfs(at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        let none = None::<&str>;
        mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), none).unwrap();
    }

    fn opts(o: &[&str]) -> BindMode {
        BindMode::from_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// `ro` makes the bind read-only and leaves the mounts below it as they are (runc's
    /// behaviour); `rro` makes all of them read-only; a plain `bind` does not bring them.
    #[test]
    fn read_only_binds_follow_ro_rro_and_recursion() {
        let base = base("ro");
        let src = base.join("src");
        tmpfs(&src.join("sub"));
        let shared = SharedDir::create(&base.join("shared"), &base.join("export")).unwrap();
        let writable = |p: PathBuf| {
            shared
                .namespace()
                .run(|| std::fs::write(p.join("probe"), b"x").is_ok())
                .unwrap()
        };
        let bind = |rel: &str, o: &[&str]| shared.bind(&src, Path::new(rel), opts(o)).unwrap();
        let ro = bind("ro", &["rbind", "ro"]);
        assert!(!writable(ro.clone()));
        assert!(writable(ro.join("sub")));
        let rro = bind("rro", &["rbind", "rro"]);
        assert!(!writable(rro.clone()));
        assert!(!writable(rro.join("sub")));
        let flat = bind("flat", &["bind"]);
        assert!(writable(flat.clone()));
        assert_eq!(
            shared.nested_mounts(Path::new("flat")).unwrap(),
            Vec::<PathBuf>::new()
        );
        assert_eq!(
            shared.nested_mounts(Path::new("ro")).unwrap(),
            [PathBuf::from("ro/sub")]
        );
        shared.close();
        assert!(shared.bind(&src, Path::new("late"), opts(&[])).is_err());
        shared.unmount_all().unwrap();
        unmount_tree(&base).unwrap();
        remove_tree(&base).unwrap();
    }

    /// The host's mount table never holds the sandbox's mounts, so a host mount point a
    /// volume copied can go while the pod runs; a host mount made after the bind reaches
    /// it with `rslave` only, as under runc.
    #[test]
    fn binds_stay_out_of_the_hosts_mount_table_and_propagate_as_asked() {
        let base = base("prop");
        let src = base.join("src");
        tmpfs(&src);
        let none = None::<&str>;
        mount(none, &src, none, MsFlags::MS_SHARED, none).unwrap();
        tmpfs(&src.join("nested"));
        let shared = SharedDir::create(&base.join("shared"), &base.join("export")).unwrap();
        let private = shared
            .bind(&src, Path::new("private"), opts(&["rbind"]))
            .unwrap();
        let slave = shared
            .bind(&src, Path::new("slave"), opts(&["rbind", "rslave"]))
            .unwrap();
        assert_eq!(mounts_under(&shared.path), Vec::<PathBuf>::new());
        assert_eq!(mounts_under(&shared.export), Vec::<PathBuf>::new());
        // The nested mount point goes on the host while both binds hold a copy of it.
        nix::mount::umount2(&src.join("nested"), nix::mount::MntFlags::empty()).unwrap();
        std::fs::remove_dir(src.join("nested")).unwrap();
        // A later host mount reaches the slave bind and the guest's view, not the private one.
        tmpfs(&src.join("later"));
        std::fs::write(src.join("later/hello"), b"x").unwrap();
        let export = shared.export.clone();
        let seen = |p: PathBuf| {
            shared
                .namespace()
                .run(|| p.join("later/hello").exists())
                .unwrap()
        };
        assert!(seen(slave.clone()));
        assert!(seen(export.join("slave")));
        assert!(!seen(private.clone()));
        assert!(!seen(export.join("private")));
        shared.unmount_all().unwrap();
        unmount_tree(&base).unwrap();
        remove_tree(&base).unwrap();
    }
}
