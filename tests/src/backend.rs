//! Which VMM the VM and containerd tests run on: `SHOJI_TEST_HYPERVISOR` = `qemu` (the
//! default) or `clh` (Cloud Hypervisor). With `clh` on a host where Cloud Hypervisor cannot
//! run guests, every test that boots a VM stops at its start with the reason, as decided by
//! the runtime itself ([`shoji::hypervisor::choice`]); `hack/test.sh` says it once, before it
//! builds anything.
use std::sync::OnceLock;

use shoji::{
    config::{Config, HypervisorChoice},
    hypervisor::{choice, HypervisorKind},
    kvm,
};

/// The environment variable that selects the backend.
pub const ENV: &str = "SHOJI_TEST_HYPERVISOR";

/// The VMM under test. Panics with the reason when it cannot run here.
pub fn hypervisor() -> HypervisorKind {
    static KIND: OnceLock<Result<HypervisorKind, String>> = OnceLock::new();
    KIND.get_or_init(select)
        .clone()
        .unwrap_or_else(|why| panic!("{why}"))
}

fn select() -> Result<HypervisorKind, String> {
    match std::env::var(ENV).as_deref() {
        Err(_) | Ok("" | "qemu") => Ok(HypervisorKind::Qemu),
        Ok("clh") => {
            let cfg = Config::load().map_err(|e| e.to_string())?;
            let found = shoji_probe::locate(&cfg.clh.path);
            let clh = found.as_deref().unwrap_or(&cfg.clh.path);
            let chosen = choice::decide(HypervisorChoice::Clh, kvm::probe(), clh, found.is_some());
            match chosen.blocker {
                None => Ok(HypervisorKind::Clh),
                Some(why) => Err(format!(
                    "{ENV}=clh, but Cloud Hypervisor cannot run guests here: {why}"
                )),
            }
        }
        Ok(other) => Err(format!("{ENV}={other:?}: use qemu or clh")),
    }
}

/// The configuration's `hypervisor` for the VMM under test.
pub fn choice() -> HypervisorChoice {
    match hypervisor() {
        HypervisorKind::Qemu => HypervisorChoice::Qemu,
        HypervisorKind::Clh => HypervisorChoice::Clh,
    }
}

/// The VMM's name in a sandbox's state, `shoji ps` and metrics.
pub fn vmm_name() -> &'static str {
    match hypervisor() {
        HypervisorKind::Qemu => "qemu",
        HypervisorKind::Clh => "cloud-hypervisor",
    }
}

/// The VMM's `/proc/<pid>/comm` (names are cut at 15 bytes).
pub fn vmm_comm() -> &'static str {
    match hypervisor() {
        HypervisorKind::Qemu => "qemu-system-x86",
        HypervisorKind::Clh => "cloud-hyperviso",
    }
}

/// Every process of one VM, by the names the sandbox records.
pub fn vm_processes() -> &'static [&'static str] {
    match hypervisor() {
        HypervisorKind::Qemu => &["qemu", "virtiofsd", "vhost-device-vsock"],
        HypervisorKind::Clh => &["cloud-hypervisor", "virtiofsd"],
    }
}
