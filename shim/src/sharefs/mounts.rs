//! Mount plumbing for the shared directory: mount options, unmounting a tree, and removing
//! directories without ever deleting through a mount point into someone else's files.
use std::{
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use nix::mount::{umount2, MntFlags, MsFlags};

/// A failed mount operation, naming what was mounted where.
#[derive(Debug, thiserror::Error)]
#[error("{op} {target}: {source}")]
pub struct MountError {
    pub op: String,
    pub target: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub(super) fn mount_err(
    op: impl Into<String>,
    target: &Path,
) -> impl FnOnce(nix::Error) -> MountError + '_ {
    let op = op.into();
    move |e| MountError {
        op,
        target: target.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

fn io_err(op: &str, target: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let (op, target) = (op.to_string(), target.to_path_buf());
    move |source| MountError { op, target, source }
}

pub(super) fn make_mountpoint(target: &Path, dir: bool) -> Result<(), MountError> {
    let err = io_err("create mount point", target);
    if dir {
        std::fs::create_dir_all(target).map_err(err)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("create mount point", target))?;
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
pub(super) fn split_options(options: &[String]) -> (MsFlags, String) {
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

/// How a host path is bind-mounted for the guest, from the OCI mount's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindMode {
    /// `rbind`: the mounts below the source come along.
    pub recursive: bool,
    pub read_only: ReadOnly,
    pub propagation: Propagation,
}

/// Whether the host's later mounts below a bind's source reach the bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// No (`private`, `rprivate`, or nothing said: CRI's PROPAGATION_PRIVATE).
    Private,
    /// Yes (`slave`, `rslave`: CRI's HostToContainer).
    Slave,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnly {
    No,
    /// `ro`: the bind itself; mounts below it keep their own flags (as runc does).
    Top,
    /// `rro`: the bind and every mount below it.
    Recursive,
}

impl BindMode {
    /// From OCI mount options (`bind`/`rbind`, `ro`/`rro`/`rw`).
    pub fn from_options(options: &[String]) -> BindMode {
        let has = |o: &str| options.iter().any(|x| x == o);
        BindMode {
            recursive: has("rbind"),
            read_only: if has("rro") {
                ReadOnly::Recursive
            } else if has("ro") {
                ReadOnly::Top
            } else {
                ReadOnly::No
            },
            propagation: if has("rslave") || has("slave") {
                Propagation::Slave
            } else {
                Propagation::Private
            },
        }
    }
}

/// The host side of a bind never runs setuid programs or opens devices the guest could
/// have made (nosuid, nodev on it and everything below it), is read-only as asked, and
/// hears of the host's later mounts below its source only with `slave` propagation (as a
/// container's bind does under runc). `tree` is a detached copy ([`super::namespace::clone_tree`]).
pub(super) fn restrict(tree: &OwnedFd, source: &Path, mode: BindMode) -> Result<(), MountError> {
    let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if mode.read_only == ReadOnly::Recursive {
        set |= MOUNT_ATTR_RDONLY;
    }
    let propagation = match mode.propagation {
        Propagation::Private => libc::MS_PRIVATE,
        Propagation::Slave => libc::MS_SLAVE,
    };
    setattr(tree, source, true, set, propagation)?;
    if mode.read_only == ReadOnly::Top {
        setattr(tree, source, false, MOUNT_ATTR_RDONLY, 0)?;
    }
    Ok(())
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// mount_setattr(2) on the mount `tree` is (with every mount below it when `recursive`):
/// sets the `set` attributes and, unless 0, the propagation type.
fn setattr(
    tree: &OwnedFd,
    source: &Path,
    recursive: bool,
    set: u64,
    propagation: u64,
) -> Result<(), MountError> {
    /// `struct mount_attr` of mount_setattr(2).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: mount_setattr(2) reads the empty path and a mount_attr of the size given,
    // which live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(io_err("mount_setattr on the bind of", source)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
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

/// Unmounts `root` and every mount below it, deepest first (read from the calling
/// thread's mount table).
pub fn unmount_tree(root: &Path) -> Result<(), MountError> {
    let mut targets = mounts_under(root);
    targets.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    targets.iter().try_for_each(|t| unmount(t))
}

/// Mount points equal to or below `root`, each listed once per stacked mount, in the
/// calling thread's mount namespace.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/thread-self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            PathBuf::from(
                p.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Removes `dir` and everything below it, file by file and `rmdir` by `rmdir`, refusing to
/// start while anything below it is still mounted and never descending into another
/// filesystem: an unmount that failed or raced with a late mount must not turn into
/// deleting a volume's host contents. A directory that is already gone is success.
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(io_err("stat", dir))?,
    };
    if let Some(mounted) = mounts_under(dir).into_iter().next() {
        return Err(MountError {
            op: "remove: still mounted".into(),
            target: mounted,
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    if !meta.is_dir() {
        return std::fs::remove_file(dir).map_err(io_err("remove", dir));
    }
    remove_below(dir, meta.dev())
}

fn remove_below(dir: &Path, dev: u64) -> Result<(), MountError> {
    for entry in std::fs::read_dir(dir).map_err(io_err("read", dir))? {
        let path = entry.map_err(io_err("read", dir))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        if meta.dev() != dev {
            return Err(MountError {
                op: "remove: another filesystem".into(),
                target: path,
                source: std::io::Error::from_raw_os_error(libc::EXDEV),
            });
        }
        if meta.is_dir() {
            remove_below(&path, dev)?;
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err("remove", &path)(e))
                }
                _ => {}
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("rmdir", dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use nix::mount::mount;

    use super::*;

    #[test]
    fn remove_tree_never_deletes_through_a_mount() {
        let base = std::env::temp_dir().join(format!("shoji-rmtree-{}", std::process::id()));
        let (tree, precious) = (base.join("tree"), base.join("precious"));
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::create_dir_all(&precious).unwrap();
        std::fs::write(tree.join("a/b/f"), b"x").unwrap();
        std::fs::write(precious.join("keep"), b"x").unwrap();
        std::fs::create_dir(tree.join("a/mnt")).unwrap();
        mount(
            Some(&precious),
            &tree.join("a/mnt"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let err = remove_tree(&tree).unwrap_err();
        assert!(err.to_string().contains("still mounted"), "{err}");
        assert!(precious.join("keep").exists());
        unmount_tree(&tree).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(precious.join("keep").exists());
        remove_tree(&tree).unwrap();
        remove_tree(&base).unwrap();
    }

    #[test]
    fn bind_modes_follow_the_oci_options() {
        let m = |o: &[&str]| {
            BindMode::from_options(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            m(&["rbind", "ro", "rprivate"]),
            BindMode {
                recursive: true,
                read_only: ReadOnly::Top,
                propagation: Propagation::Private,
            }
        );
        assert_eq!(
            m(&["bind", "rro", "rslave"]),
            BindMode {
                recursive: false,
                read_only: ReadOnly::Recursive,
                propagation: Propagation::Slave,
            }
        );
        assert_eq!(m(&["rw"]).read_only, ReadOnly::No);
        assert_eq!(m(&["rw"]).propagation, Propagation::Private);
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = split_options(&[
            "ro".into(),
            "nosuid".into(),
            "lowerdir=/a:/b".into(),
            "upperdir=/u".into(),
        ]);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data, "lowerdir=/a:/b,upperdir=/u");
    }
}
