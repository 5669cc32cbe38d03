//! Stopping a container whose main process forked a child that shares its stdout (nginx: a master
//! and its worker), in a pod of one PID namespace (CRI's default when the namespace options are
//! unset, as critest leaves them; Kubernetes' shareProcessNamespace). There the child outlives the
//! main process (it is re-parented to the pod's init) and holds the container's output open.
//! Side by side on runc and shoji (containerd 1.7 and 2.x): StopContainer, and StopPodSandbox +
//! RemovePodSandbox, end within a tight bound, the children are gone with their containers, and
//! nothing is left behind (the leak check).
use std::time::{Duration, Instant};

use shoji_tests::{
    cri::{self, api, Cri},
    image::BUSYBOX,
    pods::{check, security, sh_ok, Pods},
    scenario::{self, Env},
    side_by_side,
};

/// runc stops such a pod in ~0.2 s; a VM under TCG needs a few seconds.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// StopContainer's grace period (the main process dies of the SIGTERM at once).
const GRACE: Duration = Duration::from_secs(2);

type Result<T = ()> = scenario::Result<T>;

/// A master that forks a long-lived worker (`sleep <worker>`) and becomes `sleep <master>`; both
/// write to the container's stdout. Namespace options unset: the pod's PID namespace.
fn master_and_worker(name: &str, worker: u32, master: u32) -> api::ContainerConfig {
    let script =
        format!("(echo worker up; exec sleep {worker}) & echo master up; exec sleep {master}");
    let mut c = cri::container_config(name, BUSYBOX, &["sh", "-c", &script]);
    security(&mut c).namespace_options = None;
    c
}

/// The command lines of every process `id` sees, then one line per process: its state letter
/// (`Z`: a zombie nobody reaped).
const PROCESSES: &str =
    "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; cat /proc/[0-9]*/stat | sed 's/.*) \\(.\\).*/\\1/'";

/// Runs [`PROCESSES`] in `id` until `done` holds for its output (30 s at most); `want` says what
/// was waited for.
async fn until(cri: &Cri, id: &str, want: &str, done: impl Fn(&str) -> bool) -> Result {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let procs = sh_ok(cri, id, PROCESSES).await?;
        if done(&procs) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("want {want}, see {procs:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn has_sleep(procs: &str, n: u32) -> bool {
    procs.contains(&format!("sleep {n} "))
}

async fn stop_with_a_forked_child(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let mut cfg = cri::pod_config("forks", "shoji-test", work.path());
        if let Some(sc) = cfg.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
            sc.namespace_options = None;
        }
        let pod = pods.run(&cfg).await?;
        let stopped = master_and_worker("stopped", 1001, 1002);
        let stopped = pods.start(&pod, &cfg, &stopped).await?;
        let left = master_and_worker("left", 1003, 1004);
        let left = pods.start(&pod, &cfg, &left).await?;
        // One PID namespace: every master and worker is seen from `left`.
        until(&cri, &left, "every master and worker", |p| {
            [1001, 1002, 1003, 1004].iter().all(|n| has_sleep(p, *n))
        })
        .await?;

        let began = Instant::now();
        tokio::time::timeout(STOP_LIMIT + GRACE, cri.stop_container(&stopped, GRACE))
            .await
            .map_err(|_| format!("StopContainer took over {:?}", STOP_LIMIT + GRACE))??;
        let stop_took = began.elapsed();
        let status = cri.container_status(&stopped).await?;
        check(
            status.state == api::ContainerState::ContainerExited as i32,
            || format!("not exited after StopContainer: {status:?}"),
        )?;
        // Gone, and on shoji reaped by the pod's init (runc's here is the test image's `sleep`,
        // which reaps nothing); the other container's untouched.
        let reaps = env.runtime.cri_handler == "shoji";
        until(&cri, &left, "the stopped container's processes gone", |p| {
            !has_sleep(p, 1001) && !has_sleep(p, 1002) && (!reaps || !p.lines().any(|l| l == "Z"))
        })
        .await?;
        until(&cri, &left, "the other container's processes", |p| {
            has_sleep(p, 1003) && has_sleep(p, 1004)
        })
        .await?;
        let log = std::fs::read_to_string(work.path().join("stopped.log"))?;
        check(
            log.contains(" stdout F worker up") && log.contains(" stdout F master up"),
            || format!("the log lacks the master's or the worker's line: {log:?}"),
        )?;
        cri.remove_container(&stopped).await?;

        let down_took = pods.stop_and_remove(&pod, STOP_LIMIT).await?;
        eprintln!(
            "{}: StopContainer {stop_took:.2?}, StopPodSandbox + RemovePodSandbox {down_took:.2?}",
            env.runtime.cri_handler
        );
        Ok(())
    })
    .await
}

side_by_side!(stop_with_a_forked_child, 205);
