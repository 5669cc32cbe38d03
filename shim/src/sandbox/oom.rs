//! The host OOM killer's view of a pod's VM. Under runc a container's processes carry the
//! `oom_score_adj` kubelet gave the container for its QoS class (1000 BestEffort, -997
//! Guaranteed, in between for Burstable). A VM's host processes would otherwise inherit the
//! shim's (containerd's, -998 or -999 on a kubeadm node): the last thing the host kills.
//! So the VMM and its daemons take the pod's value: the lowest among the pod's containers
//! (the pause container's -998 is not one of them), set at each create and removal. The
//! shim keeps its own, as runc's shim does.
use std::{collections::HashMap, sync::Mutex};

use super::state::RecordedPid;

/// The range of `/proc/<pid>/oom_score_adj`.
const RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

/// Each container's `oom_score_adj`, as its spec asks.
#[derive(Debug, Default)]
pub struct OomPriority {
    by_container: Mutex<HashMap<String, i32>>,
}

impl OomPriority {
    /// Records container `id`'s value (None, or out of range: it asks for nothing); returns
    /// the pod's value if there is one.
    pub fn track(&self, id: &str, adj: Option<i32>) -> Option<i32> {
        let mut all = self.by_container.lock().unwrap();
        match adj.filter(|a| RANGE.contains(a)) {
            Some(a) => all.insert(id.to_string(), a),
            None => all.remove(id),
        };
        all.values().min().copied()
    }

    /// Forgets container `id`; returns the pod's value without it, if any container is left
    /// that asks for one.
    pub fn forget(&self, id: &str) -> Option<i32> {
        let mut all = self.by_container.lock().unwrap();
        all.remove(id)?;
        all.values().min().copied()
    }
}

/// Sets `adj` on each process of `pids` that still runs (start time checked), except this
/// one (the shim). Returns the failures, by pid.
pub fn apply(pids: &[RecordedPid], adj: i32) -> Vec<(u32, std::io::Error)> {
    let me = std::process::id();
    pids.iter()
        .filter(|p| p.pid != me && p.is_alive())
        .filter_map(|p| {
            std::fs::write(format!("/proc/{}/oom_score_adj", p.pid), adj.to_string())
                .err()
                .map(|e| (p.pid, e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_takes_its_lowest_containers_value() {
        let p = OomPriority::default();
        assert_eq!(p.track("a", None), None);
        assert_eq!(p.track("a", Some(1000)), Some(1000));
        assert_eq!(p.track("b", Some(-997)), Some(-997));
        assert_eq!(
            p.track("c", Some(5000)),
            Some(-997),
            "out of range asks nothing"
        );
        assert_eq!(p.forget("b"), Some(1000));
        assert_eq!(p.forget("nobody"), None);
        assert_eq!(p.forget("a"), None);
    }

    #[test]
    fn a_child_process_gets_the_value() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id();
        let recorded = RecordedPid {
            name: "sleep".into(),
            pid,
            start_time: crate::procfs::start_time(pid).unwrap(),
        };
        let mine = || std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
        let before = mine();
        let failed = apply(&[recorded, RecordedPid::me()], 1000);
        let got = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(got.trim(), "1000");
        assert_eq!(mine(), before, "the shim keeps its own");
    }
}
