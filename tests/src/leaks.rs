//! Host state snapshots for leak checks: runtime processes, mounts under given dirs, tap/veth devices,
//! `/run/netns` entries, entries of a run dir. Take one before a test and compare after it.
//!
//! Other tests may run VMs at the same time: restrict process matching with `Scope::cmdline_markers`
//! (e.g. the containerd socket or a per-test run dir, which appear on the command lines of what the test started).

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Process names (argv[0] basename prefixes) a runtime may leave behind.
pub const RUNTIME_PROCESSES: &[&str] = &[
    "containerd-shim",
    "qemu-system",
    "virtiofsd",
    "vhost-device-vsock",
    "cloud-hypervisor",
];

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// A process counts only if its command line contains one of these (empty: every runtime process counts).
    pub cmdline_markers: Vec<String>,
    /// Mount points at or below these dirs are recorded.
    pub mount_dirs: Vec<PathBuf>,
    /// Entries directly under these dirs are recorded (e.g. `/run/shoji`).
    pub run_dirs: Vec<PathBuf>,
    /// tap/veth devices and /run/netns entries count only with one of these name prefixes
    /// (empty: none count). Host-wide lists: other tests running at the same time make
    /// their own, so a scope names only what its own runtime creates (CNI: `veth`, `cni-`).
    pub link_prefixes: Vec<String>,
    pub netns_prefixes: Vec<String>,
}

impl Scope {
    /// The (link, netns) name prefixes of what CNI's bridge plugin and containerd create.
    pub fn cni_prefixes() -> (Vec<String>, Vec<String>) {
        (vec!["veth".into()], vec!["cni-".into()])
    }
}

/// One observation of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    processes: BTreeSet<String>,
    mounts: BTreeSet<String>,
    links: BTreeSet<String>,
    netns: BTreeSet<String>,
    run_entries: BTreeSet<String>,
}

/// What appeared between two snapshots. `Display` lists it readably.
#[derive(Debug, Default)]
pub struct Leaks {
    pub processes: Vec<String>,
    pub mounts: Vec<String>,
    pub links: Vec<String>,
    pub netns: Vec<String>,
    pub run_entries: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("leaked after {waited:?}:\n{leaks}")]
pub struct LeakError {
    pub waited: Duration,
    pub leaks: Leaks,
}

impl Leaks {
    /// How many objects leaked.
    pub fn count(&self) -> usize {
        self.processes.len()
            + self.mounts.len()
            + self.links.len()
            + self.netns.len()
            + self.run_entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.mounts.is_empty()
            && self.links.is_empty()
            && self.netns.is_empty()
            && self.run_entries.is_empty()
    }
}

impl fmt::Display for Leaks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (what, items) in [
            ("processes", &self.processes),
            ("mounts", &self.mounts),
            ("tap/veth devices", &self.links),
            ("/run/netns entries", &self.netns),
            ("run dir entries", &self.run_entries),
        ] {
            if !items.is_empty() {
                writeln!(f, "  {what}:")?;
                for i in items {
                    writeln!(f, "    {i}")?;
                }
            }
        }
        Ok(())
    }
}

fn read_dir_names(dir: &Path) -> impl Iterator<Item = String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn processes(scope: &Scope) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for pid in read_dir_names(Path::new("/proc")).filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
    {
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(argv0) = args.first() else { continue };
        let name = argv0.rsplit('/').next().unwrap_or(argv0);
        if !RUNTIME_PROCESSES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let cmdline = args.join(" ");
        if scope.cmdline_markers.is_empty()
            || scope
                .cmdline_markers
                .iter()
                .any(|m| cmdline.contains(m.as_str()))
        {
            out.insert(format!("pid {pid}: {cmdline}"));
        }
    }
    out
}

/// tap (tun driver) and veth devices, from `ip -d -j link`. Panics when `ip` fails.
fn links() -> BTreeSet<String> {
    // A leak check that silently sees nothing would pass vacuously: fail loudly instead.
    let out = std::process::Command::new("ip")
        .args(["-d", "-j", "link", "show"])
        .output()
        .expect("leak snapshot: cannot run `ip -d -j link show`");
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("leak snapshot: `ip -d -j link show` printed no JSON list: {e}")
    });
    list.iter()
        .filter_map(|l| {
            let kind = l.pointer("/linkinfo/info_kind").and_then(|k| k.as_str())?;
            let name = l.get("ifname").and_then(|n| n.as_str())?;
            matches!(kind, "tun" | "veth").then(|| format!("{name} ({kind})"))
        })
        .collect()
}

fn has_prefix(name: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| name.starts_with(p.as_str()))
}

impl Snapshot {
    pub fn take(scope: &Scope) -> Snapshot {
        Snapshot {
            processes: processes(scope),
            mounts: scope
                .mount_dirs
                .iter()
                .flat_map(|d| crate::containerd::mounts_under(d))
                .map(|m| m.display().to_string())
                .collect(),
            links: links()
                .into_iter()
                .filter(|l| has_prefix(l, &scope.link_prefixes))
                .collect(),
            netns: read_dir_names(Path::new("/run/netns"))
                .filter(|n| has_prefix(n, &scope.netns_prefixes))
                .collect(),
            run_entries: scope
                .run_dirs
                .iter()
                .flat_map(|d| read_dir_names(d).map(move |n| d.join(n).display().to_string()))
                .collect(),
        }
    }

    /// The runtime processes seen, as `pid <pid>: <command line>`.
    pub fn processes(&self) -> impl Iterator<Item = &str> {
        self.processes.iter().map(String::as_str)
    }

    /// What `after` has that `self` had not.
    pub fn leaks_in(&self, after: &Snapshot) -> Leaks {
        let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| {
            b.difference(a).cloned().collect::<Vec<_>>()
        };
        Leaks {
            processes: new(&self.processes, &after.processes),
            mounts: new(&self.mounts, &after.mounts),
            links: new(&self.links, &after.links),
            netns: new(&self.netns, &after.netns),
            run_entries: new(&self.run_entries, &after.run_entries),
        }
    }

    /// Waits up to `limit` for the host to return to this snapshot (shims and VMMs exit asynchronously after
    /// their last delete); errors with everything still new.
    pub async fn assert_clean(&self, scope: &Scope, limit: Duration) -> Result<(), LeakError> {
        let start = tokio::time::Instant::now();
        loop {
            let leaks = self.leaks_in(&Snapshot::take(scope));
            if leaks.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= limit {
                return Err(LeakError {
                    waited: limit,
                    leaks,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_lists_only_new_items_readably() {
        let before = Snapshot {
            processes: ["pid 1: a".to_string()].into(),
            mounts: BTreeSet::new(),
            links: ["tap0 (tun)".to_string()].into(),
            netns: BTreeSet::new(),
            run_entries: BTreeSet::new(),
        };
        let mut after = before.clone();
        assert!(before.leaks_in(&after).is_empty());
        after.links.insert("veth1 (veth)".into());
        after.netns.insert("cni-1".into());
        after.processes.remove("pid 1: a");
        let leaks = before.leaks_in(&after);
        assert_eq!(leaks.links, vec!["veth1 (veth)".to_string()]);
        assert!(
            leaks.processes.is_empty(),
            "a process that went away is not a leak"
        );
        let text = leaks.to_string();
        assert!(
            text.contains("tap/veth devices:\n    veth1 (veth)") && text.contains("cni-1"),
            "{text}"
        );
    }
}
