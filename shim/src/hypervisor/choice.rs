//! Which VMM a sandbox runs on, and why: the one place that decides.
//!
//! `hypervisor = "auto"` (the default) takes Cloud Hypervisor where it can run guests (the
//! KVM probe passes and its binary is found), else QEMU, which runs anywhere (KVM, or TCG
//! where KVM cannot run ordinary guests). `qemu` and `clh` are taken as configured. The
//! choice is logged at every VM start and shown by `shoji check`.
use std::path::Path;

use shoji_probe::clh_blocker;

use super::HypervisorKind;
use crate::{
    config::{Config, HypervisorChoice},
    kvm::{self, KvmProbe},
};

/// The VMM a sandbox gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub kind: HypervisorKind,
    /// Why, in words: `configured (…)` or `auto: …`.
    pub reason: String,
    /// Why the chosen VMM cannot run guests here, when it was configured anyway.
    pub blocker: Option<String>,
}

/// The choice for `hypervisor = choice`, given the KVM probe's verdict and whether the
/// Cloud Hypervisor binary (`clh`, as configured) was found.
pub fn decide(choice: HypervisorChoice, kvm: &KvmProbe, clh: &Path, clh_found: bool) -> Choice {
    let blocker = clh_blocker(kvm, clh, clh_found);
    let (kind, reason, blocker) = match choice {
        HypervisorChoice::Qemu => (
            HypervisorKind::Qemu,
            "configured (hypervisor = \"qemu\")".to_string(),
            None,
        ),
        HypervisorChoice::Clh => (
            HypervisorKind::Clh,
            "configured (hypervisor = \"clh\")".to_string(),
            blocker,
        ),
        HypervisorChoice::Auto => match blocker {
            None => (
                HypervisorKind::Clh,
                format!(
                    "auto: KVM runs ordinary guests and cloud-hypervisor is {}",
                    clh.display()
                ),
                None,
            ),
            Some(why) => (HypervisorKind::Qemu, format!("auto: {why}"), None),
        },
    };
    Choice {
        kind,
        reason,
        blocker,
    }
}

/// [`decide`] for this host and `cfg` (the KVM probe is cached for the process's life).
pub async fn choose(cfg: &Config) -> Choice {
    let clh = shoji_probe::locate(&cfg.clh.path);
    decide(
        cfg.hypervisor,
        kvm::probe_async().await,
        clh.as_deref().unwrap_or(&cfg.clh.path),
        clh.is_some(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm(usable: bool) -> KvmProbe {
        KvmProbe {
            usable,
            reason: match usable {
                true => "a test guest ran under KVM (3 ms)",
                false => "KVM could not deliver an exception to a 64-bit test guest",
            }
            .into(),
        }
    }

    const CLH: &str = "/usr/local/bin/cloud-hypervisor";

    #[test]
    fn auto_takes_cloud_hypervisor_only_where_it_can_run() {
        let clh = Path::new(CLH);
        let c = decide(HypervisorChoice::Auto, &kvm(true), clh, true);
        assert_eq!(
            (c.kind, c.reason.as_str(), c.blocker),
            (
                HypervisorKind::Clh,
                "auto: KVM runs ordinary guests and cloud-hypervisor is /usr/local/bin/cloud-hypervisor",
                None
            )
        );
        let c = decide(HypervisorChoice::Auto, &kvm(false), clh, true);
        assert_eq!(c.kind, HypervisorKind::Qemu);
        assert_eq!(
            c.reason,
            "auto: KVM cannot run ordinary guests here: KVM could not deliver an exception to a 64-bit test guest"
        );
        assert_eq!(c.blocker, None, "QEMU runs anywhere");
        let c = decide(
            HypervisorChoice::Auto,
            &kvm(true),
            Path::new("cloud-hypervisor"),
            false,
        );
        assert_eq!(
            (c.kind, c.reason.as_str()),
            (
                HypervisorKind::Qemu,
                "auto: the cloud-hypervisor binary was not found (cloud-hypervisor)"
            )
        );
    }

    #[test]
    fn explicit_choices_are_kept_and_a_clh_that_cannot_run_says_why() {
        let clh = Path::new(CLH);
        for usable in [true, false] {
            let c = decide(HypervisorChoice::Qemu, &kvm(usable), clh, true);
            assert_eq!(
                (c.kind, c.reason.as_str(), c.blocker),
                (
                    HypervisorKind::Qemu,
                    "configured (hypervisor = \"qemu\")",
                    None
                )
            );
        }
        let c = decide(HypervisorChoice::Clh, &kvm(true), clh, true);
        assert_eq!(
            (c.kind, c.reason.as_str(), c.blocker),
            (
                HypervisorKind::Clh,
                "configured (hypervisor = \"clh\")",
                None
            )
        );
        let c = decide(HypervisorChoice::Clh, &kvm(false), clh, true);
        assert_eq!(c.kind, HypervisorKind::Clh, "configured is configured");
        assert!(
            c.blocker
                .as_deref()
                .unwrap()
                .starts_with("KVM cannot run ordinary guests here"),
            "{c:?}"
        );
        let c = decide(HypervisorChoice::Clh, &kvm(true), clh, false);
        assert!(c.blocker.as_deref().unwrap().contains("not found"), "{c:?}");
    }
}
