//! containerd-shim-shoji-v2 driven by a real containerd (1.7 and 2.x) through `ctr`: every
//! container runs in a real microVM. Each test starts its own containerd and ends with the
//! leak check of `Env::finish` (no task or container left, no VMM, virtiofsd, mount, socket
//! or directory on the host).
use std::{path::PathBuf, process::Stdio, time::Duration};

use sha2::{Digest, Sha256};
use shoji_tests::{
    containerd::Version,
    image::BUSYBOX,
    scenario::{self, Env, ShojiRuntime, CTR_NAMESPACE},
};

/// Upper bound for one test, so a hang fails instead of stalling CI.
const TEST_LIMIT: Duration = Duration::from_secs(300);
/// Bound for one `ctr` call that boots a VM (TCG on a loaded 2-core host).
const CALL: Duration = Duration::from_secs(120);

type Result<T = ()> = scenario::Result<T>;

fn check(cond: bool, what: impl FnOnce() -> String) -> Result {
    if cond {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// Runs `scenario` in a fresh containerd `version` with shoji, then the leak check.
async fn with_env<F, Fut>(version: Version, extra_config: &str, scenario: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: std::future::Future<Output = (Env, Result)>,
{
    scenario::within(TEST_LIMIT, async {
        let shoji = ShojiRuntime::new(extra_config);
        let env = Env::start(version, &shoji.runtime, None).await?;
        let (env, r) = scenario(env).await;
        let log = env.ctrd.log_tail();
        let finished = env.finish().await;
        r.and(finished)
            .map_err(|e| format!("{e}\n--- containerd log ---\n{log}").into())
    })
    .await
}

/// `ctr run --rm` arguments for shoji with the test's config.
fn run_args<'a>(env: &'a Env, config: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        env.runtime.runtime_type.as_str(),
        "--runtime-config-path",
        config,
    ];
    args.extend_from_slice(extra);
    args
}

fn config_of(env: &Env) -> String {
    env.runtime.config_arg()
}

async fn ctr(env: &Env, args: &[&str]) -> Result<shoji_tests::containerd::CtrOutput> {
    Ok(env.ctrd.ctr(CTR_NAMESPACE, args, CALL).await?)
}

/// Waits until `ctr task ls` shows task `id` with `status`.
async fn wait_status(env: &Env, id: &str, status: &str) -> Result {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = ctr(env, &["task", "ls"]).await?;
        let row = out
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .map(str::to_string);
        if row
            .as_deref()
            .is_some_and(|r| r.split_whitespace().nth(2) == Some(status))
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("task {id} never reached {status}: {row:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The host pid containerd reports for task `id` (shoji reports the VMM's).
async fn task_pid(env: &Env, id: &str) -> Result<i32> {
    let out = ctr(env, &["task", "ls"]).await?;
    let row = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .ok_or("task not listed")?;
    Ok(row
        .split_whitespace()
        .nth(1)
        .ok_or("no pid column")?
        .parse()?)
}

/// Starts `ctr run -d` of `cmd` as container `id` and waits until it runs.
async fn run_detached(env: &Env, id: &str, cmd: &[&str]) -> Result {
    let config = config_of(env);
    let mut args = vec![
        "run",
        "-d",
        "--runtime",
        env.runtime.runtime_type.as_str(),
        "--runtime-config-path",
        &config,
        BUSYBOX,
        id,
    ];
    args.extend_from_slice(cmd);
    let out = ctr(env, &args).await?;
    check(out.status.success(), || {
        format!("ctr run -d failed: {out:?}")
    })?;
    wait_status(env, id, "RUNNING").await
}

/// Kills, deletes and removes container `id`, whatever state it is in.
async fn remove(env: &Env, id: &str) {
    let listed = ctr(env, &["task", "ls"]).await.is_ok_and(|o| {
        o.stdout
            .lines()
            .any(|l| l.split_whitespace().next() == Some(id))
    });
    if listed {
        let _ = ctr(env, &["task", "kill", "-s", "SIGKILL", id]).await;
        let _ = wait_status(env, id, "STOPPED").await;
        let _ = ctr(env, &["task", "delete", id]).await;
    }
    let _ = ctr(env, &["container", "rm", id]).await;
}

/// A `ctr run --rm` in the background, to be signalled from another ctr.
/// Waits until `path` exists in container `id` (checked with `ctr task exec test -f`).
async fn wait_for_file(env: &Env, id: &str, path: &str) -> Result {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for n in 0u32.. {
        let exec_id = format!("probe{n}");
        let out = ctr(
            env,
            &[
                "task",
                "exec",
                "--exec-id",
                &exec_id,
                id,
                "test",
                "-f",
                path,
            ],
        )
        .await?;
        if out.code() == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{path} never appeared in {id}: {out:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!("u32 probes")
}

fn spawn_run(env: &Env, id: &str, cmd: &[&str]) -> tokio::process::Child {
    let config = config_of(env);
    let mut c = tokio::process::Command::new(env.ctrd.version().bin_dir().join("ctr"));
    c.arg("--address")
        .arg(env.ctrd.address())
        .args(["--namespace", CTR_NAMESPACE]);
    c.args(run_args(env, &config, &[BUSYBOX, id])).args(cmd);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c.spawn().expect("spawn ctr")
}

async fn exit_code(child: tokio::process::Child) -> Result<i32> {
    let out = tokio::time::timeout(CALL, child.wait_with_output()).await??;
    Ok(out.status.code().unwrap_or(-1))
}

// --- scenarios -------------------------------------------------------------------------

async fn output_and_exit_code(env: Env) -> (Env, Result) {
    let r = async {
        let config = config_of(&env);
        let out = ctr(&env, &run_args(&env, &config, &[BUSYBOX, "t1", "sh", "-c", "echo out; echo err >&2; exit 3"])).await?;
        check(out.code() == 3 && out.stdout == "out\n" && out.stderr.contains("err"), || {
            format!("want exit 3, stdout \"out\", stderr \"err\"; got {out:?}")
        })?;
        let out = ctr(&env, &run_args(&env, &config, &[BUSYBOX, "t2", "uname", "-r"])).await?;
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
        check(out.code() == 0 && !out.stdout.trim().is_empty() && out.stdout.trim() != host.trim(), || {
            format!("uname -r in the container should be the guest kernel, not the host's {host:?}: {out:?}")
        })
    }
    .await;
    (env, r)
}

async fn stdin_reaches_the_container(env: Env) -> (Env, Result) {
    let r = async {
        let config = config_of(&env);
        let args = run_args(&env, &config, &[BUSYBOX, "cat1", "cat"]);
        let out = env
            .ctrd
            .ctr_with_input(CTR_NAMESPACE, &args, Some(b"hi\nthere\n"), CALL)
            .await?;
        check(out.code() == 0 && out.stdout == "hi\nthere\n", || {
            format!("cat should echo its stdin and end on EOF: {out:?}")
        })
    }
    .await;
    (env, r)
}

async fn large_output_is_complete(env: Env) -> (Env, Result) {
    const SIZE: usize = 50 << 20;
    let r = async {
        let config = config_of(&env);
        let cmd = format!("yes 0123456789abcdef | head -c {SIZE}");
        let out = ctr(
            &env,
            &run_args(&env, &config, &[BUSYBOX, "big", "sh", "-c", &cmd]),
        )
        .await?;
        let want: Vec<u8> = b"0123456789abcdef\n"
            .iter()
            .cycle()
            .take(SIZE)
            .copied()
            .collect();
        check(out.code() == 0, || {
            format!("exit {} stderr {}", out.code(), out.stderr)
        })?;
        check(out.stdout.len() == SIZE, || {
            format!("got {} bytes of {SIZE}", out.stdout.len())
        })?;
        check(
            Sha256::digest(out.stdout.as_bytes()) == Sha256::digest(&want),
            || "stdout checksum differs".into(),
        )
    }
    .await;
    (env, r)
}

async fn exec_ps_metrics_pause(env: Env) -> (Env, Result) {
    let r = async {
        run_detached(&env, "svc", &["sleep", "1000"]).await?;
        // exec without a tty: output and exit code.
        let out = ctr(&env, &["task", "exec", "--exec-id", "e1", "svc", "sh", "-c", "echo hi; exit 5"]).await?;
        check(out.code() == 5 && out.stdout == "hi\n", || format!("exec: {out:?}"))?;
        // exec with a tty: ctr needs a terminal of its own, which script(1) provides.
        let ctr_bin = env.ctrd.version().bin_dir().join("ctr");
        let line = format!(
            "{} --address {} --namespace {CTR_NAMESPACE} task exec -t --exec-id e2 svc sh -c 'tty; exit 4'",
            ctr_bin.display(),
            env.ctrd.address().display()
        );
        let out = tokio::time::timeout(CALL, tokio::process::Command::new("script").args(["-qec", &line, "/dev/null"]).output()).await??;
        let text = String::from_utf8_lossy(&out.stdout);
        check(out.status.code() == Some(4) && text.contains("/dev/pts/"), || format!("exec -t: {:?} {text:?}", out.status))?;
        // ps: the guest's processes of the container.
        let out = ctr(&env, &["task", "ps", "svc"]).await?;
        check(out.code() == 0 && out.stdout.lines().count() >= 2, || format!("task ps: {out:?}"))?;
        // metrics: real numbers from the guest's cgroup.
        let out = ctr(&env, &["task", "metrics", "--format", "json", "svc"]).await?;
        let m: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| format!("metrics {out:?}: {e}"))?;
        let mem = m.pointer("/memory/usage").and_then(|v| v.as_u64()).unwrap_or(0);
        let cpu = m.pointer("/cpu/usage_usec").and_then(|v| v.as_u64()).unwrap_or(0);
        check(mem > 0 && cpu > 0, || format!("metrics should be non-zero: {m}"))?;
        // pause and resume.
        ctr(&env, &["task", "pause", "svc"]).await?;
        wait_status(&env, "svc", "PAUSED").await?;
        ctr(&env, &["task", "resume", "svc"]).await?;
        wait_status(&env, "svc", "RUNNING").await
    }
    .await;
    remove(&env, "svc").await;
    (env, r)
}

async fn sigterm_and_sigkill(env: Env) -> (Env, Result) {
    let r = async {
        // A process that handles SIGTERM (an init without a handler ignores it, as in runc).
        let child = spawn_run(
            &env,
            "term",
            &[
                "sh",
                "-c",
                "trap 'exit 143' TERM; touch /tmp/trapped; sleep 1000 & wait",
            ],
        );
        wait_status(&env, "term", "RUNNING").await?;
        // Until its trap is set, sh (the init of its PID namespace) ignores SIGTERM.
        wait_for_file(&env, "term", "/tmp/trapped").await?;
        ctr(&env, &["task", "kill", "term"]).await?;
        let code = exit_code(child).await?;
        check(code == 143, || {
            format!("SIGTERM: want exit 143, got {code}")
        })?;

        let child = spawn_run(&env, "kill9", &["sleep", "1000"]);
        wait_status(&env, "kill9", "RUNNING").await?;
        ctr(&env, &["task", "kill", "-s", "SIGKILL", "kill9"]).await?;
        let code = exit_code(child).await?;
        check(code == 137, || {
            format!("SIGKILL: want exit 137, got {code}")
        })
    }
    .await;
    (env, r)
}

/// Execs (what exec liveness probes do) still run, one after another, while the container
/// keeps the guest's only vCPU busy (each exec's helper is the standby started beside it),
/// and at nice 0: the standby waits at nice 19, which must not reach what it starts.
async fn exec_beside_a_busy_container(env: Env) -> (Env, Result) {
    let r = async {
        run_detached(&env, "busy", &["sh", "-c", "while :; do :; done"]).await?;
        wait_status(&env, "busy", "RUNNING").await?;
        for n in 0..3 {
            let exec_id = format!("probe{n}");
            let out = tokio::time::timeout(
                Duration::from_secs(30),
                ctr(
                    &env,
                    &[
                        "task",
                        "exec",
                        "--exec-id",
                        &exec_id,
                        "busy",
                        "sh",
                        "-c",
                        "echo alive nice=$(cut -d' ' -f19 /proc/self/stat)",
                    ],
                ),
            )
            .await
            .map_err(|_| format!("exec {n} beside a busy container took over 30 s"))??;
            check(out.code() == 0 && out.stdout == "alive nice=0\n", || {
                format!("exec {n} beside a busy container: {out:?}")
            })?;
        }
        ctr(&env, &["task", "kill", "-s", "SIGKILL", "busy"]).await?;
        wait_status(&env, "busy", "STOPPED").await
    }
    .await;
    remove(&env, "busy").await;
    (env, r)
}

async fn kill_all(env: Env) -> (Env, Result) {
    let r = async {
        run_detached(&env, "all", &["sh", "-c", "sleep 1000 & sleep 1000 & wait"]).await?;
        let out = ctr(
            &env,
            &[
                "task",
                "exec",
                "-d",
                "--exec-id",
                "bg",
                "all",
                "sleep",
                "1000",
            ],
        )
        .await?;
        check(out.code() == 0, || format!("exec -d: {out:?}"))?;
        ctr(&env, &["task", "kill", "--all", "-s", "SIGKILL", "all"]).await?;
        wait_status(&env, "all", "STOPPED").await
    }
    .await;
    remove(&env, "all").await;
    (env, r)
}

async fn missing_kernel_fails_clearly(env: Env) -> (Env, Result) {
    let r = async {
        let config = config_of(&env);
        let out = ctr(
            &env,
            &run_args(&env, &config, &[BUSYBOX, "nokernel", "true"]),
        )
        .await?;
        check(
            out.code() != 0 && out.stderr.contains("/nonexistent/vmlinux"),
            || format!("a missing kernel must fail naming the path: {out:?}"),
        )
    }
    .await;
    let _ = ctr(&env, &["container", "rm", "nokernel"]).await;
    (env, r)
}

async fn guest_never_ready_is_bounded(env: Env) -> (Env, Result) {
    let r = async {
        let config = config_of(&env);
        let started = std::time::Instant::now();
        let out = ctr(
            &env,
            &run_args(&env, &config, &[BUSYBOX, "noagent", "true"]),
        )
        .await?;
        check(out.code() != 0 && out.stderr.contains("agent"), || {
            format!("want a failure naming the agent: {out:?}")
        })?;
        check(started.elapsed() < Duration::from_secs(60), || {
            format!("took {:?}", started.elapsed())
        })
    }
    .await;
    let _ = ctr(&env, &["container", "rm", "noagent"]).await;
    (env, r)
}

async fn vmm_killed_ends_the_task(env: Env) -> (Env, Result) {
    let r = async {
        let child = spawn_run(&env, "vmmkill", &["sleep", "1000"]);
        wait_status(&env, "vmmkill", "RUNNING").await?;
        let pid = task_pid(&env, "vmmkill").await?;
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let vmm = shoji_tests::backend::vmm_name();
        check(cmdline.contains(vmm), || {
            format!("task pid {pid} should be the VMM: {cmdline:?}")
        })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let code = exit_code(child).await?;
        check(code == 255, || {
            format!("a VM that died ends its containers with 255, got {code}")
        })
    }
    .await;
    (env, r)
}

async fn shim_killed_is_cleaned_up(env: Env) -> (Env, Result) {
    let r = async {
        run_detached(&env, "shimkill", &["sleep", "1000"]).await?;
        let shim = scenario::find_shim(&env.runtime.run_dirs[0]).ok_or("no shim process found")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        // containerd notices the dead shim and runs `containerd-shim-shoji-v2 delete`, which
        // must remove the VM it left; the task ends up stopped or gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = ctr(&env, &["task", "ls"]).await?;
            let row = out
                .stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some("shimkill"))
                .map(str::to_string);
            if row.as_deref().is_none_or(|r| r.contains("STOPPED")) {
                break;
            }
            check(tokio::time::Instant::now() < deadline, || {
                format!("task still listed as {row:?}")
            })?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = ctr(&env, &["task", "delete", "shimkill"]).await;
        ctr(&env, &["container", "rm", "shimkill"]).await?;
        Ok(())
    }
    .await;
    remove(&env, "shimkill").await;
    (env, r)
}

const BAD_KERNEL: &str = "kernel = \"/nonexistent/vmlinux\"";

/// An initrd that is not shoji's: the guest boots but nothing ever announces itself.
fn no_agent_config() -> String {
    let dir = PathBuf::from("/tmp/shoji-test-noagent");
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("empty.cpio.gz");
    if !initrd.exists() {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("cd {} && mkdir -p e && (cd e && find . | cpio -o -H newc 2>/dev/null) | gzip > {}", dir.display(), initrd.display())])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot build the empty initrd");
    }
    format!(
        "initrd = \"{}\"\n[timeouts]\nagent_ready_ms = 8000",
        initrd.display()
    )
}

macro_rules! both_versions {
    ($name:ident, $scenario:ident, $config:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn containerd_1_7() {
                with_env(Version::V1_7, &$config, $scenario).await
            }
            #[tokio::test]
            async fn containerd_2() {
                with_env(Version::V2, &$config, $scenario).await
            }
        }
    };
}

both_versions!(run_output_and_exit_code, output_and_exit_code, "");
both_versions!(run_stdin, stdin_reaches_the_container, "");
both_versions!(run_50mb_stdout, large_output_is_complete, "");
both_versions!(task_exec_ps_metrics_pause, exec_ps_metrics_pause, "");
both_versions!(task_kill_signals, sigterm_and_sigkill, "");
both_versions!(task_kill_all, kill_all, "");
both_versions!(
    task_exec_beside_a_busy_container,
    exec_beside_a_busy_container,
    ""
);
both_versions!(
    fail_missing_kernel,
    missing_kernel_fails_clearly,
    BAD_KERNEL
);
both_versions!(
    fail_guest_never_ready,
    guest_never_ready_is_bounded,
    no_agent_config()
);
both_versions!(fail_vmm_killed, vmm_killed_ends_the_task, "");
both_versions!(fail_shim_killed, shim_killed_is_cleaned_up, "");
