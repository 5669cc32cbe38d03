//! `shoji vm run` acceptance: a real VM through the CLI binary, stdio kept apart, the exit
//! code passed through, nothing left behind.
use std::process::{Command, Stdio};

use shoji_tests::{bins, vm::TestEnv};

fn shoji(env: &TestEnv) -> Command {
    let mut cmd = Command::new(bins::binary("shoji"));
    cmd.env("SHOJI_RUN_DIR", &env.run_dir);
    cmd
}

#[tokio::test]
async fn vm_run_passes_stdout_stderr_and_exit_code() {
    let env = TestEnv::new("cli-run").await;
    let out = shoji(&env)
        .args([
            "vm",
            "run",
            "--",
            "sh",
            "-c",
            "echo hello; echo oops >&2; exit 7",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(7));
    env.assert_no_leak().await;
}

#[tokio::test]
async fn vm_run_forwards_stdin_with_eof() {
    let env = TestEnv::new("cli-stdin").await;
    let mut child = shoji(&env)
        .args(["vm", "run", "--", "sh", "-c", "wc -c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[b'z'; 12345])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "12345");
    assert_eq!(out.status.code(), Some(0));
    env.assert_no_leak().await;
}

#[tokio::test]
async fn vm_run_reports_a_missing_kernel_in_one_line() {
    let env = TestEnv::new("cli-nokernel").await;
    let config = env.run_dir.join("config.toml");
    std::fs::write(&config, "kernel = \"/nonexistent/vmlinux\"\n").unwrap();
    let out = shoji(&env)
        .arg("--config")
        .arg(&config)
        .args(["vm", "run", "--", "true"])
        .output()
        .unwrap();
    std::fs::remove_file(&config).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/vmlinux"), "{stderr}");
    env.assert_no_leak().await;
}

/// Sizes the guest cannot boot with, or above the configured maxima, are refused at once
/// with what was wrong, as the shim refuses a pod's (nothing is started).
#[tokio::test]
async fn vm_run_refuses_impossible_sizes_before_starting() {
    let env = TestEnv::new("cli-sizes").await;
    for (args, says) in [
        (["--memory", "10"], "at least 64 MiB"),
        (["--cpus", "0"], "at least 1"),
        (["--cpus", "100000"], "above max_vcpus"),
        (["--memory", "99999999"], "above max_memory_mib"),
    ] {
        let began = std::time::Instant::now();
        let out = shoji(&env)
            .args(["vm", "run"])
            .args(args)
            .args(["--", "true"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            began.elapsed() < std::time::Duration::from_secs(5),
            "{args:?}"
        );
    }
    env.assert_no_leak().await;
}

/// Starts `shoji vm run -- sleep 1000` and returns once its guest is up.
fn start_sleeping_vm(env: &TestEnv) -> std::process::Child {
    let child = shoji(env)
        .args(["vm", "run", "--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The VM is up once its console log has content; give the agent time to start the container.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let booted = std::fs::read_dir(&env.run_dir).unwrap().flatten().any(|e| {
            e.path()
                .join("console.log")
                .metadata()
                .map(|m| m.len() > 0)
                .unwrap_or(false)
        });
        if booted {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "VM never booted");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    child
}

#[tokio::test]
async fn vm_run_is_torn_down_on_sigterm() {
    let env = TestEnv::new("cli-sigterm").await;
    let child = start_sleeping_vm(&env);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(125),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGTERM"));
    env.assert_no_leak().await;
}

#[tokio::test]
async fn cleanup_removes_what_a_killed_runtime_left() {
    let env = TestEnv::new("cli-cleanup").await;
    let mut child = start_sleeping_vm(&env);
    // SIGKILL: no teardown at all. The VMM and daemons live on in their own process groups.
    child.kill().unwrap();
    child.wait().unwrap();
    // The sandbox, beside the uid claims (`.uids`, which cleanup gives back).
    let ids: Vec<String> = std::fs::read_dir(&env.run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let pids = std::fs::read_to_string(env.run_dir.join(&ids[0]).join("state.json")).unwrap();
    assert!(
        pids.contains(shoji_tests::backend::vmm_name()),
        "state.json records the VMM: {pids}"
    );
    let state: serde_json::Value = serde_json::from_str(&pids).unwrap();
    let alive = state["pids"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| std::path::Path::new(&format!("/proc/{}", p["pid"])).exists())
        .count();
    assert!(
        alive >= 3,
        "the killed runtime left its VMM and daemons running: {pids}"
    );
    let out = shoji(&env).args(["cleanup", &ids[0]]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cleaning up again is fine: already gone is success.
    let again = shoji(&env).args(["cleanup", &ids[0]]).output().unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    env.assert_no_leak().await;
}

#[tokio::test]
async fn vm_run_tty_on_a_terminal() {
    let env = TestEnv::new("cli-tty").await;
    // script(1) gives `shoji` a real terminal as stdin/stdout (raw mode, window size).
    let cmd = format!(
        "{} vm run --tty -- sh -c 'test -t 0 && test -t 1 && echo tty-ok; exit 3'",
        shoji_tests::bins::binary("shoji").display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("SHOJI_RUN_DIR", &env.run_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tty-ok\r\n"), "{stdout:?}");
    assert_eq!(out.status.code(), Some(3), "{stdout:?}");
    env.assert_no_leak().await;
}
