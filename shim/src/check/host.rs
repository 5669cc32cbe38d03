//! Host lines of `shoji check`: the tools the shim runs (`ip`, `tc`, `nsenter`, `iptables`), the tap
//! device node, the cgroup layout, and the CNI plugins CRI pods need.
use std::path::{Path, PathBuf};

use super::{Check, Verdict};

/// Where containerd's own PATH usually finds the tools, besides `$PATH`.
const SYSTEM_BIN: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// CNI plugin directories when containerd's configuration names none.
pub const DEFAULT_CNI_DIRS: &[&str] = &["/opt/cni/bin", "/usr/lib/cni"];
/// The CNI plugins a basic pod network uses (and the repository's tests).
const CNI_PLUGINS: &[&str] = &["bridge", "loopback"];

/// `ip`, `tc` (iproute2) and `nsenter` (util-linux): the shim runs them to make taps and tc
/// redirects in the pod's network namespace. `iptables` only for `kubectl port-forward` (its
/// redirect in the pod's namespace): pods run without it, so it is optional.
pub fn tools() -> Vec<Check> {
    [
        ("ip", "apt-get install iproute2", true),
        ("tc", "apt-get install iproute2", true),
        ("nsenter", "apt-get install util-linux", true),
        ("iptables", "apt-get install iptables", false),
    ]
    .into_iter()
    .map(|(name, fix, needed)| match on_path(name) {
        Some(p) => Check {
            name,
            verdict: Verdict::Ok,
            detail: p.display().to_string(),
            fix: None,
        },
        None => Check {
            name,
            verdict: if needed {
                Verdict::Missing
            } else {
                Verdict::Optional
            },
            detail: if needed {
                format!("{name} is not on PATH (pods with a network need it)")
            } else {
                format!("{name} is not on PATH (kubectl port-forward needs it; pods run without)")
            },
            fix: Some(fix.into()),
        },
    })
    .collect()
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_BIN.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `/dev/net/tun`: every pod NIC is a tap.
pub fn tun() -> Check {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new("/dev/net/tun");
    match path.metadata() {
        Ok(m) if m.file_type().is_char_device() => Check {
            name: "/dev/net/tun",
            verdict: Verdict::Ok,
            detail: "present".into(),
            fix: None,
        },
        _ => Check {
            name: "/dev/net/tun",
            verdict: Verdict::Missing,
            detail: "no tap device node (pods with a network need it)".into(),
            fix: Some("modprobe tun (and mknod /dev/net/tun c 10 200 in a container)".into()),
        },
    }
}

/// cgroup v2 or v1: both work (cgroupfs paths).
pub fn cgroups() -> Check {
    match crate::host_cgroup::layout() {
        Some(layout) => Check {
            name: "cgroups",
            verdict: Verdict::Ok,
            detail: layout,
            fix: None,
        },
        None => Check {
            name: "cgroups",
            verdict: Verdict::Warn,
            detail:
                "no cgroup hierarchy under /sys/fs/cgroup: VMs are not put in their pod's cgroup"
                    .into(),
            fix: Some("mount cgroup2 on /sys/fs/cgroup".into()),
        },
    }
}

/// The CNI plugins in `dirs` (containerd's `bin_dir(s)`, else the usual places).
pub fn cni(dirs: &[PathBuf]) -> Check {
    let found: Vec<PathBuf> = CNI_PLUGINS
        .iter()
        .filter_map(|p| dirs.iter().map(|d| d.join(p)).find(|p| p.is_file()))
        .collect();
    let shown = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if found.len() == CNI_PLUGINS.len() {
        Check {
            name: "CNI plugins",
            verdict: Verdict::Ok,
            detail: format!(
                "{} in {}",
                CNI_PLUGINS.join(", "),
                found[0]
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            fix: None,
        }
    } else {
        Check {
            name: "CNI plugins",
            verdict: Verdict::Warn,
            detail: format!("{} not all in {shown}", CNI_PLUGINS.join(", ")),
            fix: Some(
                "apt-get install containernetworking-plugins (or your network add-on's); needed for CRI pods"
                    .into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_plugins_are_looked_for_in_every_dir() {
        let base = std::env::temp_dir().join(format!("shoji-check-cni-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("bridge"), "").unwrap();
        let c = cni(&[a.clone(), b.clone()]);
        assert_eq!(c.verdict, Verdict::Warn, "{c}");
        assert!(c
            .fix
            .as_deref()
            .unwrap()
            .contains("containernetworking-plugins"));
        std::fs::write(b.join("loopback"), "").unwrap();
        assert_eq!(cni(&[a, b]).verdict, Verdict::Ok);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn tools_are_found_on_the_system_path() {
        // The test host has iproute2 (the VM tests use it).
        let checks = tools();
        assert_eq!(checks.len(), 4);
        assert!(checks.iter().all(|c| !c.detail.is_empty()));
        assert_eq!(checks[0].name, "ip");
    }
}
