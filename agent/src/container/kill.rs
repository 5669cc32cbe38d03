//! `kill`: signals a container's init, or with `all` every process in its cgroup.
//!
//! The agent does this itself with kill(2), as runc does, rather than through a helper: a
//! helper's start alone costs ~100 ms under emulation, and every pod stop begins with a kill.
//! SIGKILL to all goes through `cgroup.kill` (atomic in the kernel); another signal to all
//! goes to each pid of the frozen cgroup, so that nothing forks past it.
use std::path::Path;

use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Spec};
use nix::{
    errno::Errno,
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::cgroup::{self, CgroupError};

#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("the process already exited")]
    Gone,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("kill({pid}, {signal}): {source}")]
    Signal {
        pid: i32,
        signal: Signal,
        source: Errno,
    },
}

/// Signals one process; ESRCH is [`KillError::Gone`].
pub fn one(pid: i32, signal: Signal) -> Result<(), KillError> {
    kill(Pid::from_raw(pid), signal).map_err(|source| match source {
        Errno::ESRCH => KillError::Gone,
        source => KillError::Signal {
            pid,
            signal,
            source,
        },
    })
}

/// Signals every process in `cgroup` and its descendants.
pub async fn all(cgroup: &Path, signal: Signal) -> Result<(), KillError> {
    if signal == Signal::SIGKILL {
        return Ok(cgroup::kill_all(cgroup)?);
    }
    // A paused container stays paused: the signals wait for its thaw.
    let was_frozen = cgroup::is_frozen(cgroup);
    if !was_frozen {
        cgroup::freeze(cgroup, true).await?;
    }
    let signalled = cgroup::pids(cgroup)
        .map_err(KillError::from)
        .and_then(|pids| {
            pids.into_iter()
                .try_for_each(|pid| match one(pid as i32, signal) {
                    Err(KillError::Gone) => Ok(()),
                    r => r,
                })
        });
    if !was_frozen {
        cgroup::freeze(cgroup, false).await?;
    }
    signalled
}

/// Whether the container's init is PID 1 of a PID namespace of its own, whose end is the end
/// of every process in it. In the pod's PID namespace (or the guest's) the init's children
/// outlive it, re-parented to that namespace's init and holding the container's output open:
/// they must be killed with it, as runc's shim does (its `ShouldKillAllOnExit`).
pub fn init_ends_all(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|namespaces| {
            namespaces.iter().any(|ns| {
                ns.typ() == LinuxNamespaceType::Pid
                    && ns.path().as_ref().is_none_or(|p| p.as_os_str().is_empty())
            })
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn one_signals_and_then_finds_the_process_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        one(pid, Signal::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(matches!(one(pid, Signal::SIGTERM), Err(KillError::Gone)));
    }

    fn spec_with_pid_namespace(path: Option<&str>) -> Spec {
        let mut ns = libcontainer::oci_spec::runtime::LinuxNamespace::default();
        ns.set_typ(LinuxNamespaceType::Pid)
            .set_path(path.map(Into::into));
        let mut spec = Spec::default();
        if let Some(linux) = spec.linux_mut() {
            linux.set_namespaces(Some(vec![ns]));
        }
        spec
    }

    #[test]
    fn only_an_init_of_its_own_pid_namespace_ends_all() {
        assert!(init_ends_all(&spec_with_pid_namespace(None)));
        assert!(init_ends_all(&spec_with_pid_namespace(Some(""))));
        // The pod's namespace (the pause process's).
        assert!(!init_ends_all(&spec_with_pid_namespace(Some(
            "/proc/7/ns/pid"
        ))));
        // No PID namespace: the guest's.
        let mut spec = spec_with_pid_namespace(None);
        if let Some(linux) = spec.linux_mut() {
            linux.set_namespaces(Some(Vec::new()));
        }
        assert!(!init_ends_all(&spec));
    }
}
