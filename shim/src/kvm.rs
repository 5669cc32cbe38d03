//! The KVM probe as the shim uses it: [`shoji_probe::kvm`] (can this host's KVM run an
//! ordinary guest?) off the async workers, and the accelerator QEMU gets from it.
pub use shoji_probe::kvm::{probe, KvmProbe};

use crate::{config::AccelChoice, hypervisor::Accel};

/// [`probe`] off the async workers.
pub async fn probe_async() -> &'static KvmProbe {
    tokio::task::spawn_blocking(probe)
        .await
        .expect("the KVM probe does not panic")
}

/// The accelerator QEMU gets with `qemu.accel = choice`, and why: as configured, or
/// (`auto`) KVM when the probe passes, else TCG with the probe's reason.
pub async fn qemu_accel(choice: AccelChoice) -> (Accel, String) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, "configured (qemu.accel = \"kvm\")".into()),
        AccelChoice::Tcg => (Accel::Tcg, "configured (qemu.accel = \"tcg\")".into()),
        AccelChoice::Auto => {
            let probe = probe_async().await;
            let accel = if probe.usable { Accel::Kvm } else { Accel::Tcg };
            (accel, probe.reason.clone())
        }
    }
}
