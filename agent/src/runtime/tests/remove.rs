//! RemoveContainer, ResizeTty, UpdateContainer and the pod's sysctls.
use super::*;
use crate::io::DRAIN_AFTER_EXIT;

#[tokio::test]
async fn removing_an_unknown_container_succeeds() {
    let g = runtime(false);
    g.rt.remove_container("c1").await.unwrap();
    g.rt.remove_container("c1").await.unwrap();
    assert!(g.os.calls().is_empty());
}

#[tokio::test]
async fn a_remove_ends_every_process_and_forgets_the_container() {
    let g = runtime(false);
    let init = g.run("c1", Pid::Own).await;
    let exec = g.run_exec("c1", "e1").await;
    let worker = g.os.fork(init);
    g.exec("c1", "never-started", &["sh"]).await.unwrap();
    g.rt.remove_container("c1").await.unwrap();
    for pid in [init, exec, worker] {
        assert!(!g.os.alive(pid), "{pid} survived the remove");
    }
    assert!(!g.container_dir("c1").exists());
    is(g.rt.wait_process("c1", "e1").await, not_found);
    is(g.rt.start_process("c1", "never-started").await, not_found);
    assert!(g.rt.table.lock().unwrap().locks.is_empty());
    g.run("c1", Pid::Own).await;
}

#[tokio::test]
async fn a_waiter_of_a_removed_container_gets_an_exit() {
    let g = runtime(false);
    g.create("c1", Pid::Own).await.unwrap();
    g.exec("c1", "e1", &["sh"]).await.unwrap();
    let waits = ["", "e1"].map(|exec| {
        let rt = g.rt.clone();
        tokio::spawn(async move { rt.wait_process("c1", exec).await })
    });
    settle().await;
    g.rt.remove_container("c1").await.unwrap();
    for wait in waits {
        let exit = tokio::time::timeout(DRAIN_AFTER_EXIT * 3, wait)
            .await
            .expect("the wait ends");
        assert_eq!(exit.unwrap().unwrap().status, 137);
    }
}

// --- ResizeTty, UpdateContainer ---

#[tokio::test]
async fn a_tty_is_resized_and_a_pipe_is_not() {
    let g = runtime(false);
    let mut r = g.request("c1", spec(&["sh"], Pid::Own));
    r.terminal = true;
    g.rt.create_container(r).await.unwrap();
    let pid = g.os.last_pid();
    g.rt.resize_tty("c1", "", 120, 40).unwrap();
    assert_eq!(g.os.tty_size(pid), (120, 40));
    g.rt.resize_tty("c1", "", 100_000, 1).unwrap();
    assert_eq!(g.os.tty_size(pid), (u16::MAX, 1));
    g.run("c2", Pid::Own).await;
    is(g.rt.resize_tty("c2", "", 80, 24), precondition);
    is(g.rt.resize_tty("c9", "", 80, 24), not_found);
}

#[tokio::test]
async fn an_update_that_is_not_resources_json_is_refused() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    let e = is(g.rt.update("c1", b"{\"memory\": 5}"), invalid);
    assert!(e.contains("LinuxResources"), "{e}");
    is(g.rt.update("c9", b"{}"), not_found);
}

// --- Pod sysctls ---

#[tokio::test]
async fn pod_sysctls_are_all_checked_before_one_is_written() {
    let g = runtime(false);
    let sysctls = [
        ("net.ipv4.ip_forward".to_string(), "1".to_string()),
        ("kernel.hostname".to_string(), "x".to_string()),
    ];
    is(g.rt.set_pod_sysctls(&sysctls).await, invalid);
    assert!(g.os.calls().is_empty());
}

#[tokio::test]
async fn ipc_sysctls_are_set_in_the_pods_ipc_namespace() {
    let g = runtime(false);
    let sysctls = [
        ("net.ipv4.ip_forward".to_string(), "1".to_string()),
        ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
    ];
    g.rt.set_pod_sysctls(&sysctls).await.unwrap();
    assert_eq!(
        g.os.calls(),
        [
            "sysctl net net.ipv4.ip_forward=1",
            "pause",
            "sysctl ipc of 101 kernel.shm_rmid_forced=1"
        ]
    );
}
