//! containerd-shim-shoji-v2 driven through containerd's CRI socket (what kubelet does): every pod is its own
//! microVM. Each test starts its own containerd with a CNI bridge on 10.233.<n>.0/24 (no masquerade; traffic
//! only to pod IPs the test created) and ends with the leak check of `Env::finish` (no shim, VMM, virtiofsd,
//! tap, mount, netns or directory left).
use std::time::Duration;

use shoji_tests::{
    bins,
    containerd::Version,
    scenario::{self, Env, Runtime},
};

/// Upper bound for one test, so a hang fails instead of stalling CI.
const TEST_LIMIT: Duration = Duration::from_secs(300);

type Result<T = ()> = scenario::Result<T>;

/// A shoji runtime with its own run directory and config file.
struct Shoji {
    runtime: Runtime,
    _dir: tempfile::TempDir,
}

fn shoji() -> Shoji {
    // Short: sandbox socket paths live under it and Unix socket paths are limited to 108 bytes.
    let dir = tempfile::Builder::new()
        .prefix("shj")
        .tempdir_in("/tmp")
        .unwrap();
    let run_dir = dir.path().join("run");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "hypervisor = \"qemu\"\n").unwrap();
    let shim_dir = bins::binary("containerd-shim-shoji-v2")
        .parent()
        .unwrap()
        .to_path_buf();
    Shoji {
        runtime: Runtime::shoji(shim_dir, Some(config), run_dir),
        _dir: dir,
    }
}

/// Runs `scenario` against a fresh containerd `version` with shoji and test network `net`, then the leak check.
async fn with_pods(version: Version, net: u8, scenario: impl AsyncFnOnce(&Env) -> Result) {
    let run = async {
        let shoji = shoji();
        let env = Env::start(version, &shoji.runtime, Some(net)).await?;
        let r = scenario(&env).await;
        env.conclude(r).await
    };
    match tokio::time::timeout(TEST_LIMIT, run).await {
        Ok(r) => r.unwrap_or_else(|e| panic!("{e}")),
        Err(_) => panic!("test exceeded {TEST_LIMIT:?}"),
    }
}

#[tokio::test]
async fn pod_lifecycle_containerd_1_7() {
    with_pods(Version::V1_7, 211, scenario::cri_pod_lifecycle).await
}

#[tokio::test]
async fn pod_lifecycle_containerd_2() {
    with_pods(Version::V2, 212, scenario::cri_pod_lifecycle).await
}
