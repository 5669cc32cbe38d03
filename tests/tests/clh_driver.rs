//! The Cloud Hypervisor driver against the fake Cloud Hypervisor (`fake-cloud-hypervisor`,
//! see tests/src/fake_clh/), with a real virtiofsd and real tap devices in a network
//! namespace created by the test: the boot sequence and its bodies, resize, stop, bad specs,
//! a failed boot, a VMM death after boot. The other fault cases are in clh_faults.rs.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use shoji::{
    daemon::DaemonError,
    hypervisor::{
        clh::{net_config, vm_config},
        Hypervisor, HypervisorError,
    },
};
use shoji_tests::fake_clh::{unix_ms, DriverEnv, Record};

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

async fn with_fake(fake_flags: &[&str]) -> DriverEnv {
    DriverEnv::new(Path::new(FAKE), fake_flags).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_sequence_bodies_tap_fds_resize_and_stop() {
    let env = with_fake(&[]).await.with_taps(&["ctap0", "ctap1"]);
    let spec = env.spec();
    let mut vm = env.driver();

    vm.prepare(&spec).await.unwrap();
    assert_eq!(vm.pid(), None, "prepare launches nothing");

    let t = Instant::now();
    vm.start().await.unwrap();
    eprintln!(
        "start (launch → vmm.ping → create → 2× add-net → boot → info) took {:?}",
        t.elapsed()
    );
    let pid = vm.pid().expect("VMM pid");
    assert!(
        spec.vsock.socket.exists(),
        "the hybrid vsock socket appears at boot"
    );

    let records = env.fake.records();
    let Record::Start {
        pid: fake_pid,
        argv,
        netns,
    } = &records[0]
    else {
        panic!("{records:?}")
    };
    assert_eq!(*fake_pid, pid, "the driver watches the VMM process itself");
    let sb = spec.dir.display();
    let flags: Vec<&str> = argv
        .iter()
        .map(String::as_str)
        .skip_while(|a| !a.starts_with("--api-socket"))
        .collect();
    assert_eq!(
        flags,
        [
            "--api-socket",
            &format!("path={sb}/vmm/clh-api.sock"),
            "--log-file",
            &format!("{sb}/clh.log"),
            "--event-monitor",
            &format!("path={sb}/clh-events.json"),
            "--seccomp",
            "true",
        ]
    );
    assert_eq!(
        *netns,
        env.netns.as_ref().unwrap().id(),
        "the VMM runs in the pod's network namespace"
    );

    let reqs = env.requests();
    let calls: Vec<(&str, Option<u16>)> = reqs.iter().map(|r| (r.0.as_str(), r.4)).collect();
    let first = calls.iter().position(|c| c.0 != "vmm.ping").unwrap();
    assert!(
        first >= 1 && calls[..first].iter().all(|c| c == &("vmm.ping", Some(200))),
        "{calls:?}"
    );
    assert_eq!(
        calls[first..],
        [
            ("vm.create", Some(204)),
            ("vm.add-net", Some(204)),
            ("vm.add-net", Some(204)),
            ("vm.boot", Some(204)),
            ("vm.info", Some(200)),
        ]
    );
    // vm.create carries the whole VM but the NICs.
    let create: Value = serde_json::from_str(&reqs[first].1).unwrap();
    assert_eq!(
        create,
        serde_json::to_value(vm_config(&spec, env.options().memory_hotplug_mib)).unwrap()
    );
    assert_eq!(create["memory"]["shared"], true);
    assert_eq!(create["console"]["mode"], "Off");
    assert_eq!(create["serial"]["file"], spec.console_log.to_str().unwrap());
    // One tap fd per vm.add-net, the right tap, in order.
    for (i, tap) in ["ctap0", "ctap1"].iter().enumerate() {
        let (_, body, fds, taps, _) = &reqs[first + 1 + i];
        assert_eq!(
            (*fds, taps.clone()),
            (1, vec![tap.to_string()]),
            "add-net #{i}"
        );
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            body,
            serde_json::to_value(net_config(&spec.nets[i], i)).unwrap()
        );
        assert_eq!(body["mac"], format!("02:00:00:00:00:0{i}"));
    }

    vm.resize(Some(2), Some(512)).await.unwrap();
    let resize = env.requests().pop().unwrap();
    assert_eq!((resize.0.as_str(), resize.4), ("vm.resize", Some(204)));
    assert_eq!(
        serde_json::from_str::<Value>(&resize.1).unwrap(),
        serde_json::json!({"desired_vcpus": 2, "desired_ram": 512u64 << 20})
    );
    let before = env.requests().len();
    let err = vm.resize(Some(3), None).await.unwrap_err().to_string();
    assert!(err.contains("3 vCPUs is outside 1..=2"), "{err}");
    let err = vm.resize(None, Some(300)).await.unwrap_err().to_string();
    assert!(err.contains("300 MiB is outside 512..="), "{err}");
    assert_eq!(
        env.requests().len(),
        before,
        "invalid resizes never reach the VMM"
    );

    let t = Instant::now();
    vm.stop(Duration::from_secs(5)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "graceful stop took {:?}",
        t.elapsed()
    );
    let tail: Vec<(String, Option<u16>)> = env
        .requests()
        .into_iter()
        .rev()
        .take(2)
        .map(|r| (r.0, r.4))
        .collect();
    assert_eq!(
        tail,
        [
            ("vmm.shutdown".to_string(), Some(200)),
            ("vm.shutdown".to_string(), Some(204))
        ]
    );
    let exit = vm.wait_exit().await;
    assert_eq!((exit.status, exit.reason.as_str()), (Some(0), "stopped"));
    assert_eq!(vm.pid(), None);
    env.assert_nothing_left().await;
    // Idempotent.
    vm.stop(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_boot_tears_down_the_vmm() {
    let env = with_fake(&[]).await.with_taps(&["ctap0"]);
    let spec = env.spec();
    let mut vm = env.driver();
    vm.prepare(&spec).await.unwrap();
    // The kernel goes away between prepare and boot: CH reports it at vm.boot.
    std::fs::remove_file(&spec.kernel).unwrap();
    let err = vm.start().await.unwrap_err();
    match &err {
        HypervisorError::Api { call, status, body } => {
            assert_eq!((call.as_str(), *status), ("vm.boot", 500));
            assert_eq!(
                body,
                "Error from API: The VM could not boot: Cannot open kernel file: No such file or directory (os error 2)"
            );
        }
        other => panic!("expected an API error, got {other}"),
    }
    assert_eq!(vm.pid(), None);
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_virtiofsd_is_caught_before_vm_boot() {
    // The fake waits the real 60 s for a vhost-user back-end: the driver must not get there.
    let env = with_fake(&[]).await;
    let spec = env.spec();
    let mut vm = env.driver();
    vm.prepare(&spec).await.unwrap();
    env.stop_virtiofsd().await;
    let t = Instant::now();
    let err = vm.start().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        matches!(
            &err,
            HypervisorError::Daemon(DaemonError::Died {
                what: "virtiofsd",
                ..
            })
        ),
        "{err}"
    );
    assert!(
        !env.fake.calls().iter().any(|c| c.0 == "vm.boot"),
        "vm.boot was sent"
    );
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_death_after_boot_is_reported_within_a_second() {
    let env = with_fake(&["--fake-die-after-boot-ms", "500"]).await;
    let mut vm = env.driver();
    vm.prepare(&env.spec()).await.unwrap();
    vm.start().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait_exit())
        .await
        .expect("VMM death not reported");
    let seen = unix_ms();
    let died = env
        .fake
        .records()
        .into_iter()
        .find_map(|r| match r {
            Record::Exit { unix_ms, .. } => Some(unix_ms),
            _ => None,
        })
        .expect("the fake recorded its exit");
    assert!(
        seen - died < 1000,
        "reported {} ms after the VMM died",
        seen - died
    );
    eprintln!(
        "VMM death reported {} ms after the VMM recorded its exit",
        seen - died
    );
    assert_eq!(exit.status, Some(1));
    assert!(
        exit.reason
            .contains("VCPU generated error: VcpuRun(Failed to run vcpu"),
        "{}",
        exit.reason
    );
    assert!(
        exit.reason
            .contains("last events: vm booted, vm shutdown, vm deleted, vmm shutdown"),
        "{}",
        exit.reason
    );
    // Many waiters, same answer.
    assert_eq!(vm.wait_exit().await, exit);
    assert_eq!(vm.pid(), None);
    vm.stop(Duration::from_secs(2)).await.unwrap();
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_vmm_that_does_not_shut_down() {
    let env = with_fake(&["--fake-hang", "vm.shutdown"]).await;
    let mut vm = env.driver();
    vm.prepare(&env.spec()).await.unwrap();
    vm.start().await.unwrap();
    let t = Instant::now();
    vm.stop(Duration::from_secs(1)).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    let exit = vm.wait_exit().await;
    assert_eq!(
        (exit.status, exit.reason.as_str()),
        (Some(128 + libc::SIGKILL), "stopped")
    );
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_failing_at_launch_is_reported_with_its_error() {
    let env = with_fake(&["--fake-no-such-flag", "x"]).await;
    let mut vm = env.driver();
    vm.prepare(&env.spec()).await.unwrap();
    let err = vm.start().await.unwrap_err();
    match &err {
        HypervisorError::Daemon(DaemonError::Died {
            what,
            status,
            detail,
        }) => {
            assert_eq!((*what, *status), ("cloud-hypervisor", Some(1)));
            assert_eq!(
                detail,
                "error: unexpected argument '--fake-no-such-flag' found"
            );
        }
        other => panic!("expected Died, got {other}"),
    }
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_rejected_with_what_is_wrong() {
    let env = with_fake(&[]).await.with_taps(&["ctap0"]);
    let mut vm = env.driver();

    let mut s = env.spec();
    s.initrd = env.path("missing.img");
    let err = vm.prepare(&s).await.unwrap_err().to_string();
    assert!(
        err.starts_with("guest initramfs not found at") && err.contains("missing.img"),
        "{err}"
    );

    let mut s = env.spec();
    s.vcpus = 3;
    let err = vm.prepare(&s).await.unwrap_err().to_string();
    assert!(err.contains("vcpus 3 / max_vcpus 2"), "{err}");

    let mut s = env.spec();
    s.nets[0].netns = Some("/run/netns/shoji-clh-none".into());
    let err = vm.prepare(&s).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "network namespace /run/netns/shoji-clh-none does not exist"
    );

    let err = vm.start().await.unwrap_err().to_string();
    assert!(err.contains("prepare() was not called"), "{err}");

    // A tap that is not in the namespace: named in the error, and nothing is left running.
    let mut s = env.spec();
    s.nets[0].tap = "nosuchtap".into();
    vm.prepare(&s).await.unwrap();
    let err = vm.start().await.unwrap_err().to_string();
    assert!(
        err.starts_with("opening the taps in /run/netns/shoji-clh-")
            && err.ends_with("tap nosuchtap: no such interface in this network namespace"),
        "{err}"
    );
    assert!(!env.fake.calls().iter().any(|c| c.0 == "vm.boot"));
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_driver_without_stop_leaves_nothing_running() {
    let env = with_fake(&[]).await;
    let mut vm = env.driver();
    vm.prepare(&env.spec()).await.unwrap();
    vm.start().await.unwrap();
    assert!(vm.pid().is_some());
    drop(vm);
    env.stop_virtiofsd().await;
    env.assert_no_process_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_runs_one_vm() {
    let env = with_fake(&[]).await;
    let mut vm = env.driver();
    vm.prepare(&env.spec()).await.unwrap();
    vm.start().await.unwrap();
    vm.stop(Duration::from_secs(2)).await.unwrap();
    assert_eq!(vm.wait_exit().await.reason, "stopped");
    let err = vm.prepare(&env.spec()).await.unwrap_err();
    assert!(
        matches!(
            err,
            HypervisorError::Invalid {
                call: "prepare",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("already ran a VM"), "{err}");
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_crash_during_boot_is_reported_with_its_panic() {
    let env = with_fake(&["--fake-crash", "vm.boot"]).await;
    let mut vm = env.driver();
    vm.prepare(&env.spec()).await.unwrap();
    let err = vm.start().await.unwrap_err();
    match &err {
        HypervisorError::Daemon(DaemonError::Died {
            what,
            status,
            detail,
        }) => {
            assert_eq!(
                (*what, *status),
                ("cloud-hypervisor", Some(128 + libc::SIGABRT))
            );
            assert!(
                detail.starts_with(
                    "thread 'vmm' panicked at vmm/src/lib.rs:1234:9: fake crash while handling vm.boot \
                     (the step that failed: cloud-hypervisor API vm.boot"
                ),
                "{detail}"
            );
        }
        other => panic!("expected Died, got {other}"),
    }
    env.assert_nothing_left().await;
}
