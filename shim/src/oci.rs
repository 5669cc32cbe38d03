//! What the shim reads from an OCI spec written by containerd: which role the container plays
//! in its pod (CRI annotations), the sandbox it asks for (size, network namespace, host
//! cgroup, hostname), and which mounts are host paths that have to travel into the VM
//! through the shared directory.
use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceType, Mount as OciMount, Spec};

use crate::{config::Config, sandbox::SandboxConfig};

pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const ANNOTATION_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const ANNOTATION_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const ANNOTATION_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// The part a container plays in its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// CRI's pause container: it boots the pod's VM and runs nothing in it.
    PodSandbox,
    /// A CRI container joining the VM of pod `sandbox_id`.
    PodMember { sandbox_id: String },
    /// A container without CRI annotations (`ctr run`): it is its own sandbox.
    Standalone,
}

fn annotation<'a>(spec: &'a Spec, key: &str) -> Option<&'a str> {
    spec.annotations().as_ref()?.get(key).map(String::as_str)
}

pub fn role(spec: &Spec) -> Role {
    match (
        annotation(spec, ANNOTATION_CONTAINER_TYPE),
        annotation(spec, ANNOTATION_SANDBOX_ID),
    ) {
        (Some("sandbox"), _) => Role::PodSandbox,
        (Some("container"), Some(id)) => Role::PodMember {
            sandbox_id: id.to_string(),
        },
        _ => Role::Standalone,
    }
}

/// The id that groups containers into one shim (and one VM): the pod's sandbox id.
pub fn grouping(spec: &Spec, container_id: &str) -> String {
    annotation(spec, ANNOTATION_SANDBOX_ID)
        .unwrap_or(container_id)
        .to_string()
}

/// The VM size of a pod: from the pod's summed limits when kubelet declared them, plus the
/// guest's own overhead; the configured defaults otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

pub fn vm_size(spec: &Spec, default: VmSize, memory_overhead_mib: u64) -> VmSize {
    let num = |key| {
        annotation(spec, key)
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|v| *v > 0)
    };
    let vcpus = match (num(ANNOTATION_CPU_QUOTA), num(ANNOTATION_CPU_PERIOD)) {
        (Some(quota), Some(period)) => ((quota + period - 1) / period) as u32,
        _ => default.vcpus,
    };
    let memory_mib = match num(ANNOTATION_MEMORY) {
        Some(bytes) => (bytes as u64).div_ceil(1 << 20) + memory_overhead_mib,
        None => default.memory_mib,
    };
    VmSize {
        vcpus: vcpus.max(1),
        memory_mib,
    }
}

/// The sandbox a VM-owning container's spec asks for: its size, the pod's network
/// namespace and host cgroup, and the hostname.
pub fn sandbox_config(spec: &Spec, container_id: &str, config: Config) -> SandboxConfig {
    let default = VmSize {
        vcpus: config.default_vcpus,
        memory_mib: config.default_memory_mib,
    };
    let size = vm_size(spec, default, config.memory_overhead_mib);
    let mut cfg = SandboxConfig::new(&grouping(spec, container_id), config);
    cfg.vcpus = size.vcpus;
    cfg.memory_mib = size.memory_mib;
    cfg.hostname = spec.hostname().clone();
    cfg.netns = network_namespace(spec);
    cfg.cgroup = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .and_then(|p| p.to_str().map(String::from));
    cfg
}

/// The network namespace CRI created (and CNI populated) for the pod, if the spec joins one.
pub fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    let namespaces = spec.linux().as_ref()?.namespaces().as_ref()?;
    namespaces
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
}

/// A mount whose source is a host path (a bind mount): volumes, /etc/hosts, resolv.conf, ...
pub fn is_host_bind(m: &OciMount) -> bool {
    let bind_opt = m
        .options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
    m.typ().as_deref() == Some("bind") || bind_opt
}

pub fn is_read_only(m: &OciMount) -> bool {
    m.options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o == "ro"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(annotations: &[(&str, &str)]) -> Spec {
        let mut s = Spec::default();
        s.set_annotations(Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        s
    }

    #[test]
    fn roles_follow_cri_annotations() {
        assert_eq!(
            role(&spec(&[
                (ANNOTATION_CONTAINER_TYPE, "sandbox"),
                (ANNOTATION_SANDBOX_ID, "p")
            ])),
            Role::PodSandbox
        );
        assert_eq!(
            role(&spec(&[
                (ANNOTATION_CONTAINER_TYPE, "container"),
                (ANNOTATION_SANDBOX_ID, "p")
            ])),
            Role::PodMember {
                sandbox_id: "p".into()
            }
        );
        assert_eq!(role(&spec(&[])), Role::Standalone);
        assert_eq!(grouping(&spec(&[(ANNOTATION_SANDBOX_ID, "p")]), "c"), "p");
        assert_eq!(grouping(&spec(&[]), "c"), "c");
    }

    #[test]
    fn vm_size_from_pod_limits() {
        let d = VmSize {
            vcpus: 1,
            memory_mib: 256,
        };
        assert_eq!(vm_size(&spec(&[]), d, 64), d);
        let s = spec(&[
            (ANNOTATION_CPU_QUOTA, "150000"),
            (ANNOTATION_CPU_PERIOD, "100000"),
            (ANNOTATION_MEMORY, "268435456"),
        ]);
        assert_eq!(
            vm_size(&s, d, 64),
            VmSize {
                vcpus: 2,
                memory_mib: 320
            }
        );
        // "-1" and "0" mean no limit.
        let s = spec(&[
            (ANNOTATION_CPU_QUOTA, "-1"),
            (ANNOTATION_CPU_PERIOD, "100000"),
            (ANNOTATION_MEMORY, "0"),
        ]);
        assert_eq!(vm_size(&s, d, 64), d);
    }
}
