//! One uid (and gid of the same number) per sandbox, from a range no account uses, so that
//! the processes of two VMs cannot signal, trace or open each other's files.
//!
//! A uid is taken by creating `<run_dir>/.uids/<uid>` with O_EXCL (atomic across shims);
//! the file names the sandbox directory that holds it. The sandbox records the uid in its state
//! before claiming and releases it in cleanup; a claim whose sandbox directory is gone
//! (a crash before the record) is reclaimed by the next allocation that meets it.
use std::{
    fs,
    io::{self, Write},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Who a jailed process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The group owning /dev/kvm, when the VM uses KVM.
    #[serde(default)]
    pub kvm_gid: Option<u32>,
}

/// The node's range of sandbox uids.
#[derive(Debug, Clone)]
pub struct UidPool {
    pub first: u32,
    pub count: u32,
}

/// Where the claims of the sandboxes under one run directory are.
fn claims(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.parent().unwrap_or(Path::new("/")).join(".uids")
}

#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("no free sandbox uid in {first}..{end} ({claims})", end = u64::from(*first) + u64::from(*count), claims = claims.display())]
    Exhausted {
        first: u32,
        count: u32,
        claims: PathBuf,
    },
    #[error("claiming a sandbox uid in {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl UidPool {
    /// A uid for the sandbox at `dir`, starting the search at a place derived from `id` so
    /// that concurrent shims rarely meet.
    pub fn claim(&self, id: &str, dir: &Path) -> Result<u32, UidError> {
        let claims = claims(dir);
        let io_err = |source| UidError::Io {
            path: claims.clone(),
            source,
        };
        fs::create_dir_all(&claims).map_err(io_err)?;
        let start = id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        for i in 0..self.count {
            let uid = self.first + (start.wrapping_add(i) % self.count);
            let path = claims.join(uid.to_string());
            if take(&path, dir).map_err(io_err)? {
                return Ok(uid);
            }
            // A stale claim is removed and taken (whoever removes it first may lose the
            // re-creation to another claimer; that one then holds it, as it should).
            if stale(&path) {
                let _ = fs::remove_file(&path);
                if take(&path, dir).map_err(io_err)? {
                    return Ok(uid);
                }
            }
        }
        Err(UidError::Exhausted {
            first: self.first,
            count: self.count,
            claims,
        })
    }
}

/// Gives `uid` back if the sandbox at `dir` holds it ("already gone" is success).
pub fn release(uid: u32, dir: &Path) -> io::Result<()> {
    let claims = claims(dir);
    let path = claims.join(uid.to_string());
    match fs::read(&path) {
        Ok(owner) if owner == dir.as_os_str().as_encoded_bytes() => match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // The last one out removes the directory, so a run directory is left as it was found;
    // a claimer that meets it gone makes it again (see `take`).
    let _ = fs::remove_dir(&claims);
    Ok(())
}

/// A claim whose sandbox directory no longer exists (and that is not being written:
/// an empty claim younger than a minute may be a claimer between create and write).
fn stale(claim: &Path) -> bool {
    let Ok(owner) = fs::read(claim) else {
        return false;
    };
    if owner.is_empty() {
        // (A claim stamped in the future counts as young.)
        let young = fs::metadata(claim)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().map_or(true, |age| age.as_secs() < 60));
        return !young;
    }
    !Path::new(std::ffi::OsStr::from_bytes(&owner)).exists()
}

/// Creates the claim at `path` for `dir`; false if someone holds it.
fn take(path: &Path, dir: &Path) -> io::Result<bool> {
    let create = || fs::File::options().write(true).create_new(true).open(path);
    let created = match create() {
        // The claims directory was removed by the last release since this claimer made it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))?;
            create()
        }
        r => r,
    };
    match created {
        Ok(mut f) => {
            f.write_all(dir.as_os_str().as_encoded_bytes())?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(count: u32) -> UidPool {
        UidPool { first: 5000, count }
    }

    #[test]
    fn each_sandbox_gets_its_own_uid_until_the_range_is_used_up() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(2);
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let ua = pool.claim("a", &a).unwrap();
        let ub = pool.claim("a", &b).unwrap();
        assert_ne!(ua, ub);
        assert!((5000..5002).contains(&ua) && (5000..5002).contains(&ub));
        let err = pool.claim("c", &a).unwrap_err().to_string();
        assert!(err.contains("no free sandbox uid in 5000..5002"), "{err}");
        // Released, it is free again; releasing twice, or another's, changes nothing.
        release(ua, &a).unwrap();
        release(ua, &a).unwrap();
        release(ub, &a).unwrap();
        assert_eq!(pool.claim("c", &a).unwrap(), ua);
        assert!(claims(&a).starts_with(tmp.path()));
        // The last release leaves no claims directory behind.
        release(ua, &a).unwrap();
        release(ub, &b).unwrap();
        assert!(!claims(&a).exists());
    }

    #[test]
    fn a_claim_whose_sandbox_is_gone_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(1);
        let gone = tmp.path().join("gone");
        fs::create_dir_all(&gone).unwrap();
        let uid = pool.claim("x", &gone).unwrap();
        fs::remove_dir(&gone).unwrap();
        let live = tmp.path().join("live");
        fs::create_dir_all(&live).unwrap();
        assert_eq!(pool.claim("y", &live).unwrap(), uid);
        assert_eq!(
            fs::read(claims(&live).join(uid.to_string())).unwrap(),
            live.as_os_str().as_encoded_bytes()
        );
    }
}
