//! The pod's cgroup on the host. The shim moves itself into the cgroup containerd named for
//! the pod (the VM owner's `cgroupsPath`) before it starts the VM, so the VMM and its device
//! daemons are born there: containerd and kubelet then read the pod's real host usage from
//! it (PodSandboxStats), and a limit on the pod's parent cgroup covers the whole VM.
//! cgroup v2, or the v1 controllers containerd reads stats from; cgroupfs-style paths only
//! (a systemd-style `slice:prefix:name` path is left alone).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// cgroup v2: controllers enabled on the way down, so the pod cgroup reports them.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];
/// cgroup v1: the hierarchies the pod cgroup is created in.
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "blkio"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One hierarchy: its mount point and the controller name it is known by in /proc/<pid>/cgroup
/// (`None` for the v2 unified hierarchy, the `0::` line).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    root: PathBuf,
    controller: Option<&'static str>,
}

fn hierarchies() -> Vec<Hierarchy> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![Hierarchy {
            root: root.to_path_buf(),
            controller: None,
        }];
    }
    V1_CONTROLLERS
        .iter()
        .map(|c| Hierarchy {
            root: root.join(c),
            controller: Some(*c),
        })
        .filter(|h| h.root.join("cgroup.procs").exists())
        .collect()
}

/// Whether `cgroups_path` is one this module manages (cgroupfs style, non-empty).
pub fn supported(cgroups_path: &str) -> bool {
    !cgroups_path.is_empty() && !cgroups_path.contains(':') && !hierarchies().is_empty()
}

/// Where process `pid` is in hierarchy `h`, from /proc/<pid>/cgroup.
fn current(h: &Hierarchy, pid: u32) -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
    let rel = text
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, rel) = (f.next()?, f.next()?, f.next()?);
            let matches = match h.controller {
                None => controllers.is_empty(),
                Some(c) => controllers.split(',').any(|x| x == c),
            };
            matches.then_some(rel)
        })
        .next()
        .unwrap_or("/");
    Ok(h.root.join(rel.trim_start_matches('/')))
}

/// A process (the shim) inside the pod cgroup; [`PodCgroup::leave`] moves it back out and
/// removes the cgroup.
#[derive(Debug)]
pub struct PodCgroup {
    pid: u32,
    /// (pod cgroup dir, the dir the process came from), per hierarchy.
    dirs: Vec<(PathBuf, PathBuf)>,
}

impl PodCgroup {
    /// Creates the cgroup `cgroups_path` (and its parents) in every hierarchy and moves process
    /// `pid` into it. On error the process is moved back and what was created is removed.
    pub async fn enter(cgroups_path: &str, pid: u32) -> Result<PodCgroup, CgroupError> {
        let rel = cgroups_path.trim_start_matches('/');
        let mut cg = PodCgroup {
            pid,
            dirs: Vec::new(),
        };
        for h in hierarchies() {
            let joined = async {
                let previous = current(&h, pid)?;
                let dir = h.root.join(rel);
                std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                if h.controller.is_none() {
                    enable_v2_controllers(&h.root, rel);
                }
                cg.dirs.push((dir.clone(), previous));
                let procs = dir.join("cgroup.procs");
                std::fs::write(&procs, pid.to_string()).map_err(io("join", &procs))
            }
            .await;
            if let Err(e) = joined {
                let _ = cg.leave().await;
                return Err(e);
            }
        }
        Ok(cg)
    }

    /// The pod cgroup's directories, one per hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(d, _)| d.as_path())
    }

    /// Moves the process back and removes the pod cgroup once the VM's processes are gone.
    /// Idempotent.
    pub async fn leave(&self) -> Result<(), CgroupError> {
        let mut result = Ok(());
        for (dir, previous) in &self.dirs {
            let _ = std::fs::write(previous.join("cgroup.procs"), self.pid.to_string());
            if let Err(e) = remove(dir).await {
                result = Err(e);
            }
        }
        result
    }
}

/// Enables the controllers in each ancestor's `cgroup.subtree_control`, from the root down;
/// one that is unavailable stays off.
fn enable_v2_controllers(root: &Path, rel: &str) {
    let mut parent = root.to_path_buf();
    for part in Path::new(rel).components() {
        for c in V2_CONTROLLERS {
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}"));
        }
        parent.push(part);
    }
}

/// Removes a cgroup directory, waiting briefly for its last processes to be reaped.
/// A cgroup that is already gone counts as removed.
pub async fn remove(dir: &Path) -> Result<(), CgroupError> {
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 50 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => {
                return Err(CgroupError::Io {
                    action: "remove",
                    path: dir.to_path_buf(),
                    source: e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_style_and_empty_paths_are_left_alone() {
        assert!(!supported("system.slice:cri-containerd:abc"));
        assert!(!supported(""));
        assert!(supported("/kubepods/pod1/abc"));
    }

    #[tokio::test]
    async fn a_process_enters_and_leaves_the_pod_cgroup() {
        let rel = format!("/shoji-unit-{}/pod", std::process::id());
        let mut sleeper = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let cg = PodCgroup::enter(&rel, sleeper.id()).await.unwrap();
        let dirs: Vec<PathBuf> = cg.dirs().map(Path::to_path_buf).collect();
        assert!(!dirs.is_empty());
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|p| p == sleeper.id().to_string()),
                "{} has {procs:?}",
                d.display()
            );
        }
        cg.leave().await.unwrap();
        for d in &dirs {
            assert!(!d.exists(), "{} left behind", d.display());
            remove(d.parent().unwrap()).await.unwrap();
        }
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        cg.leave().await.unwrap();
    }
}
