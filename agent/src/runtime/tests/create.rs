//! CreateContainer and StartProcess.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::json;

use super::*;

#[tokio::test]
async fn create_assembles_the_rootfs_writes_the_spec_then_makes_the_init() {
    let g = runtime(false);
    g.create("c1", Pid::Own).await.unwrap();
    assert_eq!(
        g.os.calls(),
        ["remove_files c1", "rootfs c1 overlay=false", "create c1"]
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.container_dir("c1").join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        Path::new(config["root"]["path"].as_str().unwrap()),
        g.container_dir("c1").join("rootfs")
    );
    let pid = g.rt.start_process("c1", "").await.unwrap() as i32;
    assert_eq!(pid, g.os.last_pid());
    assert!(g.os.called("start c1"));
}

#[tokio::test]
async fn a_bad_id_is_refused_before_anything_is_done() {
    let g = runtime(false);
    for id in ["", "../x", "a/b", "-a"] {
        let r =
            g.rt.create_container(g.request(id, spec(&["sh"], Pid::Own)))
                .await;
        is(r, invalid);
    }
    assert!(g.os.calls().is_empty());
}

#[tokio::test]
async fn a_create_without_a_rootfs_source_is_refused() {
    let g = runtime(false);
    let mut r = g.request("c1", spec(&["sh"], Pid::Own));
    r.rootfs = None.into();
    assert!(is(g.rt.create_container(r).await, invalid).contains("rootfs.source"));
    assert!(g.os.calls().is_empty());
}

#[tokio::test]
async fn a_second_create_of_an_id_is_refused_and_leaves_the_first_alone() {
    let g = runtime(false);
    let pid = g.run("c1", Pid::Own).await;
    is(g.create("c1", Pid::Own).await, exists);
    assert!(g.os.alive(pid));
    assert!(!g.os.called("destroy"));
}

#[tokio::test]
async fn a_bad_spec_fails_before_the_rootfs_is_mounted() {
    let g = runtime(false);
    let mut r = g.request("c1", spec(&["sh"], Pid::Own));
    r.spec_json = b"{not json".to_vec();
    is(g.rt.create_container(r).await, invalid);
    assert!(!g.os.called("rootfs"));
    assert!(g.os.called("destroy c1"));
    assert!(!g.container_dir("c1").exists());
}

#[tokio::test]
async fn a_missing_program_fails_fast_and_destroys_what_was_made() {
    let g = runtime(false);
    let r = g.request("c1", spec(&["nginx"], Pid::Own));
    let e = is(g.rt.create_container(r).await, invalid);
    assert!(e.contains("nginx"), "{e}");
    assert!(!g.os.called("create"));
    assert!(g.os.called("destroy c1"));
    assert!(!g.container_dir("c1").exists());
}

#[tokio::test]
async fn a_missing_rootfs_source_is_the_callers_error() {
    let g = runtime(false);
    let mut r = g.request("c1", spec(&["sh"], Pid::Own));
    r.rootfs.as_mut().unwrap().source = "/nonexistent/image".into();
    let e = is(g.rt.create_container(r).await, invalid);
    assert!(e.contains("/nonexistent/image"), "{e}");
}

#[tokio::test]
async fn a_bad_submount_is_refused_before_the_rootfs_is_mounted() {
    let g = runtime(false);
    let mut r = g.request("c1", spec(&["sh"], Pid::Own));
    r.submounts = vec!["/etc/passwd".into()];
    is(g.rt.create_container(r).await, invalid);
    assert!(!g.os.called("rootfs"));
}

#[tokio::test]
async fn a_failed_create_destroys_everything_and_the_id_can_be_used_again() {
    let g = runtime(false);
    g.os.fail_next("create", "libcontainer said no");
    let e = is(g.create("c1", Pid::Own).await, internal);
    assert!(
        e.contains("libcontainer said no") && e.contains("c1"),
        "{e}"
    );
    assert!(g.os.called("destroy c1"));
    assert!(!g.container_dir("c1").exists());
    g.run("c1", Pid::Own).await;
}

#[tokio::test]
async fn a_create_runs_to_its_end_when_the_caller_stops_waiting() {
    let g = runtime(false);
    let gate = g.os.gate("create");
    let given_up = tokio::time::timeout(Duration::from_millis(50), g.create("c1", Pid::Own)).await;
    assert!(given_up.is_err());
    gate.open();
    // The create goes on; its container is then there to start.
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.rt.start_process("c1", "").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the abandoned create never finished"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_remove_waits_for_a_create_of_the_same_id() {
    let g = runtime(false);
    let gate = g.os.gate("create");
    let create = tokio::spawn({
        let g = (g.rt.clone(), g.request("c1", spec(&["sh"], Pid::Own)));
        async move { g.0.create_container(g.1).await }
    });
    while !g.os.called("create c1") {
        tokio::task::yield_now().await;
    }
    let remove = tokio::spawn({
        let rt = g.rt.clone();
        async move { rt.remove_container("c1").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!remove.is_finished(), "the remove went ahead of the create");
    gate.open();
    create.await.unwrap().unwrap();
    remove.await.unwrap().unwrap();
    let calls = g.os.calls();
    let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
    assert!(at("create c1") < at("destroy c1"));
    is(g.rt.start_process("c1", "").await, not_found);
    assert!(!g.os.alive(g.os.last_pid()));
}

#[tokio::test]
async fn pod_namespaces_start_one_pause_process_and_are_joined() {
    let g = runtime(false);
    let (a, b) = tokio::join!(g.create("c1", Pid::Pod), g.create("c2", Pid::Pod));
    a.unwrap();
    b.unwrap();
    assert_eq!(g.os.calls().iter().filter(|c| *c == "pause").count(), 1);
    let pause = 101;
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.container_dir("c2").join("config.json")).unwrap())
            .unwrap();
    let paths: Vec<&str> = config["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|ns| ns["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        ["pid", "ipc", "uts"].map(|t| format!("/proc/{pause}/ns/{t}"))
    );
}

#[tokio::test]
async fn a_container_of_its_own_namespaces_starts_no_pause() {
    let g = runtime(false);
    g.create("c1", Pid::Own).await.unwrap();
    assert!(!g.os.called("pause"));
}

#[tokio::test]
async fn a_failed_pause_fails_the_create_and_the_next_create_tries_again() {
    let g = runtime(false);
    g.os.fail_next("pause", "no pid namespace");
    let e = is(g.create("c1", Pid::Pod).await, internal);
    assert!(e.contains("pause") && e.contains("no pid namespace"), "{e}");
    assert!(g.os.called("destroy c1"));
    g.create("c1", Pid::Pod).await.unwrap();
    assert_eq!(g.os.calls().iter().filter(|c| *c == "pause").count(), 2);
}

#[tokio::test]
async fn a_containers_network_sysctls_are_set_before_its_init_exists() {
    let g = runtime(false);
    let mut s = spec(&["sh"], Pid::Own);
    s["linux"]["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0"});
    g.rt.create_container(g.request("c1", s)).await.unwrap();
    let calls = g.os.calls();
    let at = |c: &str| calls.iter().position(|x| x.starts_with(c)).unwrap();
    assert_eq!(
        calls[at("sysctl")],
        "sysctl net net.ipv4.ip_unprivileged_port_start=0"
    );
    assert!(at("sysctl") < at("create c1"));
}

// --- StartProcess ---

#[tokio::test]
async fn a_process_starts_once() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    is(g.rt.start_process("c1", "").await, precondition);
    g.run_exec("c1", "e1").await;
    is(g.rt.start_process("c1", "e1").await, precondition);
}

#[tokio::test]
async fn an_init_that_died_before_its_start_cannot_start() {
    let g = runtime(false);
    g.create("c1", Pid::Own).await.unwrap();
    g.os.exit(g.os.last_pid(), 1);
    settle().await;
    let e = is(g.rt.start_process("c1", "").await, precondition);
    assert!(e.contains("status 1"), "{e}");
    assert!(!g.os.called("start"));
}

#[tokio::test]
async fn a_failed_start_is_the_runtimes_error() {
    let g = runtime(false);
    g.create("c1", Pid::Own).await.unwrap();
    g.os.fail_next("start", "no notify socket");
    let e = is(g.rt.start_process("c1", "").await, internal);
    assert!(e.contains("no notify socket"), "{e}");
}
