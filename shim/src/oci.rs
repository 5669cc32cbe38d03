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
pub const ANNOTATION_POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const ANNOTATION_POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// Longest pod name Kubernetes allows (a DNS subdomain).
const POD_NAME_MAX: usize = 253;

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

/// A spec asking for something shoji refuses, with the field and the limit named.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(String);

/// The VM size of a pod: from the pod's summed limits when kubelet declared them, plus the
/// guest's own overhead; the configured defaults otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// CFS bandwidth periods the kernel accepts (1 ms to 1 s), in microseconds.
const CPU_PERIOD_US: std::ops::RangeInclusive<i64> = 1_000..=1_000_000;

/// A numeric sandbox annotation: absent, `0` or negative mean "no limit" (as CRI sends them).
fn limit(spec: &Spec, key: &str) -> Result<Option<u64>, SpecError> {
    let Some(v) = annotation(spec, key) else {
        return Ok(None);
    };
    let n: i64 = v.trim().parse().map_err(|_| {
        SpecError(format!(
            "annotation {key}={:?} is not an integer",
            v.chars().take(40).collect::<String>()
        ))
    })?;
    Ok((n > 0).then_some(n as u64))
}

/// The VM a pod's spec asks for, within the configured maxima.
pub fn vm_size(spec: &Spec, config: &Config) -> Result<VmSize, SpecError> {
    let vcpus = match (
        limit(spec, ANNOTATION_CPU_QUOTA)?,
        limit(spec, ANNOTATION_CPU_PERIOD)?,
    ) {
        (Some(quota), Some(period)) => {
            if !CPU_PERIOD_US.contains(&(period as i64)) {
                return Err(SpecError(format!(
                    "annotation {ANNOTATION_CPU_PERIOD}={period} is outside {}..={} µs",
                    CPU_PERIOD_US.start(),
                    CPU_PERIOD_US.end()
                )));
            }
            quota.div_ceil(period)
        }
        _ => config.default_vcpus.into(),
    };
    if vcpus > config.max_vcpus.into() {
        return Err(SpecError(format!(
            "the pod's CPU limit needs {vcpus} vCPUs, above max_vcpus = {} (shoji configuration)",
            config.max_vcpus
        )));
    }
    let memory_mib = match limit(spec, ANNOTATION_MEMORY)? {
        Some(bytes) => bytes
            .div_ceil(1 << 20)
            .saturating_add(config.memory_overhead_mib),
        None => config.default_memory_mib,
    };
    if memory_mib > config.max_memory_mib {
        return Err(SpecError(format!(
            "the pod's memory limit needs a {memory_mib} MiB VM (with {} MiB for the guest), \
             above max_memory_mib = {} (shoji configuration)",
            config.memory_overhead_mib, config.max_memory_mib
        )));
    }
    Ok(VmSize {
        vcpus: (vcpus as u32).max(1),
        memory_mib,
    })
}

/// The sandbox a VM-owning container's spec asks for: its size, the pod's network
/// namespace and host cgroup, the hostname and the sysctls.
pub fn sandbox_config(
    spec: &Spec,
    container_id: &str,
    config: Config,
) -> Result<SandboxConfig, SpecError> {
    if role(spec) == Role::PodSandbox && !has_namespace(spec, LinuxNamespaceType::Network) {
        return Err(SpecError(
            "the pod asks for the host's network (hostNetwork: true): a pod's VM cannot \
             join the host network namespace; run it with a runc RuntimeClass"
                .into(),
        ));
    }
    let size = vm_size(spec, &config)?;
    let mut cfg = SandboxConfig::new(&grouping(spec, container_id), config);
    cfg.vcpus = size.vcpus;
    cfg.memory_mib = size.memory_mib;
    cfg.hostname = spec.hostname().clone();
    cfg.netns = network_namespace(spec);
    cfg.cgroup = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .map(|p| p.to_string_lossy().into_owned());
    let mut sysctls: Vec<_> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctls.sort();
    cfg.sysctls = sysctls;
    cfg.pod_namespace = pod_name(spec, ANNOTATION_POD_NAMESPACE)?;
    cfg.pod_name = pod_name(spec, ANNOTATION_POD_NAME)?;
    Ok(cfg)
}

/// A pod's namespace or name: Kubernetes makes them DNS labels/subdomains; anything else
/// (it ends up in state.json, `shoji ps` and metric labels) is refused.
fn pod_name(spec: &Spec, key: &str) -> Result<Option<String>, SpecError> {
    let Some(v) = annotation(spec, key) else {
        return Ok(None);
    };
    let ok = !v.is_empty()
        && v.len() <= POD_NAME_MAX
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok {
        return Err(SpecError(format!(
            "annotation {key}={:?} is not a Kubernetes name (1-{POD_NAME_MAX} letters, digits, '-' and '.')",
            v.chars().take(40).collect::<String>()
        )));
    }
    Ok(Some(v.to_string()))
}

/// The network namespace CRI created (and CNI populated) for the pod, if the spec joins one.
pub fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    namespaces(spec)
        .find(|n| n.typ() == LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
}

fn has_namespace(spec: &Spec, kind: LinuxNamespaceType) -> bool {
    namespaces(spec).any(|n| n.typ() == kind)
}

fn namespaces(spec: &Spec) -> impl Iterator<Item = &oci_spec::runtime::LinuxNamespace> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
}

/// A mount whose source is a host path (a bind mount): volumes, /etc/hosts, resolv.conf, ...
pub fn is_host_bind(m: &OciMount) -> bool {
    let bind_opt = m
        .options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
    m.typ().as_deref() == Some("bind") || bind_opt
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
    fn a_host_network_pod_is_refused() {
        let pod = spec(&[
            (ANNOTATION_CONTAINER_TYPE, "sandbox"),
            (ANNOTATION_SANDBOX_ID, "p"),
        ]);
        let mut linux = oci_spec::runtime::Linux::default();
        linux.set_namespaces(Some(vec![]));
        let mut host_net = pod.clone();
        host_net.set_linux(Some(linux));
        let e = sandbox_config(&host_net, "p", Config::default()).unwrap_err();
        assert!(e.to_string().contains("hostNetwork"), "{e}");
        // oci-spec's default spec has a network namespace of its own.
        assert!(sandbox_config(&pod, "p", Config::default()).is_ok());
    }

    #[test]
    fn vm_size_from_pod_limits_within_the_maxima() {
        let c = Config {
            default_vcpus: 1,
            default_memory_mib: 256,
            memory_overhead_mib: 64,
            max_vcpus: 8,
            max_memory_mib: 16384,
            ..Config::default()
        };
        let d = VmSize {
            vcpus: 1,
            memory_mib: 256,
        };
        assert_eq!(vm_size(&spec(&[]), &c).unwrap(), d);
        let s = spec(&[
            (ANNOTATION_CPU_QUOTA, "150000"),
            (ANNOTATION_CPU_PERIOD, "100000"),
            (ANNOTATION_MEMORY, "268435456"),
        ]);
        assert_eq!(
            vm_size(&s, &c).unwrap(),
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
        assert_eq!(vm_size(&s, &c).unwrap(), d);
        let refused = |a: &[(&str, &str)], want: &str| {
            let err = vm_size(&spec(a), &c).unwrap_err().to_string();
            assert!(err.contains(want), "{a:?}: {err}");
        };
        refused(
            &[(ANNOTATION_MEMORY, "107374182400")],
            "max_memory_mib = 16384",
        );
        refused(
            &[(ANNOTATION_MEMORY, "18446744073709551615")],
            "not an integer",
        );
        refused(
            &[(ANNOTATION_MEMORY, "9223372036854775807")],
            "max_memory_mib",
        );
        refused(&[(ANNOTATION_MEMORY, "lots")], "not an integer");
        refused(
            &[
                (ANNOTATION_CPU_QUOTA, "9223372036854775807"),
                (ANNOTATION_CPU_PERIOD, "100000"),
            ],
            "max_vcpus = 8",
        );
        refused(
            &[
                (ANNOTATION_CPU_QUOTA, "100000"),
                (ANNOTATION_CPU_PERIOD, "1"),
            ],
            "outside 1000..=1000000",
        );
        refused(&[(ANNOTATION_CPU_QUOTA, "1e9")], "not an integer");
    }

    #[test]
    fn pod_namespace_and_name_are_recorded_and_checked() {
        let c = Config::default();
        let s = spec(&[
            (ANNOTATION_POD_NAMESPACE, "kube-system"),
            (ANNOTATION_POD_NAME, "web-0.x"),
        ]);
        let cfg = sandbox_config(&s, "c", c.clone()).unwrap();
        assert_eq!(cfg.pod_namespace.as_deref(), Some("kube-system"));
        assert_eq!(cfg.pod_name.as_deref(), Some("web-0.x"));
        let none = sandbox_config(&spec(&[]), "c", c.clone()).unwrap();
        assert_eq!((none.pod_namespace, none.pod_name), (None, None));
        for bad in ["", "a b", "a\"b", "x\ny", &"a".repeat(254)] {
            let err = sandbox_config(&spec(&[(ANNOTATION_POD_NAME, bad)]), "c", c.clone())
                .unwrap_err()
                .to_string();
            assert!(err.contains(ANNOTATION_POD_NAME), "{bad:?}: {err}");
        }
    }
}
