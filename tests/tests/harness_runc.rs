//! Proves the containerd/CRI harness with runc on containerd 1.7 and 2.x (and the system's 1.6). The
//! scenarios are runtime-agnostic (`shoji_tests::scenario`). Tests share /run/containerd/{s,fifo}:
//! `Containerd::start` serialises them with a host-wide lock (and the nextest group `containerd`).

use shoji_tests::containerd::Version;
use shoji_tests::leaks::{Scope, Snapshot};
use shoji_tests::scenario::{self, Env, Runtime};
use std::time::Duration;

/// Upper bound for one test, so a hang fails instead of stalling CI.
const TEST_LIMIT: Duration = Duration::from_secs(300);

async fn bounded(f: impl std::future::Future<Output = scenario::Result<()>>) {
    match tokio::time::timeout(TEST_LIMIT, f).await {
        Ok(r) => r.unwrap_or_else(|e| panic!("{e}")),
        Err(_) => panic!("test exceeded {TEST_LIMIT:?}"),
    }
}

async fn ctr_run(version: Version) -> scenario::Result<()> {
    let env = Env::start(version, &Runtime::runc(), None).await?;
    let r = async {
        scenario::ctr_run_exit_code(&env).await?;
        scenario::ctr_run_stdin_eof(&env).await
    }
    .await;
    env.conclude(r).await
}

async fn cri_pod(version: Version, network: u8) -> scenario::Result<()> {
    let env = Env::start(version, &Runtime::runc(), Some(network)).await?;
    let r = scenario::cri_pod_lifecycle(&env).await;
    env.conclude(r).await
}

#[tokio::test]
async fn ctr_run_containerd_1_7() {
    bounded(ctr_run(Version::V1_7)).await
}

#[tokio::test]
async fn ctr_run_containerd_2() {
    bounded(ctr_run(Version::V2)).await
}

#[tokio::test]
async fn cri_pod_containerd_1_7() {
    bounded(cri_pod(Version::V1_7, 201)).await
}

#[tokio::test]
async fn cri_pod_containerd_2() {
    bounded(cri_pod(Version::V2, 202)).await
}

/// The leak check is real: a task left running makes `finish` fail naming it (and the shim process), and
/// teardown still removes it, the shim, the private dir and the namespace cgroup.
#[tokio::test]
async fn leak_check_reports_a_left_task_and_teardown_removes_it() {
    bounded(async {
        let env = Env::start(Version::V2, &Runtime::runc(), None).await?;
        let dir = env.ctrd.dir().to_path_buf();
        let args = [
            "run",
            "-d",
            shoji_tests::image::BUSYBOX,
            "left-behind",
            "sleep",
            "1000",
        ];
        env.ctrd
            .ctr_ok(scenario::CTR_NAMESPACE, &args, Duration::from_secs(30))
            .await?;
        let err = env
            .finish()
            .await
            .expect_err("a running task must fail the leak check")
            .to_string();
        assert!(
            err.contains("task shoji-test/left-behind"),
            "leak report does not name the task: {err}"
        );
        let scope = Scope {
            cmdline_markers: vec![dir.display().to_string()],
            ..Default::default()
        };
        let left: Vec<String> = Snapshot::take(&scope)
            .processes()
            .map(String::from)
            .collect();
        assert!(left.is_empty(), "teardown left processes: {left:?}");
        assert!(!dir.exists(), "teardown left {}", dir.display());
        let cgroups = std::fs::read_dir("/sys/fs/cgroup")?
            .flatten()
            .map(|h| h.path().join(scenario::CTR_NAMESPACE));
        let left: Vec<_> = cgroups.filter(|c| c.exists()).collect();
        assert!(left.is_empty(), "namespace cgroup left: {left:?}");
        Ok(())
    })
    .await
}

/// Debian bookworm's system containerd (1.6) passes the same scenarios.
#[tokio::test]
async fn ctr_run_containerd_1_6() {
    bounded(ctr_run(Version::V1_6)).await
}

#[tokio::test]
async fn cri_pod_containerd_1_6() {
    bounded(cri_pod(Version::V1_6, 200)).await
}
