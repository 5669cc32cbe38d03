//! End to end with a real Cloud Hypervisor: boot a sandbox, check the agent's health, run
//! `echo hello` in a busybox container, tear down, nothing left. It needs a KVM host that
//! runs ordinary guests and `cloud-hypervisor` on the PATH, so it only runs on request:
//!
//!     SHOJI_TEST_CLH=1 cargo test -p shoji-tests --test clh_e2e -- --ignored
//!
//! The same scenario also runs here on QEMU (not ignored), so the scenario itself is known
//! to work on every host and a CH failure points at the CH path.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use shoji::{
    cli::{rootfs, spec::container_spec},
    config::{find_binary, Config},
    hypervisor::HypervisorKind,
    sandbox::{Mount, Sandbox, SandboxConfig},
};
use shoji_agent_api::{
    stream::StreamKind,
    types::{CreateContainerRequest, Rootfs},
};
use tokio::io::AsyncReadExt;

/// Bound for the whole scenario (TCG on a loaded 2-core host boots in seconds).
const LIMIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs real KVM + cloud-hypervisor; run with SHOJI_TEST_CLH=1 cargo test -p shoji-tests --test clh_e2e -- --ignored"]
async fn busybox_echo_on_cloud_hypervisor() {
    assert_eq!(
        std::env::var("SHOJI_TEST_CLH").as_deref(),
        Ok("1"),
        "this test drives a real Cloud Hypervisor: set SHOJI_TEST_CLH=1 on a KVM host with cloud-hypervisor installed"
    );
    let kvm = shoji::kvm::probe();
    assert!(
        kvm.usable,
        "KVM cannot run ordinary guests here: {}",
        kvm.reason
    );
    let ch = find_binary("cloud-hypervisor");
    assert!(
        ch.is_file(),
        "cloud-hypervisor not found (PATH, ~/.cargo/bin); see docs/cloud-hypervisor.md"
    );
    run_scenario(HypervisorKind::Clh, "cloud-hypervisor").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_scenario_on_qemu() {
    run_scenario(HypervisorKind::Qemu, "qemu-system-x86").await;
}

async fn run_scenario(kind: HypervisorKind, vmm_comm: &str) {
    // Short base path: the sandbox's Unix sockets must stay under 108 bytes.
    let base = tempfile::Builder::new()
        .prefix("shjclh")
        .tempdir_in("/tmp")
        .unwrap();
    let mut config = Config::default();
    config.hypervisor = kind;
    config.run_dir = base.path().join("run");
    for (what, path) in [
        ("guest kernel", &config.kernel),
        ("guest initramfs", &config.initrd),
    ] {
        assert!(
            path.is_file(),
            "{what} missing at {} (guest-kernel/build.sh, hack/build-initramfs.sh)",
            path.display()
        );
    }
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let id = format!("clh-e2e-{}", std::process::id());

    let scenario = async {
        let started = Instant::now();
        let sandbox = Sandbox::start(SandboxConfig::new(&id, config.clone()), log)
            .await
            .expect("sandbox start");
        let ready = started.elapsed();
        let vmm = sandbox.vmm_pid().await.expect("VMM pid");
        let comm = std::fs::read_to_string(format!("/proc/{vmm}/comm")).unwrap();
        assert!(
            vmm_comm.starts_with(comm.trim()),
            "VMM is {comm:?}, expected {vmm_comm}"
        );
        let health = sandbox.agent().health().await.expect("agent health");
        eprintln!(
            "{kind:?}: VMM start → agent ready {ready:?}; agent {}",
            health.version
        );

        let output = echo_hello(&sandbox).await;
        assert_eq!(output, "hello\n");

        sandbox
            .agent()
            .remove_container("c1")
            .await
            .expect("remove container");
        sandbox.unmount_container("c1").expect("unmount rootfs");
        let pids = sandbox.pids();
        sandbox.stop().await.expect("sandbox stop");
        pids
    };
    let pids = tokio::time::timeout(LIMIT, scenario)
        .await
        .expect("scenario exceeded its time limit");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} of the sandbox still runs"
        );
    }
    assert!(
        !config.run_dir.join(&id).exists(),
        "sandbox directory left behind"
    );
}

/// Runs `echo hello` in a busybox container and returns its stdout.
async fn echo_hello(sandbox: &Sandbox) -> String {
    let agent = sandbox.agent();
    let busybox = rootfs::default_rootfs().expect("busybox rootfs");
    let root = sandbox
        .mount_rootfs("c1", &[Mount::host_dir(&busybox, true)])
        .expect("mount rootfs");
    let spec = container_spec(&["echo".into(), "hello".into()], false, "c1");
    agent
        .create_container(CreateContainerRequest {
            container_id: "c1".into(),
            spec_json: serde_json::to_vec(&spec).unwrap(),
            rootfs: Some(Rootfs {
                source: root,
                guest_overlay: true,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .await
        .expect("create container");
    let mut stdout = agent
        .open_stream(StreamKind::Stdout, "c1", "")
        .await
        .expect("stdout stream");
    agent.start_process("c1", "").await.expect("start");
    let mut out = String::new();
    stdout.read_to_string(&mut out).await.expect("read stdout");
    let exit = agent.wait_process("c1", "").await.expect("wait");
    assert_eq!(
        exit.exit_status, 0,
        "echo exited {}; output {out:?}",
        exit.exit_status
    );
    out
}
