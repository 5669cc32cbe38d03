//! The jail of the processes that serve a VM (the VMM and its vsock back-end), after
//! Firecracker's jailer. Each is spawned as root and, between fork and exec:
//! 1. enters the pod's network namespace, or a new empty one;
//! 2. gets a mount namespace whose root is a fresh tmpfs holding only the paths it was
//!    given, bound at their host paths (so command lines name the same files), read-only
//!    unless given as writable;
//! 3. becomes its sandbox's own uid and gid ([`uids`]), with no capabilities (bounding set
//!    emptied too) and no_new_privs;
//! 4. installs its seccomp filter, when it has one ([`seccomp`]).
//!
//! Everything the child does is prepared before the fork: between fork and exec a
//! multi-threaded parent's child may only make system calls, not allocate.
pub mod seccomp;
pub mod uids;

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{
            ffi::OsStrExt,
            fs::{chown, DirBuilderExt, OpenOptionsExt},
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::Command,
};

pub use uids::{Identity, UidPool};

/// Host paths every dynamically linked program needs: the binaries and libraries under
/// /usr (with the merged-/usr links beside it) and the loader's cache.
const SYSTEM: &[&str] = &["/usr", "/etc/ld.so.cache"];
const USR_LINKS: &[&str] = &["/bin", "/lib", "/lib64", "/sbin"];

/// Why a jail could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{path} cannot be put in the jail: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("jail path {0} is not absolute or holds a NUL byte")]
    BadPath(PathBuf),
    #[error("seccomp filter: {0}")]
    Seccomp(String),
}

/// The network namespace a jailed process runs in.
pub enum JailNet {
    /// A new, empty one: the process reaches the VM's taps only through inherited fds.
    New,
    /// The pod's (its path under /var/run/netns or /proc).
    Enter(File),
}

/// What one jailed process may see and who it runs as.
pub struct Jail {
    identity: Identity,
    /// An empty directory of the sandbox's, where the tmpfs root is mounted.
    root: PathBuf,
    binds: Vec<(PathBuf, Access)>,
    net: JailNet,
    filter: Option<seccompiler::BpfProgram>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Access {
    ReadOnly,
    /// A device it opens, a socket it connects to.
    Writable,
    /// Made (if missing) and given to the jail's uid: where it creates its sockets.
    OwnedDir,
    /// Made (if missing) and given to the jail's uid: a log it opens by name.
    OwnedFile,
}

impl Jail {
    /// A jail for `identity` with the system paths (read-only) and a new network namespace;
    /// `root` is created if missing.
    pub fn new(identity: Identity, root: &Path) -> Jail {
        let mut jail = Jail {
            identity,
            root: root.to_path_buf(),
            binds: Vec::new(),
            net: JailNet::New,
            filter: None,
        };
        for p in SYSTEM {
            jail = jail.read_only(Path::new(p));
        }
        jail
    }

    pub fn read_only(mut self, path: &Path) -> Jail {
        self.binds.push((path.to_path_buf(), Access::ReadOnly));
        self
    }

    /// A device the process opens or a socket it connects to (see [`Jail::grant`]).
    pub fn writable(mut self, path: &Path) -> Jail {
        self.binds.push((path.to_path_buf(), Access::Writable));
        self
    }

    /// A directory the process creates files in; made and given to it at [`Jail::apply`].
    pub fn owned_dir(mut self, path: &Path) -> Jail {
        self.binds.push((path.to_path_buf(), Access::OwnedDir));
        self
    }

    /// A file the process opens by name to write; made and given to it at [`Jail::apply`].
    pub fn owned_file(mut self, path: &Path) -> Jail {
        self.binds.push((path.to_path_buf(), Access::OwnedFile));
        self
    }

    pub fn net(mut self, net: JailNet) -> Jail {
        self.net = net;
        self
    }

    pub fn seccomp(mut self, filter: seccompiler::BpfProgram) -> Jail {
        self.filter = Some(filter);
        self
    }

    /// Lets the jailed uid open `path` (a file or socket the shim made for it).
    pub fn grant(identity: Identity, path: &Path) -> Result<(), JailError> {
        chown(path, Some(identity.uid), Some(identity.gid)).map_err(|source| JailError::Path {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Arranges for `cmd` to start inside the jail.
    pub fn apply(self, cmd: &mut Command) -> Result<(), JailError> {
        let plan = Plan::new(&self)?;
        let net = match self.net {
            JailNet::New => None,
            JailNet::Enter(f) => Some(OwnedFd::from(f)),
        };
        let filter = self.filter;
        let id = self.identity;
        // SAFETY: the closure makes system calls only, on data prepared above; `net` and
        // `filter` move into it and live until the command is spawned.
        unsafe {
            cmd.pre_exec(move || {
                match &net {
                    Some(fd) => check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET))?,
                    None => check(libc::unshare(libc::CLONE_NEWNET))?,
                }
                plan.enter()?;
                drop_privileges(id)?;
                // What it creates (its sockets) is its own alone.
                libc::umask(0o077);
                if let Some(filter) = &filter {
                    let prog = libc::sock_fprog {
                        len: filter.len() as u16,
                        filter: filter.as_ptr() as *mut libc::sock_filter,
                    };
                    check(libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &prog as *const libc::sock_fprog,
                    ))?;
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// The mount namespace of one jail, as C strings ready for the child.
struct Plan {
    root: CString,
    /// Directories and files to create in the tmpfs, parents first.
    dirs: Vec<CString>,
    files: Vec<CString>,
    /// (host path, path in the tmpfs, read-only)
    binds: Vec<(CString, CString, bool)>,
    /// (target, link in the tmpfs): the merged-/usr links.
    links: Vec<(CString, CString)>,
}

impl Plan {
    fn new(jail: &Jail) -> Result<Plan, JailError> {
        let path_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JailError::Path { path, source }
        };
        std::fs::create_dir_all(&jail.root).map_err(path_err(&jail.root))?;
        let inside = |p: &Path| -> Result<CString, JailError> {
            let rel = p
                .strip_prefix("/")
                .map_err(|_| JailError::BadPath(p.into()))?;
            c_path(&jail.root.join(rel))
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut plan = Plan {
            root: c_path(&jail.root)?,
            dirs: Vec::new(),
            files: Vec::new(),
            binds: Vec::new(),
            links: Vec::new(),
        };
        for link in USR_LINKS {
            let link = Path::new(link);
            match std::fs::read_link(link) {
                Ok(target) => plan.links.push((c_path_any(&target)?, inside(link)?)),
                Err(_) if link.is_dir() => {
                    dirs.push(link.to_path_buf());
                    plan.binds.push((c_path(link)?, inside(link)?, true));
                }
                Err(_) => {}
            }
        }
        for (path, access) in &jail.binds {
            match access {
                Access::OwnedDir => match std::fs::DirBuilder::new().mode(0o700).create(path) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(path_err(path)(e))
                    }
                    _ => Jail::grant(jail.identity, path)?,
                },
                Access::OwnedFile => {
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(path_err(path))?;
                    Jail::grant(jail.identity, path)?;
                }
                Access::ReadOnly | Access::Writable => {}
            }
            let meta = std::fs::metadata(path).map_err(path_err(path))?;
            dirs.extend(path.ancestors().skip(1).map(Path::to_path_buf));
            if meta.is_dir() {
                dirs.push(path.clone());
            } else {
                plan.files.push(inside(path)?);
            }
            plan.binds
                .push((c_path(path)?, inside(path)?, *access == Access::ReadOnly));
        }
        dirs.retain(|d| d != Path::new("/"));
        dirs.sort_by_key(|d| d.components().count());
        dirs.dedup();
        plan.dirs = dirs.iter().map(|d| inside(d)).collect::<Result<_, _>>()?;
        Ok(plan)
    }

    /// In the child: a private mount namespace, the tmpfs root with its binds, pivot_root.
    fn enter(&self) -> io::Result<()> {
        const NONE: *const libc::c_char = std::ptr::null();
        // SAFETY: system calls on NUL-terminated strings owned by `self`.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                NONE,
                c"/".as_ptr(),
                NONE,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=256k".as_ptr().cast(),
            ))?;
            for d in &self.dirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(io::Error::last_os_error());
                }
            }
            for f in &self.files {
                let fd = libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                check(fd)?;
                libc::close(fd);
            }
            for (target, link) in &self.links {
                check(libc::symlink(target.as_ptr(), link.as_ptr()))?;
            }
            for (src, dst, read_only) in &self.binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    NONE,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if *read_only {
                    check(libc::mount(
                        NONE,
                        dst.as_ptr(),
                        NONE,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                        std::ptr::null(),
                    ))?;
                }
            }
            check(libc::mount(
                NONE,
                self.root.as_ptr(),
                NONE,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                std::ptr::null(),
            ))?;
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
        }
        Ok(())
    }
}

/// In the child: empties the capability bounding set, then becomes `id` (which clears the
/// permitted and effective sets) with no_new_privs.
fn drop_privileges(id: Identity) -> io::Result<()> {
    // SAFETY: system calls only; `groups` is a stack array.
    unsafe {
        for cap in 0..=libc::c_ulong::from(63u8) {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(io::Error::last_os_error());
            }
        }
        let groups = [id.kvm_gid.unwrap_or(id.gid)];
        check(libc::setgroups(1, groups.as_ptr()))?;
        check(libc::setresgid(id.gid, id.gid, id.gid))?;
        check(libc::setresuid(id.uid, id.uid, id.uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    match rc {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

fn c_path(p: &Path) -> Result<CString, JailError> {
    if !p.is_absolute() {
        return Err(JailError::BadPath(p.into()));
    }
    c_path_any(p)
}

/// A symlink's target, which may be relative.
fn c_path_any(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::BadPath(p.into()))
}
