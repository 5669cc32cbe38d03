//! What the agent changes in, and checks about, the OCI documents the host sends.
//!
//! The container spec keeps user, capabilities, read-only root, no_new_privs, rlimits,
//! env, cwd, mounts, resources, seccomp and non-network sysctls. It loses hooks (they would
//! run in the guest, not where the host meant), the network namespace (every container
//! shares the guest's network, which is the pod's) and host LSM labels. Namespace paths
//! name host processes: a PID, IPC or UTS namespace with a path is the pod's, and becomes
//! the guest pause process's; any other path is dropped (a new namespace). Network sysctls
//! are taken out for the agent to set (libcontainer refuses them without a network
//! namespace of the container's own). A cgroup namespace is added (the guest is cgroup v2).
//! Its root becomes the assembled rootfs and its cgroupsPath `/shoji/<id>`.
use std::{
    ffi::OsString,
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
};

use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Process, Root, Spec};

use crate::cgroup;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The kernel's limit on one argv/env string (MAX_ARG_STRLEN).
const MAX_ARG_LEN: usize = 32 * 4096;
/// What we allow for argv + env together: below the kernel's default ARG_MAX (2 MiB with an 8 MiB stack).
const MAX_ARGS_TOTAL: usize = 1536 * 1024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("invalid {kind} id {id:?}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}")]
    BadId { kind: &'static str, id: String },
    #[error("invalid OCI {what} JSON: {reason}")]
    BadJson { what: &'static str, reason: String },
    #[error("the spec has no {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("process args are empty")]
    NoArgs,
    #[error("{0}")]
    TooLarge(String),
    #[error("sysctl {name:?}: {reason}")]
    BadSysctl { name: String, reason: String },
    #[error("exec: {name:?}: {reason}")]
    NotExecutable { name: String, reason: String },
}

/// Container and exec ids name directories and cgroups: keep them to a safe alphabet.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), SpecError> {
    let ok = id.len() <= 128
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadId {
            kind,
            id: id.chars().take(140).collect(),
        })
    }
}

/// The namespace kinds a pod shares through its pause process.
const POD_NAMESPACES: [(LinuxNamespaceType, &str); 3] = [
    (LinuxNamespaceType::Pid, "pid"),
    (LinuxNamespaceType::Ipc, "ipc"),
    (LinuxNamespaceType::Uts, "uts"),
];

/// A container's spec as it runs in the guest.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Spec,
    /// The pod namespaces it shares (CRI gave their path): see [`GuestSpec::join_pod`].
    pub pod_namespaces: Vec<LinuxNamespaceType>,
    /// The network sysctls the agent sets in the guest's network namespace.
    pub net_sysctls: Vec<(String, String)>,
}

impl GuestSpec {
    /// Points the pod namespaces it shares at those of the pod's pause process.
    pub fn join_pod(&mut self, pause: i32) {
        let Some(linux) = self.spec.linux_mut() else {
            return;
        };
        for ns in linux.namespaces_mut().iter_mut().flatten() {
            if let Some((_, name)) = POD_NAMESPACES
                .iter()
                .find(|(k, _)| *k == ns.typ() && self.pod_namespaces.contains(k))
            {
                ns.set_path(Some(PathBuf::from(format!("/proc/{pause}/ns/{name}"))));
            }
        }
    }
}

/// Parses and rewrites a container's config.json for running it in the guest. The pod
/// namespaces it shares are left unset until [`GuestSpec::join_pod`].
pub fn container_spec(
    spec_json: &[u8],
    id: &str,
    rootfs: &Path,
    terminal: bool,
) -> Result<GuestSpec, SpecError> {
    let mut spec: Spec = serde_json::from_slice(spec_json).map_err(|e| SpecError::BadJson {
        what: "runtime spec",
        reason: e.to_string(),
    })?;
    let mut process = spec
        .process()
        .clone()
        .ok_or(SpecError::Missing("process"))?;
    process.set_terminal(Some(terminal));
    check_args(&process)?;
    drop_host_labels(&mut process);
    spec.set_process(Some(process));
    let readonly = spec.root().as_ref().and_then(|r| r.readonly());
    let mut root = Root::default();
    root.set_path(rootfs.to_path_buf()).set_readonly(readonly);
    spec.set_root(Some(root));
    spec.set_hooks(None);
    let mut linux = spec
        .linux()
        .clone()
        .ok_or(SpecError::Missing("linux section"))?;
    let mut pod_namespaces = Vec::new();
    if let Some(namespaces) = linux.namespaces() {
        let kept = namespaces
            .iter()
            .filter(|ns| ns.typ() != LinuxNamespaceType::Network)
            .map(|ns| {
                let mut ns = ns.clone();
                let pod_kind = POD_NAMESPACES.iter().any(|(k, _)| *k == ns.typ());
                let shared = ns
                    .path()
                    .as_ref()
                    .is_some_and(|p| !p.as_os_str().is_empty());
                if pod_kind && shared {
                    pod_namespaces.push(ns.typ());
                }
                // A host path means nothing in the guest.
                ns.set_path(None);
                ns
            })
            .collect();
        linux.set_namespaces(Some(kept));
    }
    // The guest is cgroup v2 only: as containerd does on a v2 node, the container gets a
    // cgroup namespace, so /sys/fs/cgroup shows its own limits (what JVMs and Go runtimes
    // size themselves by), even when the host (v1) spec had none.
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    if !namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Cgroup)
    {
        let mut cgroup_ns = libcontainer::oci_spec::runtime::LinuxNamespace::default();
        cgroup_ns.set_typ(LinuxNamespaceType::Cgroup);
        namespaces.push(cgroup_ns);
        linux.set_namespaces(Some(namespaces));
    }
    let has_uts = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|ns| ns.typ() == LinuxNamespaceType::Uts);
    if spec.hostname().as_ref().is_some_and(|h| !h.is_empty()) && !has_uts {
        return Err(SpecError::Conflict(
            "the spec sets a hostname but has no uts namespace".into(),
        ));
    }
    let net_sysctls = take_net_sysctls(&mut linux)?;
    plain_rootfs_propagation(&mut linux);
    linux.set_mount_label(None);
    linux.set_cgroups_path(Some(PathBuf::from(cgroup::spec_path(id))));
    spec.set_linux(Some(linux));
    Ok(GuestSpec {
        spec,
        pod_namespaces,
        net_sysctls,
    })
}

/// containerd writes runc's recursive names (`rslave` for a HostToContainer volume);
/// libcontainer knows only the plain ones, and applies them recursively anyway.
fn plain_rootfs_propagation(linux: &mut libcontainer::oci_spec::runtime::Linux) {
    let plain = linux.rootfs_propagation().as_deref().and_then(|p| {
        p.strip_prefix('r')
            .filter(|rest| ["shared", "slave", "private", "unbindable"].contains(rest))
            .map(str::to_string)
    });
    if plain.is_some() {
        linux.set_rootfs_propagation(plain);
    }
}

/// Where a sysctl applies in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlScope {
    /// `net.*`: the network namespace, the guest's (the pod's).
    Network,
    /// The IPC namespace (the pod's when it is shared).
    Ipc,
}

/// The IPC sysctls (as in runc and libcontainer), besides `fs.mqueue.*`.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Checks a pod sysctl: plain words joined by `.` or `/` (the name becomes a path under
/// /proc/sys), a one-line value, and a namespaced kernel setting: any other would change
/// the whole guest kernel, and runc refuses it too.
pub fn sysctl_scope(name: &str, value: &str) -> Result<SysctlScope, SpecError> {
    let bad = |reason: &str| SpecError::BadSysctl {
        name: name.chars().take(256).collect(),
        reason: reason.into(),
    };
    let word = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
    };
    if name.len() > 256 || !name.split(['.', '/']).all(word) {
        return Err(bad(
            "not a sysctl name (words of [A-Za-z0-9_-] joined by . or /)",
        ));
    }
    if value.len() > 4096 || value.contains('\n') {
        return Err(bad("the value must be one line of at most 4096 bytes"));
    }
    let dotted = name.replace('/', ".");
    if dotted.starts_with("net.") {
        Ok(SysctlScope::Network)
    } else if IPC_SYSCTLS.contains(&dotted.as_str()) || dotted.starts_with("fs.mqueue.") {
        Ok(SysctlScope::Ipc)
    } else {
        Err(bad(
            "not in a separate kernel namespace: it would set the whole guest kernel",
        ))
    }
}

/// Takes the `net.*` sysctls out of the spec, checked by [`sysctl_scope`]; the others stay
/// for libcontainer.
fn take_net_sysctls(
    linux: &mut libcontainer::oci_spec::runtime::Linux,
) -> Result<Vec<(String, String)>, SpecError> {
    let Some(mut all) = linux.sysctl().clone() else {
        return Ok(Vec::new());
    };
    let mut net: Vec<(String, String)> = all
        .iter()
        .filter(|(k, _)| k.starts_with("net.") || k.starts_with("net/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    net.sort();
    for (name, value) in &net {
        sysctl_scope(name, value)?;
        all.remove(name);
    }
    linux.set_sysctl(Some(all));
    Ok(net)
}

/// Parses an exec's OCI Process. Nothing is defaulted: oci-spec's default process would
/// grant capabilities the host did not ask for.
pub fn exec_process(process_json: &[u8], terminal: bool) -> Result<Process, SpecError> {
    let mut process: Process =
        serde_json::from_slice(process_json).map_err(|e| SpecError::BadJson {
            what: "process",
            reason: e.to_string(),
        })?;
    process.set_terminal(Some(terminal));
    check_args(&process)?;
    drop_host_labels(&mut process);
    Ok(process)
}

/// AppArmor profiles and SELinux labels name host policies; the guest kernel has no LSM
/// (the VM is the boundary), and libcontainer would fail trying to apply them.
fn drop_host_labels(process: &mut Process) {
    process.set_apparmor_profile(None);
    process.set_selinux_label(None);
}

fn check_args(p: &Process) -> Result<(), SpecError> {
    let args = p.args().as_deref().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::NoArgs);
    }
    let env = p.env().as_deref().unwrap_or_default();
    let mut total = 0;
    for (what, s) in args
        .iter()
        .map(|a| ("argument", a))
        .chain(env.iter().map(|e| ("environment entry", e)))
    {
        if s.len() >= MAX_ARG_LEN {
            return Err(SpecError::TooLarge(format!(
                "an {what} is {} bytes long; the kernel accepts at most {} bytes per string",
                s.len(),
                MAX_ARG_LEN - 1
            )));
        }
        total += s.len() + 1 + std::mem::size_of::<usize>();
    }
    if total > MAX_ARGS_TOTAL {
        return Err(SpecError::TooLarge(format!(
            "arguments and environment take {total} bytes; at most {MAX_ARGS_TOTAL} are accepted"
        )));
    }
    Ok(())
}

/// Fails fast, as runc does, when args[0] cannot be executed in `rootfs`: searched in the
/// process's PATH when it has no slash, else relative to its cwd. Symlinks are followed
/// inside `rootfs`. Binaries that only exist on a volume mounted into the container are
/// not visible here and are reported missing.
pub fn check_executable(rootfs: &Path, process: &Process) -> Result<(), SpecError> {
    let name = &process.args().as_ref().ok_or(SpecError::NoArgs)?[0];
    let err = |reason: String| SpecError::NotExecutable {
        name: name.clone(),
        reason,
    };
    if name.contains('/') {
        let path = process.cwd().join(name);
        return executable(rootfs, &path).map_err(|e| err(format!("stat {}: {e}", path.display())));
    }
    let env_path = process
        .env()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();
    for dir in env_path.split(':').filter(|d| !d.is_empty()) {
        let dir = if dir.starts_with('/') {
            PathBuf::from(dir)
        } else {
            process.cwd().join(dir)
        };
        if executable(rootfs, &dir.join(name)).is_ok() {
            return Ok(());
        }
    }
    Err(err("executable file not found in $PATH".into()))
}

fn executable(rootfs: &Path, path: &Path) -> Result<(), String> {
    let resolved = resolve_in_root(rootfs, path).ok_or("no such file or directory")?;
    let meta = std::fs::metadata(&resolved).map_err(|_| "no such file or directory".to_string())?;
    if meta.is_dir() {
        return Err("is a directory".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("permission denied".into());
    }
    Ok(())
}

/// Resolves `path` as the container would see it (absolute symlinks point into `root`);
/// None when a component does not exist or symlinks loop.
fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    // Components still to walk, last one first; `None` restarts at the container's `/`.
    fn push(pending: &mut Vec<Option<OsString>>, path: &Path) {
        for c in path.components().rev() {
            match c {
                Component::Normal(p) => pending.push(Some(p.to_owned())),
                Component::ParentDir => pending.push(Some("..".into())),
                Component::RootDir => pending.push(None),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
    let mut pending = Vec::new();
    push(&mut pending, path);
    let mut inside = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        let Some(part) = c else {
            inside = PathBuf::new();
            continue;
        };
        if part == ".." {
            inside.pop();
            continue;
        }
        let candidate = inside.join(&part);
        let on_host = root.join(&candidate);
        let meta = std::fs::symlink_metadata(&on_host).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            push(&mut pending, &std::fs::read_link(&on_host).ok()?);
        } else {
            inside = candidate;
        }
    }
    Some(root.join(inside))
}

#[cfg(test)]
#[path = "guest_spec_tests.rs"]
mod tests;
