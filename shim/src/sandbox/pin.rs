//! The guest kernel and initramfs a sandbox boots from, held for its lifetime.
//!
//! `hack/install.sh` keeps one directory per build (`<share>/boot/<key>/`, with `current`
//! pointing at the newest) and removes an older one only under an exclusive lock on its
//! `in-use.lock`. A sandbox resolves the configured paths once (so an upgrade that moves
//! `current` does not change them under it) and holds a shared lock on that file until it is
//! torn down: the installer keeps the directory. Paths outside such a directory (no lock file
//! beside them, e.g. a development cache) are only resolved.
use std::{
    fs::File,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use super::{Result, SandboxError};

/// The lock file of an installed boot-image directory (hack/install.sh writes it).
pub const LOCK_FILE: &str = "in-use.lock";
/// How often a sandbox retries while an install removes the directory it resolved to (the
/// installer holds its lock for milliseconds).
const ATTEMPTS: u32 = 100;
const RETRY: Duration = Duration::from_millis(20);

/// Resolved boot images and the locks that keep their directory.
pub struct BootImages {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    _locks: Vec<Flock<File>>,
}

impl std::fmt::Debug for BootImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootImages")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("locked", &self._locks.len())
            .finish()
    }
}

/// Why one attempt did not pin the images.
enum Attempt {
    /// An install is removing the directory they resolved to: resolve again.
    Retry,
    Failed(SandboxError),
}

/// Resolves `kernel` and `initrd` and locks their installed directory (shared).
pub async fn pin(kernel: &Path, initrd: &Path) -> Result<BootImages> {
    for _ in 0..ATTEMPTS {
        match try_pin(kernel, initrd) {
            Ok(images) => return Ok(images),
            Err(Attempt::Failed(e)) => return Err(e),
            Err(Attempt::Retry) => tokio::time::sleep(RETRY).await,
        }
    }
    Err(SandboxError::Invalid(format!(
        "the boot images {} and {} kept being removed while this sandbox tried to lock them",
        kernel.display(),
        initrd.display()
    )))
}

fn resolve(what: &'static str, path: &Path) -> std::result::Result<PathBuf, Attempt> {
    std::fs::canonicalize(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Attempt::Failed(SandboxError::Missing {
            what,
            path: path.to_path_buf(),
        }),
        _ => Attempt::Failed(SandboxError::Io {
            context: format!("resolve {what} {}", path.display()),
            source: e,
        }),
    })
}

fn try_pin(kernel: &Path, initrd: &Path) -> std::result::Result<BootImages, Attempt> {
    let resolved = [
        resolve("guest kernel", kernel)?,
        resolve("guest initramfs", initrd)?,
    ];
    let mut dirs: Vec<&Path> = resolved.iter().filter_map(|p| p.parent()).collect();
    dirs.dedup();
    let mut locks = Vec::new();
    for dir in dirs {
        let lock = dir.join(LOCK_FILE);
        let file = match File::open(&lock) {
            Ok(f) => f,
            // Not an installed directory, unless an install just removed the lock file: then
            // the configured paths resolve elsewhere now.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let again = [
                    resolve("guest kernel", kernel)?,
                    resolve("guest initramfs", initrd)?,
                ];
                if again != resolved {
                    return Err(Attempt::Retry);
                }
                continue;
            }
            Err(e) => {
                return Err(Attempt::Failed(SandboxError::Io {
                    context: format!("open {}", lock.display()),
                    source: e,
                }))
            }
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(l) => locks.push(l),
            // The installer holds it exclusively: it is removing this directory.
            Err((_, Errno::EWOULDBLOCK)) => return Err(Attempt::Retry),
            Err((_, errno)) => {
                return Err(Attempt::Failed(SandboxError::Io {
                    context: format!("lock {}", lock.display()),
                    source: errno.into(),
                }))
            }
        }
    }
    // Locked after an install removed the files (it had the lock first): resolve again.
    if !resolved.iter().all(|p| p.is_file()) {
        return Err(Attempt::Retry);
    }
    let [kernel, initrd] = resolved;
    Ok(BootImages {
        kernel,
        initrd,
        _locks: locks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// `<d>/boot/<key>/{vmlinux,initramfs.img,in-use.lock}` and `<d>/boot/current -> <key>`.
    fn installed(d: &Path, key: &str) -> PathBuf {
        let dir = d.join("boot").join(key);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vmlinux", "initramfs.img", LOCK_FILE] {
            std::fs::write(dir.join(f), key).unwrap();
        }
        let current = d.join("boot/current");
        let _ = std::fs::remove_file(&current);
        symlink(key, &current).unwrap();
        current
    }

    fn exclusive(dir: &Path) -> std::result::Result<Flock<File>, Errno> {
        let f = File::open(dir.join(LOCK_FILE)).unwrap();
        Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e)
    }

    #[tokio::test]
    async fn a_sandbox_holds_the_directory_it_resolved_to() {
        let d = tempfile::tempdir().unwrap();
        let current = installed(d.path(), "a");
        let images = pin(&current.join("vmlinux"), &current.join("initramfs.img"))
            .await
            .unwrap();
        let a = d.path().join("boot/a");
        assert_eq!(images.kernel, a.canonicalize().unwrap().join("vmlinux"));
        // An upgrade moves `current`; the installer cannot take the old directory.
        installed(d.path(), "b");
        assert_eq!(exclusive(&a).unwrap_err(), Errno::EWOULDBLOCK);
        assert_eq!(std::fs::read_to_string(&images.kernel).unwrap(), "a");
        drop(images);
        assert!(exclusive(&a).is_ok());
    }

    #[tokio::test]
    async fn a_directory_being_removed_is_not_booted_from() {
        let d = tempfile::tempdir().unwrap();
        let current = installed(d.path(), "a");
        let a = d.path().join("boot/a");
        // The installer holds the old directory's lock while the sandbox resolves to it; it
        // then removes the directory and `current` moves on.
        let held = exclusive(&a).unwrap();
        let remover = {
            let (a, root) = (a.clone(), d.path().to_path_buf());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                installed(&root, "b");
                std::fs::remove_dir_all(&a).unwrap();
                drop(held);
            })
        };
        let images = pin(&current.join("vmlinux"), &current.join("initramfs.img"))
            .await
            .unwrap();
        remover.await.unwrap();
        assert_eq!(std::fs::read_to_string(&images.kernel).unwrap(), "b");
    }

    #[tokio::test]
    async fn plain_files_are_resolved_without_a_lock_and_missing_ones_named() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("vmlinux");
        std::fs::write(&kernel, "k").unwrap();
        symlink(&kernel, d.path().join("link")).unwrap();
        let images = pin(&d.path().join("link"), &kernel).await.unwrap();
        assert_eq!(images.kernel, kernel.canonicalize().unwrap());
        let err = pin(&kernel, &d.path().join("missing.img"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("guest initramfs not found at"), "{err}");
    }
}
