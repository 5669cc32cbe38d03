//! Sandbox start failures: each is bounded, names its cause, and leaves nothing behind.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use shoji::sandbox::{Sandbox, SandboxError};
use shoji_tests::vm::{flood_initrd, silent_initrd, TestEnv};

#[tokio::test]
async fn missing_kernel_is_named() {
    let env = TestEnv::new("nokernel").await;
    let mut cfg = env.sandbox_config("nokernel");
    cfg.config.kernel = PathBuf::from("/nonexistent/vmlinux");
    let err = Sandbox::start(cfg, env.log.clone())
        .await
        .err()
        .expect("start must fail");
    assert!(matches!(err, SandboxError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    env.assert_no_leak().await;
}

#[tokio::test]
async fn missing_virtiofsd_is_named_and_torn_down() {
    let env = TestEnv::new("novirtiofsd").await;
    let mut cfg = env.sandbox_config("novirtiofsd");
    cfg.config.virtiofsd.path = PathBuf::from("/nonexistent/virtiofsd");
    let err = Sandbox::start(cfg, env.log.clone())
        .await
        .err()
        .expect("start must fail");
    assert!(err.to_string().contains("/nonexistent/virtiofsd"), "{err}");
    env.assert_no_leak().await;
}

#[tokio::test]
async fn guest_that_never_announces_itself_fails_in_bounded_time() {
    let env = TestEnv::new("silent").await;
    let mut cfg = env.sandbox_config("silent");
    cfg.config.initrd = silent_initrd();
    let timeout = Duration::from_secs(8);
    cfg.config.timeouts.agent_ready = timeout;
    let started = Instant::now();
    let err = Sandbox::start(cfg, env.log.clone())
        .await
        .err()
        .expect("start must fail");
    let took = started.elapsed();
    assert!(took < timeout + Duration::from_secs(15), "took {took:?}");
    let SandboxError::NotReady { console, .. } = &err else {
        panic!("wrong error: {err}")
    };
    // The error quotes the console, which shows the impostor's own output.
    assert!(console.contains("not an agent"), "{console}");
    env.assert_no_leak().await;
}

#[tokio::test]
async fn duplicate_sandbox_id_is_refused_without_harm() {
    let env = TestEnv::new("dup").await;
    let first = env.start("dup").await;
    let err = Sandbox::start(env.sandbox_config("dup"), env.log.clone())
        .await
        .err()
        .expect("second start must fail");
    assert!(matches!(err, SandboxError::Exists { .. }), "{err}");
    // The first sandbox is untouched by the refused one.
    first
        .agent()
        .health()
        .await
        .expect("first sandbox still healthy");
    first.stop().await.unwrap();
    env.assert_no_leak().await;
}

#[tokio::test]
async fn invalid_id_is_refused() {
    let env = TestEnv::new("badid").await;
    let err = Sandbox::start(env.sandbox_config("../escape"), env.log.clone())
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, SandboxError::InvalidId { .. }), "{err}");
    env.assert_no_leak().await;
}

/// A guest writing to its console as fast as it can (about 1 MB/s under TCG) cannot fill the
/// host: console.log is started over whenever it passes its cap, keeping its last part in
/// console.log.1.
#[tokio::test]
async fn a_flooding_console_stays_under_its_cap() {
    const CAP: u64 = shoji::sandbox::CONSOLE_MAX;
    let env = TestEnv::new("flood").await;
    let mut cfg = env.sandbox_config("flood");
    cfg.config.initrd = flood_initrd();
    // Long enough to pass the cap at ~100 KB/s, what a loaded 2-core host's TCG serial gives.
    cfg.config.timeouts.agent_ready = Duration::from_secs(12);
    let console = cfg.dir().join("console.log");
    let previous = cfg.dir().join("console.log.1");
    let start = tokio::spawn(Sandbox::start(cfg, env.log.clone()));
    let (mut largest, mut rotated) = (0, false);
    while !start.is_finished() {
        largest = largest.max(std::fs::metadata(&console).map_or(0, |m| m.len()));
        rotated |= previous.exists();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = start
        .await
        .unwrap()
        .err()
        .expect("the flood never announces an agent");
    assert!(matches!(err, SandboxError::NotReady { .. }), "{err}");
    assert!(
        rotated,
        "the guest never filled its console (largest {largest} bytes)"
    );
    assert!(
        largest <= CAP + CAP / 2,
        "console.log reached {largest} bytes (cap {CAP})"
    );
    env.assert_no_leak().await;
}
