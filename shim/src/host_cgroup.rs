//! The pod's cgroup on the host. The shim moves itself into the cgroup containerd named for
//! the pod (the VM owner's `cgroupsPath`) before it starts the VM, so the VMM and its device
//! daemons are born there: containerd and kubelet then read the pod's real host usage from
//! it (PodSandboxStats), and a limit on the pod's parent cgroup covers the whole VM.
//! cgroup v2, or the v1 controllers containerd reads stats from.
//!
//! Both cgroup drivers' paths are understood. A cgroupfs path is a directory below the root.
//! A systemd one, `slice:prefix:name` (containerd writes it when the pod's parent is a
//! `.slice`, kubeadm's default), is where runc's systemd driver puts the pod: the scope
//! `<prefix>-<name>.scope` in the slice's directory, each dash of the slice name a level
//! (`kubepods-burstable-pod1.slice` is `kubepods.slice/kubepods-burstable.slice/...`). The
//! directories are made directly in the cgroup filesystem, not through systemd's D-Bus
//! API: systemd leaves unknown sub-cgroups of its slices alone.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// cgroup v2: controllers enabled on the way down, so the pod cgroup reports them.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];
/// cgroup v1: the hierarchies the pod cgroup is created in.
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "blkio"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroupsPath {0:?} is not a plain path below the cgroup root")]
    Invalid(String),
    #[error("systemd cgroupsPath {path:?}: {why}")]
    InvalidSystemd { path: String, why: &'static str },
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

/// The host's cgroups in words: `v2` or `v1 (cpu, memory, ...)`; None without any.
pub fn layout() -> Option<String> {
    let h = hierarchies();
    match h.first()?.controller {
        None => Some("v2".into()),
        Some(_) => Some(format!(
            "v1 ({})",
            h.iter()
                .filter_map(|h| h.controller)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Whether there is a pod cgroup to manage: a path was given and the host has cgroups.
pub fn supported(cgroups_path: &str) -> bool {
    !cgroups_path.is_empty() && !hierarchies().is_empty()
}

/// The cgroupfs path (relative to a hierarchy's root) of a cgroupsPath of either driver.
fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let rel = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [plain] => plain.trim_start_matches('/').to_string(),
        [slice, prefix, name] => {
            systemd_path(slice, prefix, name).map_err(|why| CgroupError::InvalidSystemd {
                path: cgroups_path.into(),
                why,
            })?
        }
        _ => {
            return Err(CgroupError::InvalidSystemd {
                path: cgroups_path.into(),
                why: "want slice:prefix:name",
            })
        }
    };
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(CgroupError::Invalid(cgroups_path.to_string()));
    }
    Ok(PathBuf::from(rel))
}

/// runc's systemd mapping: the slice expanded into its levels, then the unit (`name` itself
/// when it is a slice, else the scope `<prefix>-<name>.scope`).
fn systemd_path(slice: &str, prefix: &str, name: &str) -> Result<String, &'static str> {
    let plain = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let stem = slice
        .strip_suffix(".slice")
        .ok_or("the slice must end in .slice")?;
    let mut path = String::new();
    if stem != "-" {
        if stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") || !plain(stem) {
            return Err("not a slice name");
        }
        let mut level = String::new();
        for part in stem.split('-') {
            if !level.is_empty() {
                level.push('-');
            }
            level.push_str(part);
            path.push_str(&format!("{level}.slice/"));
        }
    }
    if !plain(name) || (!prefix.is_empty() && !plain(prefix)) {
        return Err("prefix and name must be plain names");
    }
    let unit = match (name.ends_with(".slice"), prefix.is_empty()) {
        (true, _) => name.to_string(),
        (false, true) => format!("{name}.scope"),
        (false, false) => format!("{prefix}-{name}.scope"),
    };
    Ok(path + &unit)
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

/// The pod cgroup in every hierarchy. Serializable: the sandbox records it before
/// [`PodCgroup::enter`] creates anything, so a crash at any point can be undone with
/// [`PodCgroup::remove`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCgroup {
    /// The pod cgroup's directory in each hierarchy.
    pub dirs: Vec<PathBuf>,
    /// The directories that did not exist yet, parents first: these are ours to remove.
    pub created: Vec<PathBuf>,
}

/// Where a process was before it entered the pod cgroup, to go back before the removal.
#[derive(Debug, Default)]
pub struct Previous(Vec<PathBuf>);

impl PodCgroup {
    /// Works out the directories of `cgroups_path` (either driver's) in every hierarchy,
    /// and which of them would be created. Creates nothing.
    pub fn plan(cgroups_path: &str) -> Result<PodCgroup, CgroupError> {
        let rel = relative_path(cgroups_path)?;
        let rel = rel.as_path();
        let mut cg = PodCgroup {
            dirs: Vec::new(),
            created: Vec::new(),
        };
        for h in hierarchies() {
            let dir = h.root.join(rel);
            let mut missing: Vec<PathBuf> = dir
                .ancestors()
                .take_while(|d| *d != h.root && !d.exists())
                .map(Path::to_path_buf)
                .collect();
            missing.reverse();
            cg.created.extend(missing);
            cg.dirs.push(dir);
        }
        Ok(cg)
    }

    /// Creates the pod cgroup and moves process `pid` into it. On error the process is
    /// moved back and what was created is removed.
    pub async fn enter(&self, pid: u32) -> Result<Previous, CgroupError> {
        let mut previous = Previous::default();
        for (h, dir) in hierarchies().iter().zip(&self.dirs) {
            let joined = (|| {
                let before = current(h, pid)?;
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
                if h.controller.is_none() {
                    enable_v2_controllers(&h.root, dir);
                }
                previous.0.push(before);
                let procs = dir.join("cgroup.procs");
                std::fs::write(&procs, pid.to_string()).map_err(io("join", &procs))
            })();
            if let Err(e) = joined {
                self.leave(pid, &previous);
                let _ = self.remove().await;
                return Err(e);
            }
        }
        Ok(previous)
    }

    /// Moves process `pid` back to where it came from.
    pub fn leave(&self, pid: u32, previous: &Previous) {
        for before in &previous.0 {
            let _ = std::fs::write(before.join("cgroup.procs"), pid.to_string());
        }
    }

    /// Removes the directories [`PodCgroup::plan`] found missing, deepest first: the pod
    /// cgroup after its last processes are reaped (a brief wait), each parent only if no
    /// other pod's cgroup is still in it. Idempotent.
    pub async fn remove(&self) -> Result<(), CgroupError> {
        let mut result = Ok(());
        for dir in self.created.iter().rev() {
            let removed = if self.dirs.contains(dir) {
                remove(dir).await
            } else {
                match std::fs::remove_dir(dir) {
                    Err(e)
                        if !matches!(
                            e.raw_os_error(),
                            Some(libc::EBUSY | libc::ENOTEMPTY | libc::ENOENT)
                        ) =>
                    {
                        Err(CgroupError::Io {
                            action: "remove",
                            path: dir.clone(),
                            source: e,
                        })
                    }
                    _ => Ok(()),
                }
            };
            if let Err(e) = removed {
                result = Err(e);
            }
        }
        result
    }
}

/// Enables the controllers in each ancestor's `cgroup.subtree_control`, from the root down;
/// one that is unavailable stays off.
fn enable_v2_controllers(root: &Path, dir: &Path) {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let mut parent = root.to_path_buf();
    for part in rel.components() {
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
    fn empty_and_escaping_paths_are_refused() {
        assert!(!supported(""));
        assert!(supported("/kubepods/pod1/abc"));
        for bad in ["/a/../../etc", "/a/./b", "..", "/", "/a//b"] {
            assert!(
                matches!(PodCgroup::plan(bad), Err(CgroupError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn systemd_paths_map_as_runc_maps_them() {
        for (path, want) in [
            (
                "kubepods-burstable-pod12.slice:cri-containerd:abc",
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope",
            ),
            ("system.slice:docker:x", "system.slice/docker-x.scope"),
            (":cri-containerd:x", "system.slice/cri-containerd-x.scope"),
            ("-.slice::x", "x.scope"),
            ("kubepods.slice:p:machine-x.slice", "kubepods.slice/machine-x.slice"),
        ] {
            assert_eq!(relative_path(path).unwrap(), Path::new(want), "{path}");
        }
        for bad in [
            "kubepods:p:x",
            "a--b.slice:p:x",
            "-a.slice:p:x",
            "a.slice:p:..",
            "a.slice:p/q:x",
            "a.slice:p",
            "a.slice:p:x:y",
            "../a.slice:p:x",
        ] {
            assert!(
                matches!(relative_path(bad), Err(CgroupError::InvalidSystemd { .. })),
                "{bad}: {:?}",
                relative_path(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_process_enters_and_leaves_the_pod_cgroup() {
        let top = format!("shoji-unit-{}", std::process::id());
        let mut sleeper = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let cg = PodCgroup::plan(&format!("/{top}/pod")).unwrap();
        assert!(!cg.dirs.is_empty());
        // Both levels are new, parents first.
        assert!(cg.created.iter().any(|d| d.ends_with(&top)));
        assert!(cg.created.last().unwrap().ends_with("pod"));
        let previous = cg.enter(sleeper.id()).await.unwrap();
        for d in &cg.dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|p| p == sleeper.id().to_string()),
                "{} has {procs:?}",
                d.display()
            );
        }
        cg.leave(sleeper.id(), &previous);
        cg.remove().await.unwrap();
        for d in &cg.created {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        cg.remove().await.unwrap();
    }
}
