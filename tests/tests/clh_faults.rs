//! The Cloud Hypervisor path's share of the fault and hostile-input cases, against the fake
//! Cloud Hypervisor (tests/src/fake_clh/): the VMM killed after each boot step, each call
//! answered with an error in CH's format, each call hanging, a slow boot, and, through the
//! sandbox, a VMM death during boot, a guest that never announces its agent (its console
//! quoted) and a guest flooding its console (kept under its cap); and UpdateContainerResources
//! growing the VM with `vm.resize` (a real sandbox with a stand-in agent), a failed and a hung
//! resize included. Each case is bounded, names its cause and leaves nothing behind. The QEMU path's counterparts run real VMs
//! (vm_start_failures.rs, vm_sandbox.rs, shim_faults.rs).
use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use shoji::{
    daemon::DaemonError,
    hypervisor::{
        clh::{Clh, ClhOptions},
        Hypervisor, HypervisorError,
    },
    sandbox::{Sandbox, SandboxConfig, SandboxError, CONSOLE_MAX},
};
use shoji_tests::{
    fake_agent::FakeAgent,
    fake_clh::{raw_request, DriverEnv},
};

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

/// The driver's time limits in these tests: short, so that every hang is quick to see.
const API: Duration = Duration::from_secs(1);
const BOOT: Duration = Duration::from_secs(2);
const START: Duration = Duration::from_secs(2);

async fn with_fake(fake_flags: &[&str]) -> DriverEnv {
    DriverEnv::new(Path::new(FAKE), fake_flags)
        .await
        .with_taps(&["ftap0"])
}

/// A driver with the short limits.
fn driver(env: &DriverEnv) -> Clh {
    env.driver_with(ClhOptions {
        api_timeout: API,
        boot_timeout: BOOT,
        start_timeout: START,
        ..env.options()
    })
}

/// Starts a VM on `env`'s fake, which must fail; returns the error and how long it took,
/// after checking that the failed start left nothing and published its end.
async fn failed_start(env: &DriverEnv) -> (HypervisorError, Duration) {
    let mut vm = driver(env);
    vm.prepare(&env.spec()).await.unwrap();
    let t = Instant::now();
    let err = vm.start().await.expect_err("start must fail");
    let took = t.elapsed();
    let exit = tokio::time::timeout(Duration::from_secs(2), vm.wait_exit())
        .await
        .expect("the failed start published the VM's end");
    // The driver's own account, or (when the VMM died by itself) the VMM's death as its
    // exit watch saw it first: both name what ended the VM.
    assert!(
        exit.reason.starts_with("start failed: ")
            || exit.reason.starts_with("cloud-hypervisor exited"),
        "{}",
        exit.reason
    );
    assert_eq!(vm.pid(), None);
    env.assert_nothing_left().await;
    (err, took)
}

/// The calls the fake answered, in order.
fn calls(env: &DriverEnv) -> Vec<String> {
    env.fake.calls().into_iter().map(|c| c.0).collect()
}

/// The VMM killed (SIGKILL, as by the OOM killer) right after it answered `after`: the next
/// call (`next`) fails, and the start reports the VMM's death, naming that step.
async fn vmm_killed_after(after: &str, next: &str) {
    let env = with_fake(&["--fake-die-after", after]).await;
    let (err, took) = failed_start(&env).await;
    assert!(took < Duration::from_secs(3), "took {took:?}");
    match &err {
        HypervisorError::Daemon(DaemonError::Died {
            what: "cloud-hypervisor",
            status,
            detail,
        }) => {
            assert_eq!(*status, Some(128 + libc::SIGKILL), "{err}");
            assert!(
                detail.starts_with("no error output (the step that failed: cloud-hypervisor API ")
                    && detail.contains(next),
                "{detail}"
            );
        }
        other => panic!("expected the VMM's death, got {other}"),
    }
    assert_eq!(calls(&env).last().map(String::as_str), Some(after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_killed_after_launch() {
    vmm_killed_after("vmm.ping", "vm.create").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_killed_after_vm_create() {
    vmm_killed_after("vm.create", "vm.add-net").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_killed_after_vm_add_net() {
    vmm_killed_after("vm.add-net", "vm.boot").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_killed_after_vm_boot() {
    vmm_killed_after("vm.boot", "vm.info").await
}

/// Each call answered with an error in CH's format (status and a JSON array of strings,
/// outer to inner): the start fails with that status and the chain joined, at once, and
/// nothing after the failed call is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_reported_with_chs_status_and_error_chain() {
    for (call, status, chain) in [
        ("vm.create", 500, "The VM could not be created: rejected by --fake-reject"),
        (
            "vm.add-net",
            400,
            "The network device could not be added to the VM: Failed to validate config: rejected by --fake-reject",
        ),
        (
            "vm.boot",
            400,
            "The VM could not boot: Failed to validate config: rejected by --fake-reject",
        ),
        ("vm.info", 500, "The VM info is not available: rejected by --fake-reject"),
    ] {
        let env = with_fake(&["--fake-reject", &format!("{call}={status}")]).await;
        let (err, took) = failed_start(&env).await;
        assert!(took < Duration::from_secs(3), "{call}: took {took:?}");
        match &err {
            HypervisorError::Api {
                call: c,
                status: s,
                body,
            } => assert_eq!(
                (c.as_str(), *s, body.as_str()),
                (call, status, format!("Error from API: {chain}").as_str())
            ),
            other => panic!("{call}: expected an API error, got {other}"),
        }
        assert_eq!(calls(&env).last().map(String::as_str), Some(call));
    }
}

/// A VMM whose API answers, but only with errors, is given `start_timeout`, and the error is
/// quoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_that_only_answers_errors_times_out_with_its_error() {
    let env = with_fake(&["--fake-reject", "vmm.ping=500"]).await;
    let (err, took) = failed_start(&env).await;
    assert!(took >= START && took < START * 2, "took {took:?}");
    match &err {
        HypervisorError::Timeout {
            what,
            timeout,
            detail,
        } => {
            assert_eq!(
                (what.as_str(), *timeout),
                ("cloud-hypervisor API (vmm.ping)", START)
            );
            assert_eq!(
                detail.as_deref(),
                Some("vmm.ping failed with 500: Error from API: The request failed: rejected by --fake-reject")
            );
        }
        other => panic!("expected a timeout, got {other}"),
    }
}

/// CH's own 5xx, unprovoked: a virtio-fs socket that exists but that nobody serves makes
/// `vm.boot` wait for its vhost-user connection (60 s in CH, shortened here) and fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtiofs_socket_nobody_serves_fails_vm_boot_with_chs_error() {
    let env = with_fake(&["--fake-fs-wait-ms", "300"]).await;
    let mut spec = env.spec();
    let share = spec.share.as_mut().unwrap();
    share.socket = env.path("sandbox/stale-virtiofsd.sock");
    drop(std::os::unix::net::UnixListener::bind(&share.socket).unwrap());
    let mut vm = driver(&env);
    vm.prepare(&spec).await.unwrap();
    let err = vm.start().await.expect_err("start must fail");
    match &err {
        HypervisorError::Api { call, status, body } => assert_eq!(
            (call.as_str(), *status, body.as_str()),
            (
                "vm.boot",
                500,
                "Error from API: The VM could not boot: Error from device manager: \
                 Cannot create virtio-fs device: Timed out waiting for vhost-user connection"
            )
        ),
        other => panic!("expected an API error, got {other}"),
    }
    env.assert_nothing_left().await;
}

/// Each call hanging (a stuck VMM thread holds the whole API): the start fails when that
/// call's limit runs out, naming the call and the limit, and the stuck VMM is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_api_call_times_out_at_each_step() {
    for (call, limit) in [
        ("vmm.ping", START),
        ("vm.create", API),
        ("vm.add-net", API),
        ("vm.boot", BOOT),
        ("vm.info", API),
    ] {
        let env = with_fake(&["--fake-hang", call]).await;
        let (err, took) = failed_start(&env).await;
        assert!(
            took >= limit && took < limit + Duration::from_secs(2),
            "{call}: took {took:?}"
        );
        match &err {
            HypervisorError::Timeout { what, timeout, .. } => {
                assert!(what.contains(call), "{err}");
                assert_eq!(*timeout, limit, "{err}");
            }
            other => panic!("{call}: expected a timeout, got {other}"),
        }
        assert_eq!(
            env.fake.calls().last().unwrap(),
            &(call.to_string(), None),
            "{call}: the hung call is the last one"
        );
    }
}

/// A slow `vm.boot` (CH creates every device in it) is waited for within `boot_timeout`;
/// beyond it the start fails and the VMM, still booting, is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_boot_is_waited_for_within_its_limit() {
    let env = with_fake(&["--fake-boot-ms", "1200"]).await;
    let mut vm = driver(&env);
    vm.prepare(&env.spec()).await.unwrap();
    let t = Instant::now();
    vm.start().await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    vm.stop(Duration::from_secs(2)).await.unwrap();
    env.assert_nothing_left().await;

    let env = with_fake(&["--fake-boot-ms", "5000"]).await;
    let (err, took) = failed_start(&env).await;
    assert!(took < BOOT + Duration::from_secs(2), "took {took:?}");
    assert!(
        matches!(&err, HypervisorError::Timeout { what, timeout, .. }
            if what.contains("vm.boot") && *timeout == BOOT),
        "{err}"
    );
}

/// Starts a sandbox on the fake (with a virtiofsd of its own; no agent ever answers), which
/// must fail; `during` looks at its directory while it starts. Then nothing may be left.
async fn failed_sandbox(
    env: &DriverEnv,
    agent_ready: Duration,
    mut during: impl FnMut(&Path),
) -> SandboxError {
    env.stop_virtiofsd().await;
    let mut config = env.sandbox_config();
    config.timeouts.agent_ready = agent_ready;
    let cfg = SandboxConfig::new("clhsb", config);
    let dir = cfg.dir();
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let start = tokio::spawn(Sandbox::start(cfg, log));
    while !start.is_finished() {
        during(&dir);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = start.await.unwrap().err().expect("start must fail");
    env.assert_no_process_left().await;
    let left = env.run_dir_entries();
    assert!(left.is_empty(), "run dir entries left: {left:?}");
    err
}

/// The sandbox on the CH driver: a VMM that dies while the guest boots is reported at once
/// with CH's error (not after the agent timeout), and the sandbox leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_reports_a_vmm_death_during_boot_with_its_error() {
    let env = with_fake(&["--fake-die-after-boot-ms", "300"]).await;
    let t = Instant::now();
    let err = failed_sandbox(&env, Duration::from_secs(30), |_| {}).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "reported after {:?}",
        t.elapsed()
    );
    match &err {
        SandboxError::VmExited { exit, .. } => {
            assert_eq!(exit.status, Some(1));
            assert!(
                exit.reason.contains("VCPU generated error"),
                "{}",
                exit.reason
            );
        }
        other => panic!("expected VmExited, got {other}"),
    }
    assert!(
        calls(&env).ends_with(&["vm.create".into(), "vm.boot".into(), "vm.info".into()]),
        "{:?}",
        calls(&env)
    );
}

/// A guest that boots but never announces an agent: the start fails when `agent_ready` runs
/// out, quoting the guest's console (CH's serial port file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_without_agent_fails_in_bounded_time_quoting_its_console() {
    let env = with_fake(&[
        "--fake-console",
        "Linux version 6.1.0 (fake guest)",
        "--fake-console",
        "not an agent",
    ])
    .await;
    let timeout = Duration::from_secs(3);
    let t = Instant::now();
    let err = failed_sandbox(&env, timeout, |_| {}).await;
    assert!(
        t.elapsed() < timeout + Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let SandboxError::NotReady { console, .. } = &err else {
        panic!("wrong error: {err}")
    };
    assert_eq!(
        console,
        "  Linux version 6.1.0 (fake guest)\n  not an agent"
    );
}

/// A guest flooding its serial port: CH writes the file at its own offset (it is not opened
/// for appending), so after each rotation the file is sparse; what it holds on disk stays
/// under the cap, the last part moves to console.log.1, and the quoted tail is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_console_stays_under_its_cap() {
    let env = with_fake(&["--fake-console-flood"]).await;
    let (mut largest, mut kept) = (0u64, String::new());
    let err = failed_sandbox(&env, Duration::from_secs(3), |dir| {
        let console = dir.join("console.log");
        largest = largest.max(std::fs::metadata(&console).map_or(0, |m| m.blocks() * 512));
        if let Ok(text) = std::fs::read_to_string(dir.join("console.log.1")) {
            kept = text;
        }
    })
    .await;
    let SandboxError::NotReady { console, .. } = &err else {
        panic!("wrong error: {err}")
    };
    assert!(
        !kept.is_empty(),
        "the console was never rotated (largest {largest} bytes)"
    );
    assert!(
        largest <= CONSOLE_MAX + CONSOLE_MAX / 2,
        "console.log held {largest} bytes on disk (cap {CONSOLE_MAX})"
    );
    // What is kept is the guest's output, not the hole left in front of it.
    assert!(
        kept.contains("a guest flooding its console") && !kept.contains('\0'),
        "{:?}",
        &kept[kept.len().saturating_sub(200)..]
    );
    // The quoted tail: whole lines of the guest's output (the last may be cut by a write
    // in progress).
    let lines: Vec<&str> = console.lines().collect();
    assert!(
        lines.len() > 1
            && !console.contains('\0')
            && lines[..lines.len() - 1]
                .iter()
                .all(|l| l.contains("a guest flooding its console")),
        "{console:?}"
    );
}

// UpdateContainerResources on Cloud Hypervisor: containerd's Update reaches
// `Pod::update` → `Sandbox::update_container` (sandbox/sizing.rs) → `driver.resize` →
// `vm.resize`, then the agent's UpdateContainer. Here a real `Sandbox` runs on the fake VMM,
// with a stand-in agent behind the fake's hybrid vsock (tests/src/fake_agent.rs).

const MIB: i64 = 1 << 20;

/// LinuxResources JSON: `cpus` whole CPUs (quota/period) and `memory_mib`.
fn resources(cpus: i64, memory_mib: i64) -> Value {
    json!({"cpu": {"quota": cpus * 100_000, "period": 100_000},
           "memory": {"limit": memory_mib * MIB}})
}

/// The shim's log lines (slog JSON), kept for the test to read.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn logger(&self) -> slog::Logger {
        use slog::Drain;
        let drain = slog_json::Json::default(self.clone()).fuse();
        slog::Logger::root(std::sync::Mutex::new(drain).fuse(), slog::o!())
    }

    /// The lines whose `msg` is `msg`.
    fn find(&self, msg: &str) -> Vec<Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["msg"] == msg)
            .collect()
    }
}

/// A sandbox on the fake (1 vCPU, 256 MiB; at most 4 vCPUs and 2048 MiB; 64 MiB of guest
/// overhead) whose guest runs `agent`; its log goes to `logs`.
async fn sandbox_logged(env: &DriverEnv, logs: &Logs) -> Sandbox {
    env.stop_virtiofsd().await;
    let mut config = env.sandbox_config();
    config.timeouts.agent_ready = Duration::from_secs(10);
    (config.default_vcpus, config.default_memory_mib) = (1, 256);
    (config.max_vcpus, config.max_memory_mib) = (4, 2048);
    config.memory_overhead_mib = 64;
    Sandbox::start(SandboxConfig::new("clhresize", config), logs.logger())
        .await
        .expect("the sandbox boots on the fake with the stand-in agent")
}

async fn sandbox_with_agent(env: &DriverEnv) -> Sandbox {
    sandbox_logged(env, &Logs::default()).await
}

/// The fake's env with a stand-in agent in its guest (`extra`: more `--fake-*` flags).
async fn with_agent(extra: &[&str]) -> (DriverEnv, FakeAgent, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("shoji-agent-")
        .tempdir()
        .unwrap();
    let agent = FakeAgent::start(&dir.path().join("agent.sock")).await;
    let socket = agent.socket.display().to_string();
    let mut flags = vec!["--fake-agent", socket.as_str()];
    flags.extend_from_slice(extra);
    (with_fake(&flags).await, agent, dir)
}

/// The VM as the fake VMM has it now (`vm.info`).
fn vm_info(sandbox: &Sandbox) -> Value {
    let mut api = std::os::unix::net::UnixStream::connect(sandbox.dir().join("vmm/clh-api.sock"))
        .expect("the VMM's API socket");
    let info = raw_request(&mut api, "GET", "vm.info", "").unwrap();
    assert_eq!(info.status, 200, "{}", info.body);
    serde_json::from_str(&info.body).unwrap()
}

fn resizes(env: &DriverEnv) -> Vec<(Value, Option<u16>)> {
    env.requests()
        .into_iter()
        .filter(|r| r.0 == "vm.resize")
        .map(|r| (serde_json::from_str(&r.1).unwrap(), r.4))
        .collect()
}

async fn update(sandbox: &Sandbox, id: &str, r: &Value) -> Result<(), SandboxError> {
    sandbox
        .update_container(id, serde_json::to_vec(r).unwrap())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_container_resources_grows_the_vm_through_vm_resize() {
    let (env, agent, _dir) = with_agent(&[]).await;
    let logs = Logs::default();
    let sandbox = sandbox_logged(&env, &logs).await;
    // The VMM and why, logged at the VM's start.
    let chosen = logs.find("hypervisor chosen");
    assert_eq!(chosen.len(), 1, "{chosen:?}");
    assert_eq!(
        (&chosen[0]["hypervisor"], &chosen[0]["why"]),
        (&json!("clh"), &json!("configured (hypervisor = \"clh\")"))
    );
    let info = vm_info(&sandbox);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1);
    assert_eq!(info["config"]["memory"]["size"], 256 * MIB);

    // 2 CPUs and 512 MiB (+ 64 MiB overhead) do not fit 1 vCPU / 256 MiB: the VM grows
    // first, its memory by whole 128 MiB hot-plug blocks (256 + 384 = 640 ≥ 576 MiB).
    let big = resources(2, 512);
    update(&sandbox, "app", &big).await.unwrap();
    let grown = logs.find("VM grown for the pod's containers");
    assert_eq!(
        (&grown[0]["vcpus"], &grown[0]["memory_mib"]),
        (&json!(2), &json!(640))
    );
    assert_eq!(
        resizes(&env),
        vec![(
            json!({"desired_vcpus": 2, "desired_ram": 640 * MIB}),
            Some(204)
        )]
    );
    let info = vm_info(&sandbox);
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(info["config"]["memory"]["hotplugged_size"], 384 * MIB);
    assert_eq!(agent.updates(), vec![("app".to_string(), big.clone())]);
    // The ledger has the new size: what `shoji ps` and the metrics show.
    let state: Value =
        serde_json::from_slice(&std::fs::read(sandbox.dir().join("state.json")).unwrap()).unwrap();
    assert_eq!(
        (&state["info"]["vcpus"], &state["info"]["memory_mib"]),
        (&json!(2), &json!(640))
    );

    // Smaller limits fit: the agent gets them, the VM is not asked again (it never shrinks).
    let small = resources(1, 128);
    update(&sandbox, "app", &small).await.unwrap();
    assert_eq!(resizes(&env).len(), 1);
    assert_eq!(agent.updates().len(), 2);
    assert_eq!(agent.updates()[1], ("app".to_string(), small));

    // Beyond max_memory_mib: refused before anything changed, naming the limit.
    let err = update(&sandbox, "app", &resources(1, 4096))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_memory_mib = 2048"), "{err}");
    assert_eq!((resizes(&env).len(), agent.updates().len()), (1, 2));

    sandbox.stop().await.unwrap();
    env.assert_no_process_left().await;
    assert!(
        env.run_dir_entries().is_empty(),
        "{:?}",
        env.run_dir_entries()
    );
}

/// `vm.resize` answered with CH's error, or not answered at all: the update fails with that
/// error within the API limit, the agent is not asked, and the next update that fits works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_hung_vm_resize_fails_the_update_and_changes_nothing() {
    for (flags, want) in [
        (
            ["--fake-reject", "vm.resize=500"],
            "vm.resize failed with 500: Error from API: The VM could not be resized: rejected by --fake-reject",
        ),
        (["--fake-hang", "vm.resize"], "vm.resize"),
    ] {
        let (env, agent, _dir) = with_agent(&flags).await;
        let sandbox = sandbox_with_agent(&env).await;
        let t = Instant::now();
        let err = update(&sandbox, "app", &resources(2, 512))
            .await
            .unwrap_err();
        let took = t.elapsed();
        // The sandbox's API limit (ClhOptions::new: 5 s).
        assert!(took < Duration::from_secs(7), "{flags:?}: took {took:?}");
        match &err {
            SandboxError::Hypervisor(HypervisorError::Timeout { what, .. }) if flags[0] == "--fake-hang" => {
                assert!(what.contains(want), "{err}")
            }
            SandboxError::Hypervisor(e @ HypervisorError::Api { .. }) => {
                assert_eq!(e.to_string(), want)
            }
            other => panic!("{flags:?}: unexpected error {other}"),
        }
        assert!(agent.updates().is_empty(), "{:?}", agent.updates());
        if flags[0] == "--fake-reject" {
            let info = vm_info(&sandbox);
            assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1);
            // The VM is as it was: an update that fits goes through.
            update(&sandbox, "app", &resources(1, 128)).await.unwrap();
            assert_eq!(agent.updates().len(), 1);
        }
        sandbox.stop().await.unwrap();
        env.assert_no_process_left().await;
    }
}
