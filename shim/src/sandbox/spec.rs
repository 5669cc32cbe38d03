//! The sandbox a VM-owning container's OCI spec asks for: the VM's size from the pod's
//! declared limits (plus the guest's own overhead) within the configured maxima, the pod's
//! network namespace and host cgroup, its hostname, sysctls and name. What the spec says is
//! read (and checked) by [`crate::oci`]. And what any sandbox's configuration must be,
//! whoever made it, checked before anything starts.
use oci_spec::runtime::Spec;

use shoji_agent_api::{
    CMDLINE_DEBUG_CONSOLE, CMDLINE_HOSTNAME, CMDLINE_LOG_LEVEL, CMDLINE_PAGE_REPORTING_ORDER,
    CMDLINE_SHARE_TAG,
};

use super::{sizing::VmSize, validate_id, Result, SandboxConfig, SandboxError, SHARE_TAG};
use crate::{
    config::{Config, MIN_MEMORY_MIB},
    oci::{self, PodLimits, SpecError},
};

impl SandboxConfig {
    /// The sandbox `spec` (of container `container_id`) asks for.
    pub fn from_spec(
        spec: &Spec,
        container_id: &str,
        config: Config,
    ) -> Result<SandboxConfig, SpecError> {
        if oci::wants_host_network(spec) {
            return Err(SpecError(
                "the pod asks for the host's network (hostNetwork: true): a pod's VM cannot \
                 join the host network namespace; run it with a runc RuntimeClass"
                    .into(),
            ));
        }
        let size = vm_size(oci::pod_limits(spec)?, &config)?;
        let (pod_namespace, pod_name) = oci::pod_identity(spec)?;
        let mut cfg = SandboxConfig::new(&oci::grouping(spec, container_id), config);
        cfg.vcpus = size.vcpus;
        cfg.memory_mib = size.memory_mib;
        cfg.hostname = spec.hostname().clone();
        cfg.netns = oci::network_namespace(spec);
        cfg.cgroup = oci::cgroups_path(spec);
        cfg.sysctls = oci::sysctls(spec);
        cfg.pod_namespace = pod_namespace;
        cfg.pod_name = pod_name;
        Ok(cfg)
    }
}

impl SandboxConfig {
    /// Refuses what cannot boot or must not reach the kernel command line, naming it.
    pub(super) fn validate(&self) -> Result<()> {
        validate_id("sandbox id", &self.id)?;
        if let Some(h) = &self.hostname {
            validate_hostname(h)?;
        }
        validate_size(self.vcpus, self.memory_mib, &self.config)
    }
}

/// The hostname travels on the kernel command line: a space or a quote would inject kernel
/// arguments. RFC 1123 labels, as Kubernetes requires.
fn validate_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Invalid(format!(
            "hostname {:?} is not a valid host name (1-64 characters, letters, digits, '-' and '.')",
            h.chars().take(80).collect::<String>()
        )))
    }
}

/// A VM's size within what the guest needs and the configured maxima, checked before
/// anything starts, whoever asks (a pod's limits, `shoji vm run --cpus/--memory`).
fn validate_size(vcpus: u32, memory_mib: u64, c: &Config) -> Result<()> {
    let refuse = |why: String| Err(SandboxError::Invalid(why));
    if vcpus == 0 {
        return refuse("a VM of 0 vCPUs: it needs at least 1".into());
    }
    if vcpus > c.max_vcpus {
        return refuse(format!(
            "a VM of {vcpus} vCPUs: above max_vcpus = {} (shoji configuration)",
            c.max_vcpus
        ));
    }
    if memory_mib < MIN_MEMORY_MIB {
        return refuse(format!(
            "a VM of {memory_mib} MiB: the guest needs at least {MIN_MEMORY_MIB} MiB"
        ));
    }
    if memory_mib > c.max_memory_mib {
        return refuse(format!(
            "a VM of {memory_mib} MiB: above max_memory_mib = {} (shoji configuration)",
            c.max_memory_mib
        ));
    }
    Ok(())
}

/// The VM a pod's limits ask for, within the configured maxima: the defaults where kubelet
/// declared no limit.
fn vm_size(limits: PodLimits, config: &Config) -> Result<VmSize, SpecError> {
    let vcpus = match limits.cpu {
        Some((quota, period)) => quota.div_ceil(period),
        None => config.default_vcpus.into(),
    };
    if vcpus > config.max_vcpus.into() {
        return Err(SpecError(format!(
            "the pod's CPU limit needs {vcpus} vCPUs, above max_vcpus = {} (shoji configuration)",
            config.max_vcpus
        )));
    }
    let memory_mib = match limits.memory_bytes {
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

/// The guest reports free blocks of 128 KiB and up (2^5 pages), not only 2 MiB ones: an idle
/// pod's VMM holds 5 MiB less (the blocks freed after boot: the compressed initramfs, init
/// sections), with no measurable cost to start, exec or throughput (docs/benchmarks.md).
const PAGE_REPORTING_ORDER: u32 = 5;

impl SandboxConfig {
    /// The driver adds console, panic and timer arguments; these tell the agent what to mount,
    /// log and report.
    pub(super) fn guest_kernel_args(&self) -> Vec<String> {
        let cfg = self;
        let hostname = cfg
            .hostname
            .clone()
            .unwrap_or_else(|| cfg.id.chars().take(12).collect());
        let mut args = vec![
            format!("{CMDLINE_SHARE_TAG}={SHARE_TAG}"),
            format!("{CMDLINE_LOG_LEVEL}={}", cfg.config.log_level),
            format!("{CMDLINE_HOSTNAME}={hostname}"),
        ];
        if cfg.config.debug_console {
            args.push(format!("{CMDLINE_DEBUG_CONSOLE}=1"));
        }
        if cfg.config.free_page_reporting {
            args.push(format!(
                "{CMDLINE_PAGE_REPORTING_ORDER}={PAGE_REPORTING_ORDER}"
            ));
        }
        args.extend(cfg.config.kernel_args.iter().cloned());
        args.extend(cfg.kernel_args.iter().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use crate::oci::{
        annotated_spec as spec, ANNOTATION_CONTAINER_TYPE, ANNOTATION_POD_NAME,
        ANNOTATION_POD_NAMESPACE, ANNOTATION_SANDBOX_ID,
    };

    use super::*;

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
        let e = SandboxConfig::from_spec(&host_net, "p", Config::default()).unwrap_err();
        assert!(e.to_string().contains("hostNetwork"), "{e}");
        // oci-spec's default spec has a network namespace of its own.
        assert!(SandboxConfig::from_spec(&pod, "p", Config::default()).is_ok());
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
        assert_eq!(vm_size(PodLimits::default(), &c).unwrap(), d);
        let limits = |cpu, memory_bytes| PodLimits { cpu, memory_bytes };
        assert_eq!(
            vm_size(limits(Some((150_000, 100_000)), Some(268_435_456)), &c).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 320
            }
        );
        let refused = |l: PodLimits, want: &str| {
            let err = vm_size(l, &c).unwrap_err().to_string();
            assert!(err.contains(want), "{l:?}: {err}");
        };
        refused(
            limits(None, Some(107_374_182_400)),
            "max_memory_mib = 16384",
        );
        refused(limits(None, Some(i64::MAX as u64)), "max_memory_mib");
        refused(
            limits(Some((i64::MAX as u64, 100_000)), None),
            "max_vcpus = 8",
        );
    }

    #[test]
    fn the_pods_name_is_recorded() {
        let s = spec(&[
            (ANNOTATION_POD_NAMESPACE, "kube-system"),
            (ANNOTATION_POD_NAME, "web-0.x"),
        ]);
        let cfg = SandboxConfig::from_spec(&s, "c", Config::default()).unwrap();
        assert_eq!(cfg.pod_namespace.as_deref(), Some("kube-system"));
        assert_eq!(cfg.pod_name.as_deref(), Some("web-0.x"));
        let bad = spec(&[(ANNOTATION_POD_NAME, "a b")]);
        assert!(SandboxConfig::from_spec(&bad, "c", Config::default()).is_err());
    }

    #[test]
    fn hostnames_that_would_inject_kernel_arguments_are_refused() {
        for good in ["a", "pod-1", "web.default", &"a".repeat(63)] {
            validate_hostname(good).unwrap();
        }
        for bad in [
            "",
            "a b",
            "a init=/bin/sh",
            "-a",
            "a..b",
            "a\"b",
            &"a".repeat(65),
        ] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kernel_args_name_share_log_and_hostname() {
        let mut cfg = SandboxConfig::new("0123456789abcdef", Config::default());
        cfg.kernel_args.push("x=1".into());
        let args = cfg.guest_kernel_args();
        assert_eq!(args[0], "shoji.share=shoji");
        assert_eq!(args[1], "shoji.log=info");
        assert_eq!(args[2], "shoji.hostname=0123456789ab");
        assert_eq!(args.last().unwrap(), "x=1");
        assert!(!args.iter().any(|a| a.starts_with("shoji.debug_console")));
        assert!(args.contains(&"shoji.page_reporting_order=5".to_string()));
        cfg.config.debug_console = true;
        cfg.config.free_page_reporting = false;
        let args = cfg.guest_kernel_args();
        assert!(args.contains(&"shoji.debug_console=1".to_string()));
        assert!(!args.iter().any(|a| a.starts_with("shoji.page_reporting")));
    }
}
