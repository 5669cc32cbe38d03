//! The Cloud Hypervisor driver's jail, on the fake Cloud Hypervisor (real CH needs real
//! KVM): the VMM runs as the sandbox's uid with no capabilities and no_new_privs, in the
//! pod's network namespace (where its taps are) and a mount namespace of its own that holds
//! the boot images and its own files, not the host's or the shim's. (The fake has no seccomp
//! filter of its own; real CH installs its own, `--seccomp true`.) Its own test binary: the
//! jailed fake learns its record file from the process's environment.
use std::{path::Path, time::Duration};

use shoji::{
    hypervisor::{vmm_dir, Hypervisor},
    jail::Identity,
};
use shoji_tests::fake_clh::DriverEnv;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

fn status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vmm_runs_as_the_sandbox_uid_in_its_own_namespaces() {
    let id = Identity {
        uid: 0x7e00_fff0,
        gid: 0x7e00_fff0,
        kvm_gid: None,
    };
    let env = DriverEnv::jailed(Path::new(FAKE), id)
        .await
        .with_taps(&["jtap0"]);
    let spec = env.spec();
    let mut vm = env.driver();
    vm.prepare(&spec).await.unwrap();
    vm.start().await.unwrap();
    let pid = vm.pid().unwrap();

    let uid = id.uid.to_string();
    assert_eq!(status(pid, "Uid"), [uid.as_str(); 4].join("\t"));
    assert_eq!(status(pid, "Gid"), [uid.as_str(); 4].join("\t"));
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    let ns = |p: &str, kind: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).unwrap();
    assert_ne!(ns(&pid.to_string(), "mnt"), ns("self", "mnt"));
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    let vmm_net = ns(&pid.to_string(), "net");
    assert_ne!(
        vmm_net, host_net,
        "the VMM is in the host's network namespace"
    );
    let netns = env.netns.as_ref().unwrap();
    assert_eq!(
        std::fs::metadata(&netns.path)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
            .unwrap(),
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            })
            .unwrap(),
        "the VMM is not in the pod's network namespace"
    );

    // What it sees: the boot images, its console, its sockets; not the host's or the shim's.
    let root = Path::new("/proc").join(pid.to_string()).join("root");
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    assert!(inside(&spec.kernel).is_file());
    assert!(inside(&spec.console_log).is_file());
    assert!(inside(&vmm_dir(&spec.dir).join("clh-api.sock")).exists());
    for hidden in [
        Path::new("/etc/shadow"),
        Path::new("/root"),
        &env.path("shared"),
        &spec.dir.join("virtiofsd.log"),
    ] {
        assert!(
            !inside(hidden).exists(),
            "the VMM sees {}",
            hidden.display()
        );
    }
    assert!(!env.fake.records().is_empty(), "the fake recorded nothing");

    vm.stop(Duration::from_secs(5)).await.unwrap();
    env.assert_nothing_left().await;
}
