//! ExecProcess, WaitProcess and SignalProcess.
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use shoji_agent_api::stream::StreamKind;

use super::*;
use crate::io::DRAIN_AFTER_EXIT;

#[tokio::test]
async fn an_exec_is_made_at_its_start_and_its_spec_then_removed() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    g.exec("c1", "e1", &["sh", "-c", "date"]).await.unwrap();
    let process_json = g.container_dir("c1").join("execs/e1/process.json");
    assert!(process_json.is_file());
    assert!(!g.os.called("exec"));
    let pid = g.rt.start_process("c1", "e1").await.unwrap() as i32;
    assert_eq!(pid, g.os.last_pid());
    assert!(g.os.called("exec c1 e1"));
    assert!(!process_json.exists());
}

#[tokio::test]
async fn exec_ids_and_programs_are_checked_when_registered() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    for bad in ["", "a/b", "../e"] {
        is(g.exec("c1", bad, &["sh"]).await, invalid);
    }
    let e = is(g.exec("c1", "e1", &["bash"]).await, invalid);
    assert!(e.contains("bash"), "{e}");
    // Nothing of the refused one stays: the id is free.
    g.exec("c1", "e1", &["sh"]).await.unwrap();
    is(g.exec("c1", "e1", &["sh"]).await, exists);
    is(g.exec("c9", "e2", &["sh"]).await, not_found);
}

#[tokio::test]
async fn no_exec_into_a_container_whose_init_exited() {
    let g = runtime(false);
    let init = g.run("c1", Pid::Own).await;
    g.exec("c1", "early", &["sh"]).await.unwrap();
    g.os.exit(init, 0);
    g.rt.wait_process("c1", "").await.unwrap();
    is(g.exec("c1", "e1", &["sh"]).await, precondition);
    is(g.rt.start_process("c1", "early").await, precondition);
}

#[tokio::test]
async fn an_exec_whose_start_failed_has_exited() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    g.exec("c1", "e1", &["sh"]).await.unwrap();
    g.os.fail_next("exec", "exec failed: permission denied");
    let e = is(g.rt.start_process("c1", "e1").await, internal);
    assert!(e.contains("permission denied"), "{e}");
    let exit = g.rt.wait_process("c1", "e1").await.unwrap();
    assert_eq!(exit.status, 128 + Signal::SIGKILL as i32);
}

#[tokio::test]
async fn execs_are_forgotten_only_once_reported_and_old() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    let long_ago = SystemTime::now() - EXEC_RETENTION - Duration::from_secs(1);
    let reported_old = g.run_exec("c1", "reported-old").await;
    let unreported_old = g.run_exec("c1", "unreported-old").await;
    let reported_new = g.run_exec("c1", "reported-new").await;
    g.os.exit_at(reported_old, 0, long_ago);
    g.os.exit_at(unreported_old, 0, long_ago);
    g.os.exit(reported_new, 0);
    for exec in ["reported-old", "reported-new"] {
        g.rt.wait_process("c1", exec).await.unwrap();
    }
    let dir = g.container_dir("c1").join("execs");
    assert!(dir.join("reported-old").exists());
    // Pruning happens at the next exec.
    g.exec("c1", "next", &["sh"]).await.unwrap();
    is(g.rt.wait_process("c1", "reported-old").await, not_found);
    assert!(!dir.join("reported-old").exists());
    for exec in ["unreported-old", "reported-new"] {
        assert_eq!(g.rt.wait_process("c1", exec).await.unwrap().status, 0);
    }
}

// --- WaitProcess ---

#[tokio::test]
async fn an_exit_is_answered_once_its_output_arrived() {
    let g = runtime(false);
    let pid = g.run("c1", Pid::Own).await;
    let stdout = g.attach("c1", "", StreamKind::Stdout).await;
    let _stderr = g.attach("c1", "", StreamKind::Stderr).await;
    g.os.write_stdout(pid, b"last words\n");
    g.os.exit(pid, 3);
    let began = Instant::now();
    assert_eq!(g.rt.wait_process("c1", "").await.unwrap().status, 3);
    assert!(
        began.elapsed() < DRAIN_AFTER_EXIT / 2,
        "{:?}",
        began.elapsed()
    );
    assert_eq!(read_all(stdout).await, "last words\n");
}

#[tokio::test]
async fn an_exit_waits_a_bounded_time_for_output_a_survivor_holds() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    let pid = g.run_exec("c1", "e1").await;
    let _stdout = g.attach("c1", "e1", StreamKind::Stdout).await;
    let worker = g.os.fork(pid);
    g.os.exit(pid, 0);
    let began = Instant::now();
    assert_eq!(g.rt.wait_process("c1", "e1").await.unwrap().status, 0);
    let waited = began.elapsed();
    assert!(
        waited >= DRAIN_AFTER_EXIT - Duration::from_millis(100) && waited < DRAIN_AFTER_EXIT * 2,
        "{waited:?}"
    );
    // An exec's children are not killed with it, as with runc.
    assert!(g.os.alive(worker));
}

#[tokio::test]
async fn an_init_in_the_pods_pid_namespace_takes_what_it_started_with_it() {
    let g = runtime(false);
    let pid = g.run("c1", Pid::Pod).await;
    let stdout = g.attach("c1", "", StreamKind::Stdout).await;
    let _stderr = g.attach("c1", "", StreamKind::Stderr).await;
    let worker = g.os.fork(pid);
    g.os.write_stdout(worker, b"worker\n");
    g.os.exit(pid, 0);
    let began = Instant::now();
    g.rt.wait_process("c1", "").await.unwrap();
    assert!(
        began.elapsed() < DRAIN_AFTER_EXIT / 2,
        "{:?}",
        began.elapsed()
    );
    assert!(!g.os.alive(worker));
    assert!(g.os.called("signal_all c1 SIGKILL"));
    assert_eq!(read_all(stdout).await, "worker\n");
}

#[tokio::test]
async fn an_init_with_its_own_pid_namespace_leaves_the_rest_to_the_kernel() {
    let g = runtime(false);
    let pid = g.run("c1", Pid::Own).await;
    g.os.exit(pid, 0);
    g.rt.wait_process("c1", "").await.unwrap();
    assert!(!g.os.called("signal_all"));
}

#[tokio::test]
async fn waiting_for_an_unknown_process_is_not_found() {
    let g = runtime(false);
    is(g.rt.wait_process("c1", "").await, not_found);
    g.run("c1", Pid::Own).await;
    is(g.rt.wait_process("c1", "e9").await, not_found);
}

// --- SignalProcess ---

#[tokio::test]
async fn a_signal_reaches_the_init_and_its_exit_says_so() {
    let g = runtime(false);
    let pid = g.run("c1", Pid::Own).await;
    g.rt.signal_process("c1", "", Signal::SIGTERM as u32, false)
        .await
        .unwrap();
    assert!(g.os.called(&format!("signal {pid} SIGTERM")));
    assert_eq!(g.rt.wait_process("c1", "").await.unwrap().status, 143);
    let e = is(
        g.rt.signal_process("c1", "", Signal::SIGTERM as u32, false)
            .await,
        not_found,
    );
    assert!(e.contains("already exited"), "{e}");
}

#[tokio::test]
async fn an_init_that_died_but_is_not_reaped_yet_is_not_found() {
    let g = runtime(false);
    let pid = g.run("c1", Pid::Own).await;
    g.os.vanish(pid);
    let r =
        g.rt.signal_process("c1", "", Signal::SIGKILL as u32, false)
            .await;
    is(r, not_found);
    g.os.exit(pid, 0);
}

#[tokio::test]
async fn kill_all_reaches_every_process_even_after_the_init_exited() {
    let g = runtime(false);
    let pid = g.run("c1", Pid::Own).await;
    let exec = g.run_exec("c1", "e1").await;
    let worker = g.os.fork(pid);
    g.os.ignore(worker, Signal::SIGTERM);
    g.os.exit(pid, 0);
    g.rt.signal_process("c1", "", Signal::SIGTERM as u32, true)
        .await
        .unwrap();
    assert!(!g.os.alive(exec));
    assert!(g.os.alive(worker), "SIGTERM is the worker's to ignore");
    g.rt.signal_process("c1", "", Signal::SIGKILL as u32, true)
        .await
        .unwrap();
    assert!(!g.os.alive(worker));
}

#[tokio::test]
async fn a_signal_to_an_exec_follows_its_life() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    g.exec("c1", "e1", &["sh"]).await.unwrap();
    let sig = Signal::SIGINT as u32;
    is(
        g.rt.signal_process("c1", "e1", sig, false).await,
        precondition,
    );
    let pid = g.rt.start_process("c1", "e1").await.unwrap() as i32;
    g.rt.signal_process("c1", "e1", sig, false).await.unwrap();
    assert!(g.os.called(&format!("signal {pid} SIGINT")));
    assert_eq!(g.rt.wait_process("c1", "e1").await.unwrap().status, 130);
    is(g.rt.signal_process("c1", "e1", sig, false).await, not_found);
}

#[tokio::test]
async fn a_number_that_is_no_signal_is_refused() {
    let g = runtime(false);
    g.run("c1", Pid::Own).await;
    for n in [0, 65, 999] {
        is(g.rt.signal_process("c1", "", n, false).await, invalid);
    }
    is(g.rt.signal_process("c9", "", 9, false).await, not_found);
}
