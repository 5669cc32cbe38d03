//! End to end with a real Cloud Hypervisor: boot a sandbox, check the agent's health, run
//! `echo hello` in a busybox container, tear down, nothing left (the VM harness of
//! tests/src/vm.rs, as the QEMU tests in vm_sandbox.rs). It needs a KVM host that runs
//! ordinary guests and `cloud-hypervisor` installed, so it only runs on request:
//!
//!     SHOJI_TEST_HYPERVISOR=clh cargo nextest run -p shoji-tests --test clh_e2e --run-ignored all
//!
//! (`hack/validate-node.sh` runs it.) The same scenario also runs here on QEMU (not ignored),
//! so the scenario itself is known to work on every host and a CH failure points at the CH
//! path.
use std::time::{Duration, Instant};

use shoji::{config::HypervisorChoice, hypervisor::HypervisorKind};
use shoji_tests::{
    backend,
    vm::{remove_container, run_container, TestEnv},
};

/// Bound for the whole scenario (TCG on a loaded 2-core host boots in seconds).
const LIMIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real KVM and cloud-hypervisor"]
async fn busybox_echo_on_cloud_hypervisor() {
    // Also says why when Cloud Hypervisor cannot run here.
    assert_eq!(
        backend::hypervisor(),
        HypervisorKind::Clh,
        "this test drives a real Cloud Hypervisor: set {}=clh on a KVM host with cloud-hypervisor installed",
        backend::ENV
    );
    run_scenario("clh-e2e", HypervisorChoice::Clh, "cloud-hyperviso").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_scenario_on_qemu() {
    run_scenario("clh-e2e-qemu", HypervisorChoice::Qemu, "qemu-system-x86").await;
}

/// `vmm_comm`: the VMM's /proc comm (process names are cut at 15 bytes).
async fn run_scenario(name: &str, kind: HypervisorChoice, vmm_comm: &str) {
    let mut env = TestEnv::new(name).await;
    env.config.hypervisor = kind;
    if kind == HypervisorChoice::Clh {
        let ch = &env.config.clh.path;
        assert!(
            ch.is_file(),
            "cloud-hypervisor not found at {} (see docs/cloud-hypervisor.md)",
            ch.display()
        );
    }
    let scenario = async {
        let started = Instant::now();
        let sandbox = env.start(name).await;
        let ready = started.elapsed();
        let vmm = sandbox.vmm_pid();
        let comm = std::fs::read_to_string(format!("/proc/{vmm}/comm")).unwrap();
        assert_eq!(comm.trim(), vmm_comm, "the sandbox runs on the wrong VMM");
        let health = sandbox.agent().health().await.expect("agent health");
        eprintln!(
            "{kind:?}: VMM start → agent ready {ready:?}; agent {}",
            health.version
        );

        let out = run_container(&sandbox, "c1", &["echo", "hello"], b"", false).await;
        assert_eq!(
            (out.stdout().as_str(), out.stderr().as_str(), out.status),
            ("hello\n", "", 0)
        );
        remove_container(&sandbox, "c1").await;
        sandbox.stop().await.expect("sandbox stop");
    };
    tokio::time::timeout(LIMIT, scenario)
        .await
        .expect("scenario exceeded its time limit");
    env.assert_no_leak().await;
}
