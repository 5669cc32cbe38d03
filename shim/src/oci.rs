//! What the shim reads from an OCI spec written by containerd, checked: which role the
//! container plays in its pod (CRI annotations), what the pod declares (its limits, name,
//! network namespace, host cgroup, sysctls), and which mounts are host paths that have to
//! travel into the VM through the shared directory. A plain reader: what a sandbox makes of
//! it is `sandbox::spec`.
use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceType, Mount as OciMount, Spec};

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
pub struct SpecError(pub String);

/// CFS bandwidth periods the kernel accepts (1 ms to 1 s), in microseconds.
const CPU_PERIOD_US: std::ops::RangeInclusive<i64> = 1_000..=1_000_000;

/// The pod's summed limits, as kubelet declares them to the runtime (CRI's sandbox
/// annotations); `None` where it declared no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodLimits {
    /// CFS quota and period, in microseconds.
    pub cpu: Option<(u64, u64)>,
    pub memory_bytes: Option<u64>,
}

/// A limit annotation: a non-negative integer; `-1` and `0` mean none.
fn limit(spec: &Spec, key: &str) -> Result<Option<u64>, SpecError> {
    let Some(v) = annotation(spec, key) else {
        return Ok(None);
    };
    let n: i64 = v.parse().map_err(|_| {
        SpecError(format!(
            "annotation {key}={:?} is not an integer",
            v.chars().take(40).collect::<String>()
        ))
    })?;
    Ok((n > 0).then_some(n as u64))
}

/// The pod's limits, checked for what the kernel would refuse.
pub fn pod_limits(spec: &Spec) -> Result<PodLimits, SpecError> {
    let cpu = match (
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
            Some((quota, period))
        }
        _ => None,
    };
    Ok(PodLimits {
        cpu,
        memory_bytes: limit(spec, ANNOTATION_MEMORY)?,
    })
}

/// A pod that asks for the host's network: CRI's pause container without a network
/// namespace of its own (`hostNetwork: true`).
pub fn wants_host_network(spec: &Spec) -> bool {
    role(spec) == Role::PodSandbox && !has_namespace(spec, LinuxNamespaceType::Network)
}

/// The pod's namespace and name (CRI annotations), if given.
pub fn pod_identity(spec: &Spec) -> Result<(Option<String>, Option<String>), SpecError> {
    Ok((
        pod_name(spec, ANNOTATION_POD_NAMESPACE)?,
        pod_name(spec, ANNOTATION_POD_NAME)?,
    ))
}

/// The spec's sysctls, sorted by name.
pub fn sysctls(spec: &Spec) -> Vec<(String, String)> {
    let mut sysctls: Vec<_> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctls.sort();
    sysctls
}

/// The host cgroup the spec places the container in.
pub fn cgroups_path(spec: &Spec) -> Option<String> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().clone())
        .map(|p| p.to_string_lossy().into_owned())
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

/// oci-spec's default spec with `annotations`, for unit tests.
#[cfg(test)]
pub fn annotated_spec(annotations: &[(&str, &str)]) -> Spec {
    let mut s = Spec::default();
    s.set_annotations(Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::{annotated_spec as spec, *};

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
    fn pod_limits_are_read_and_checked() {
        assert_eq!(pod_limits(&spec(&[])).unwrap(), PodLimits::default());
        let s = spec(&[
            (ANNOTATION_CPU_QUOTA, "150000"),
            (ANNOTATION_CPU_PERIOD, "100000"),
            (ANNOTATION_MEMORY, "268435456"),
        ]);
        assert_eq!(
            pod_limits(&s).unwrap(),
            PodLimits {
                cpu: Some((150_000, 100_000)),
                memory_bytes: Some(268_435_456)
            }
        );
        // "-1" and "0" mean no limit.
        let s = spec(&[
            (ANNOTATION_CPU_QUOTA, "-1"),
            (ANNOTATION_CPU_PERIOD, "100000"),
            (ANNOTATION_MEMORY, "0"),
        ]);
        assert_eq!(pod_limits(&s).unwrap(), PodLimits::default());
        let refused = |a: &[(&str, &str)], want: &str| {
            let err = pod_limits(&spec(a)).unwrap_err().to_string();
            assert!(err.contains(want), "{a:?}: {err}");
        };
        refused(
            &[(ANNOTATION_MEMORY, "18446744073709551615")],
            "not an integer",
        );
        refused(&[(ANNOTATION_MEMORY, "lots")], "not an integer");
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
    fn pod_namespace_and_name_are_read_and_checked() {
        let s = spec(&[
            (ANNOTATION_POD_NAMESPACE, "kube-system"),
            (ANNOTATION_POD_NAME, "web-0.x"),
        ]);
        assert_eq!(
            pod_identity(&s).unwrap(),
            (Some("kube-system".into()), Some("web-0.x".into()))
        );
        assert_eq!(pod_identity(&spec(&[])).unwrap(), (None, None));
        for bad in ["", "a b", "a\"b", "x\ny", &"a".repeat(254)] {
            let err = pod_identity(&spec(&[(ANNOTATION_POD_NAME, bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(ANNOTATION_POD_NAME), "{bad:?}: {err}");
        }
    }
}
