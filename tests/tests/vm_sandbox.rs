//! Real VMs (QEMU, TCG here): the sandbox, the agent and container processes, end to end.
//! Each test boots its own VM in its own run directory and checks that nothing is left.
use std::time::{Duration, Instant};

use shoji::sandbox::Sandbox;
use shoji_agent_api::types::ExecProcessRequest;
use shoji_tests::vm::{create_container, remove_container, run_container, run_process, TestEnv};

fn exec_request(container_id: &str, exec_id: &str, args: &[&str]) -> ExecProcessRequest {
    let process = serde_json::json!({
        "terminal": false,
        "user": { "uid": 0, "gid": 0 },
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
    });
    ExecProcessRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&process).unwrap(),
        stdin: true,
        ..Default::default()
    }
}

async fn finish(env: TestEnv, sandbox: Sandbox) {
    sandbox.stop().await.expect("sandbox stop");
    // Stop is idempotent.
    sandbox.stop().await.expect("second stop");
    env.assert_no_leak().await;
}

#[tokio::test]
async fn agent_health_and_guest_details() {
    let env = TestEnv::new("health").await;
    let sandbox = env.start("health").await;
    // Only the host's root reaches the agent's socket, the console and the state.
    let mode = std::fs::metadata(sandbox.dir()).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
    let health = sandbox.agent().health().await.unwrap();
    assert!(!health.version.is_empty());
    let d = sandbox.agent().guest_details().await.unwrap();
    assert!(d.kernel_release.starts_with("6."), "{}", d.kernel_release);
    assert_eq!(d.cpus, 1);
    assert!(
        d.mem_total_bytes > 200 << 20 && d.mem_total_bytes <= 256 << 20,
        "{}",
        d.mem_total_bytes
    );
    assert!(d.mem_used_bytes > 0 && d.mem_used_bytes < d.mem_total_bytes);
    assert!(d.agent_rss_bytes > 0);
    assert_eq!(d.hostname, "health");
    let want = shoji_tests::backend::vm_processes();
    assert!(
        sandbox.pids().len() >= want.len(),
        "{want:?}: {:?}",
        sandbox.pids()
    );
    finish(env, sandbox).await;
}

#[tokio::test]
async fn stdout_stderr_apart_and_exit_code() {
    let env = TestEnv::new("stdio").await;
    let sandbox = env.start("stdio").await;
    let out = run_container(
        &sandbox,
        "c1",
        &["sh", "-c", "echo hello; echo oops >&2; exit 7"],
        b"",
        false,
    )
    .await;
    assert_eq!(out.stdout(), "hello\n");
    assert_eq!(out.stderr(), "oops\n");
    assert_eq!(out.status, 7);
    finish(env, sandbox).await;
}

#[tokio::test]
async fn stdin_is_piped_and_eof_ends_cat() {
    let env = TestEnv::new("stdin").await;
    let sandbox = env.start("stdin").await;
    let input: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = run_container(&sandbox, "c1", &["cat"], &input, false).await;
    assert_eq!(out.status, 0);
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat returned different bytes");
    finish(env, sandbox).await;
}

#[tokio::test]
async fn tty_process_sees_a_terminal() {
    let env = TestEnv::new("tty").await;
    let sandbox = env.start("tty").await;
    let out = run_container(
        &sandbox,
        "c1",
        &["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty"],
        b"",
        true,
    )
    .await;
    assert_eq!(out.status, 0, "{}", out.stdout());
    assert!(out.stdout().contains("is-a-tty"), "{:?}", out.stdout());
    finish(env, sandbox).await;
}

#[tokio::test]
async fn signals_terminate_with_128_plus_signal() {
    let env = TestEnv::new("signals").await;
    let sandbox = env.start("signals").await;
    let agent = sandbox.agent();
    // A container's PID 1 ignores signals it has no handler for, so SIGTERM goes to an exec'd
    // `sleep` (not PID 1), and SIGKILL (which PID 1 cannot ignore from outside) to the init.
    create_container(&sandbox, "c1", &["sleep", "1000"], false)
        .await
        .unwrap();
    agent.start_process("c1", "").await.unwrap();
    agent
        .exec_process(exec_request("c1", "e1", &["sleep", "100"]))
        .await
        .unwrap();
    agent.start_process("c1", "e1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent
        .signal_process("c1", "e1", libc::SIGTERM as u32, false)
        .await
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), agent.wait_process("c1", "e1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.exit_status, 143);
    agent
        .signal_process("c1", "", libc::SIGKILL as u32, false)
        .await
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), agent.wait_process("c1", ""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.exit_status, 137);
    remove_container(&sandbox, "c1").await;
    finish(env, sandbox).await;
}

#[tokio::test]
async fn exec_of_a_missing_binary_fails_fast_and_clearly() {
    let env = TestEnv::new("missingbin").await;
    let sandbox = env.start("missingbin").await;
    let started = Instant::now();
    let err = create_container(&sandbox, "c1", &["/no/such/binary"], false)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    // The failed container is gone: the same id can be used again.
    sandbox.agent().remove_container("c1").await.unwrap();
    let out = run_container(&sandbox, "c1", &["true"], b"", false).await;
    assert_eq!(out.status, 0);
    finish(env, sandbox).await;
}

#[tokio::test]
async fn two_containers_in_one_vm() {
    let env = TestEnv::new("two").await;
    let sandbox = env.start("two").await;
    create_container(
        &sandbox,
        "c1",
        &["sh", "-c", "echo one; touch /only-in-c1"],
        false,
    )
    .await
    .unwrap();
    create_container(
        &sandbox,
        "c2",
        &["sh", "-c", "echo two; test ! -e /only-in-c1"],
        false,
    )
    .await
    .unwrap();
    let (a, b) = tokio::join!(
        run_process(&sandbox, "c1", "", b"", false),
        run_process(&sandbox, "c2", "", b"", false)
    );
    assert_eq!((a.stdout().as_str(), a.status), ("one\n", 0));
    // Each container writes into its own overlay: c2 does not see c1's file.
    assert_eq!((b.stdout().as_str(), b.status), ("two\n", 0));
    remove_container(&sandbox, "c1").await;
    remove_container(&sandbox, "c2").await;
    finish(env, sandbox).await;
}

#[tokio::test]
async fn bad_input_is_refused_and_the_agent_survives() {
    let env = TestEnv::new("badinput").await;
    let sandbox = env.start("badinput").await;
    let agent = sandbox.agent();

    // Garbage on the agent's ttrpc port.
    use tokio::io::AsyncWriteExt;
    let vsock = shoji::sandbox::agent_socket(sandbox.dir());
    let mut raw =
        shoji::agent_client::dial(&vsock, shoji_agent_api::AGENT_PORT, Duration::from_secs(10))
            .await
            .unwrap();
    raw.write_all(&[0xff; 4096]).await.unwrap();
    drop(raw);
    // Garbage on the stdio port.
    let mut raw =
        shoji::agent_client::dial(&vsock, shoji_agent_api::IO_PORT, Duration::from_secs(10))
            .await
            .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(raw);
    agent.health().await.expect("agent alive after garbage");

    // Unknown container id.
    let err = agent.start_process("nope", "").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let err = agent
        .signal_process("nope", "", 9, false)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    // A rootfs that does not exist in the guest.
    let spec = shoji::cli::run_spec::container_spec(&["true".to_string()], false, "x");
    let err = agent
        .create_container(shoji_agent_api::types::CreateContainerRequest {
            container_id: "norootfs".into(),
            spec_json: serde_json::to_vec(&spec).unwrap(),
            rootfs: Some(shoji_agent_api::types::Rootfs {
                source: "/run/shoji/shared/does-not-exist".into(),
                guest_overlay: true,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does-not-exist"), "{err}");

    // Not JSON at all.
    let err = agent
        .create_container(shoji_agent_api::types::CreateContainerRequest {
            container_id: "badjson".into(),
            spec_json: b"{not json".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, shoji::agent_client::AgentError::Rpc { .. }),
        "{err}"
    );

    // A 1 MiB argument list (64 arguments of 16 KiB; one string may not exceed 128 KiB in
    // exec): either runs or is refused with a clear error, never hangs.
    let chunk = "x".repeat(16 << 10);
    let mut args = vec!["sh", "-c", "echo $#", "sh"];
    args.extend(std::iter::repeat_n(chunk.as_str(), 64));
    let created = tokio::time::timeout(
        Duration::from_secs(60),
        create_container(&sandbox, "big", &args, false),
    )
    .await
    .expect("1 MiB args: no hang");
    match created {
        Ok(()) => {
            let out = run_process(&sandbox, "big", "", b"", false).await;
            assert_eq!(
                (out.stdout().trim(), out.status),
                ("64", 0),
                "{}",
                out.stderr()
            );
            remove_container(&sandbox, "big").await;
        }
        Err(e) => assert!(
            matches!(
                e,
                shoji::sandbox::SandboxError::Agent(shoji::agent_client::AgentError::Rpc { .. })
            ),
            "{e}"
        ),
    }
    agent.health().await.expect("agent alive after bad input");
    finish(env, sandbox).await;
}

/// A volume file the host rewrites in place (as a renewed token or a shared volume can change)
/// is read afresh at the guest's next open (close-to-open, as NFS), though the guest keeps
/// file data across opens (guest-kernel patch 0004).
#[tokio::test]
async fn volumes_reach_the_guest_read_only_holds_and_host_rewrites_show() {
    let env = TestEnv::new("volumes").await;
    let sandbox = env.start("volumes").await;
    let host = env.run_dir.join("volume-src");
    std::fs::create_dir_all(host.join("ro")).unwrap();
    std::fs::create_dir_all(host.join("rw")).unwrap();
    std::fs::write(host.join("ro/hello"), "from the host\n").unwrap();
    // virtiofsd exports a read-only view of the shared directory, from the sandbox's mount
    // namespace (the host's holds no mount of the sandbox): its root is that view.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host_mounts.contains(&sandbox.dir().display().to_string()));
    let state = shoji::sandbox::State::read(sandbox.dir()).unwrap();
    let virtiofsd = state.pids.iter().find(|p| p.name == "virtiofsd").unwrap();
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", virtiofsd.pid)).unwrap();
    let view = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("virtiofsd has no root: {mountinfo}"));
    assert!(
        view.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{view}"
    );
    // Mounted under the shared directory after virtiofsd started: must still propagate.
    let mut spec = shoji::cli::run_spec::container_spec(
        &[
            "sh".to_string(),
            "-c".into(),
            "cat /ro/hello; touch /ro/x 2>/dev/null && echo ro-writable; echo written > /rw/out; \
             cat /ro/hello >/dev/null; echo > /rw/ready; \
             i=0; while [ ! -e /ro/changed ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
             cat /ro/hello"
                .into(),
        ],
        false,
        "c1",
    );
    let mut mounts = spec.mounts().clone().unwrap();
    for (src, dst, opts) in [
        ("ro", "/ro", ["rbind", "ro"]),
        ("rw", "/rw", ["rbind", "rw"]),
    ] {
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(dst)
                .typ("bind")
                .source(host.join(src))
                .options(opts.map(String::from).to_vec())
                .build()
                .unwrap(),
        );
    }
    spec.set_mounts(Some(mounts));
    sandbox
        .create_container(shoji::sandbox::ContainerRequest {
            id: "c1".into(),
            rootfs: vec![shoji::sandbox::Mount::host_dir(
                &shoji_tests::vm::busybox_rootfs(),
                true,
            )],
            spec,
            stdin: true,
            guest_overlay: true,
        })
        .await
        .unwrap();
    // Once the container has read the file (twice: its data is cached), rewrite it in place,
    // same size, and say so.
    let rewrite = {
        let host = host.clone();
        tokio::spawn(async move {
            for _ in 0..600 {
                if host.join("rw/ready").exists() {
                    std::fs::write(host.join("ro/hello"), "from the HOST\n").unwrap();
                    std::fs::write(host.join("ro/changed"), "").unwrap();
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        })
    };
    let out = run_process(&sandbox, "c1", "", b"", false).await;
    assert!(
        rewrite.await.unwrap(),
        "the container never read the volume"
    );
    assert_eq!(
        out.stdout(),
        "from the host\nfrom the HOST\n",
        "stderr: {}",
        out.stderr()
    );
    assert_eq!(out.status, 0);
    assert_eq!(
        std::fs::read_to_string(host.join("rw/out")).unwrap(),
        "written\n"
    );
    assert!(!host.join("ro/x").exists());
    remove_container(&sandbox, "c1").await;
    std::fs::remove_dir_all(&host).unwrap();
    finish(env, sandbox).await;
}

#[tokio::test]
async fn vmm_death_is_reported_and_stop_still_cleans_up() {
    let env = TestEnv::new("vmmdeath").await;
    let sandbox = env.start("vmmdeath").await;
    let pid = sandbox.vmm_pid();
    // SAFETY: kill(2) on the VMM this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let exit = tokio::time::timeout(Duration::from_secs(10), sandbox.wait_exit())
        .await
        .expect("exit noticed");
    assert_eq!(exit.status, Some(137), "{exit:?}");
    assert!(!exit.reason.is_empty());
    // The agent is gone with it: calls fail instead of hanging.
    let err = tokio::time::timeout(Duration::from_secs(40), sandbox.agent().health())
        .await
        .expect("no hang");
    assert!(err.is_err());
    finish(env, sandbox).await;
}

/// A CreateContainer whose caller gave up (its deadline passed while the guest was still
/// creating) still completes in the guest, and the RemoveContainer that follows waits for it
/// and removes it whole: the id is free again, nothing of it is left in the guest.
#[tokio::test]
async fn a_create_cut_off_by_its_deadline_is_removed_whole() {
    use shoji::agent_client::{AgentClient, AgentError};
    use shoji_agent_api::types::{CreateContainerRequest, Rootfs};
    let env = TestEnv::new("cutoff").await;
    let sandbox = env.start("cutoff").await;
    // A container whose rootfs mount serves the cut-off one as its lower layer.
    create_container(&sandbox, "base", &["true"], false)
        .await
        .unwrap();
    let impatient = AgentClient::connect(
        &shoji::sandbox::agent_socket(sandbox.dir()),
        Duration::from_millis(50),
    )
    .await
    .unwrap();
    let mut spec = shoji::cli::run_spec::container_spec(&["true".to_string()], false, "x");
    // Enough mounts that the create outlasts the impatient deadline (100 ms on the wire):
    // ~1.2 ms each under TCG, far less on KVM.
    let emulated = shoji_tests::backend::hypervisor() == shoji::hypervisor::HypervisorKind::Qemu
        && shoji::kvm::qemu_accel(shoji::config::AccelChoice::Auto)
            .await
            .0
            == shoji::hypervisor::Accel::Tcg;
    let slow_mounts = if emulated { 200 } else { 3000 };
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.extend((0..slow_mounts).map(|i| {
        oci_spec::runtime::MountBuilder::default()
            .destination(format!("/slow/{i}"))
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec!["size=4k".to_string()])
            .build()
            .unwrap()
    }));
    spec.set_mounts(Some(mounts));
    let request = CreateContainerRequest {
        container_id: "cut".into(),
        spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: Some(Rootfs {
            source: "/run/shoji/shared/base/rootfs".into(),
            guest_overlay: true,
            ..Default::default()
        })
        .into(),
        stdin: true,
        ..Default::default()
    };
    let err = impatient
        .create_container(request.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
    // The removal waits for the create still running in the guest, then removes it.
    sandbox.agent().remove_container("cut").await.unwrap();
    let err = sandbox.agent().container_stats("cut").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    // The id is free: a new create of it works and runs.
    sandbox.agent().create_container(request).await.unwrap();
    let out = run_process(&sandbox, "cut", "", b"", false).await;
    assert_eq!(out.status, 0, "{}", out.stderr());
    sandbox.agent().remove_container("cut").await.unwrap();
    remove_container(&sandbox, "base").await;
    finish(env, sandbox).await;
}

/// Container `c1` running `sleep 1000`, for execs to run beside.
async fn start_sleeper(sandbox: &Sandbox) {
    create_container(sandbox, "c1", &["sleep", "1000"], false)
        .await
        .unwrap();
    sandbox.agent().start_process("c1", "").await.unwrap();
}

/// Kills container `c1`, removes it, then ends the sandbox (checking that nothing is left).
async fn finish_with_c1_killed(env: TestEnv, sandbox: Sandbox) {
    sandbox
        .agent()
        .signal_process("c1", "", libc::SIGKILL as u32, false)
        .await
        .unwrap();
    remove_container(&sandbox, "c1").await;
    finish(env, sandbox).await;
}

/// Runs `args` as exec `exec_id` in container `c1` without stdio; returns its exit status.
async fn exec_to_end(sandbox: &Sandbox, exec_id: &str, args: &[&str]) -> i32 {
    let agent = sandbox.agent();
    let request = ExecProcessRequest {
        stdin: false,
        ..exec_request("c1", exec_id, args)
    };
    agent.exec_process(request).await.unwrap();
    agent.start_process("c1", exec_id).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), agent.wait_process("c1", exec_id))
        .await
        .expect("exec ended")
        .unwrap();
    exit.exit_status
}

/// Host memory holding the guest's RAM: the resident part of the VMM's memfd mappings
/// (QEMU's memory backend, Cloud Hypervisor's `ch_ram`), in KiB.
fn guest_ram_resident_kib(vmm_pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{vmm_pid}/smaps")).unwrap();
    let (mut in_memfd, mut kib) = (false, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Rss:") if in_memfd => kib += words.next().unwrap().parse::<u64>().unwrap(),
            Some(first) if first.contains('-') && !first.ends_with(':') => {
                in_memfd = line.contains("/memfd:");
            }
            _ => {}
        }
    }
    assert!(kib > 0, "no resident memfd mapping in the VMM {vmm_pid}");
    kib
}

/// Memory the guest frees goes back to the host (free page reporting, on by default): a
/// 48 MiB file in the container's /dev/shm is guest RAM the VMM holds; once the file is
/// removed, the host gets at least half of it back (blocks the guest still shares with
/// other allocations stay).
#[tokio::test]
async fn memory_the_guest_frees_goes_back_to_the_host() {
    let env = TestEnv::new("freedmem").await;
    let sandbox = env.start("freedmem").await;
    start_sleeper(&sandbox).await;
    // The shim asks for 128 KiB blocks and up (the kernel's default is 2 MiB).
    let order = "test $(cat /sys/module/page_reporting/parameters/page_reporting_order) = 5";
    assert_eq!(
        exec_to_end(&sandbox, "order", &["sh", "-c", order]).await,
        0
    );
    let fill = "head -c 50331648 /dev/zero > /dev/shm/fill";
    assert_eq!(exec_to_end(&sandbox, "fill", &["sh", "-c", fill]).await, 0);
    let filled = guest_ram_resident_kib(sandbox.vmm_pid());
    assert_eq!(
        exec_to_end(&sandbox, "rm", &["rm", "/dev/shm/fill"]).await,
        0
    );
    // The guest reports free blocks after ~2 s; TCG and a busy host stretch that.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = filled;
    while filled - now.min(filled) < 24 << 10 {
        assert!(
            Instant::now() < deadline,
            "guest RAM on the host: {filled} KiB with the file, still {now} KiB without it"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = guest_ram_resident_kib(sandbox.vmm_pid());
    }
    finish_with_c1_killed(env, sandbox).await;
}

/// The guest kernel does not spend 100 ms calibrating the local APIC timer: under QEMU it is
/// told the timer's rate (`lapic_bus_hz`, a guest-kernel patch); Cloud Hypervisor's guests
/// have the TSC deadline timer, which needs no calibration. And a process moved into a
/// cgroup (each create and exec) does not wait for an RCU grace period: the cgroup hierarchy,
/// as a container sees it too, is mounted `favordynmods`.
#[tokio::test]
async fn the_guest_kernel_skips_its_timer_calibration_and_cgroup_move_waits() {
    let env = TestEnv::new("lapic").await;
    let mut cfg = env.sandbox_config("lapic");
    cfg.kernel_args.push("apic=verbose".into());
    let sandbox = Sandbox::start(cfg, env.log.clone())
        .await
        .expect("sandbox start");
    start_sleeper(&sandbox).await;
    let mut check = "! dmesg | grep -q 'calibrating APIC timer' \
        && grep -q ' /sys/fs/cgroup cgroup2 .*favordynmods' /proc/mounts"
        .to_string();
    if shoji_tests::backend::hypervisor() == shoji::hypervisor::HypervisorKind::Qemu {
        check += " && dmesg | grep -q 'lapic timer already calibrated 10000000'";
    }
    assert_eq!(
        exec_to_end(&sandbox, "dmesg", &["sh", "-c", &check]).await,
        0
    );
    finish_with_c1_killed(env, sandbox).await;
}
