//! The operator's tools against real sandboxes: `shoji ps`, `logs`, `console`, `metrics`
//! and `cleanup` on a node with one running sandbox and one whose processes were killed.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use shoji::{agent_client::AgentClient, agent_client::AgentError};
use shoji_agent_api::types::DebugConsoleRequest;
use shoji_tests::{backend, bins, metrics, vm::TestEnv};

/// The `shoji` CLI with a configuration file of this test (run dir, log dir, debug console).
struct Cli {
    log_dir: PathBuf,
    config: PathBuf,
}

/// A `shoji vm run` process, stopped (SIGTERM: it tears its VM down) when dropped, so a
/// failing test leaves no VM behind.
struct VmRun(Child);

impl Drop for VmRun {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) of our child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

impl Cli {
    fn new(env: &TestEnv, name: &str, debug_console: bool) -> Cli {
        let log_dir = PathBuf::from(format!("{}-logs", env.run_dir.display()));
        let config = PathBuf::from(format!("{}-{name}.toml", env.run_dir.display()));
        std::fs::write(
            &config,
            format!(
                "run_dir = \"{}\"\nlog_dir = \"{}\"\nlog_retention = 5\n\
                 debug_console = {debug_console}\n\
                 [timeouts]\nagent_ready_ms = 60000\nagent_call_ms = 30000\n",
                env.run_dir.display(),
                log_dir.display()
            ),
        )
        .unwrap();
        Cli { log_dir, config }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bins::binary("shoji"));
        cmd.arg("--config").arg(&self.config).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    fn ps(&self) -> Vec<Value> {
        let out = self.run(&["ps", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Starts `shoji vm run -- sleep 1000` and waits until ps shows it running with its
    /// container; returns the CLI process and the sandbox id.
    fn start_vm(&self) -> (VmRun, String) {
        let before: Vec<String> = self.ps().iter().map(|s| id(s).to_string()).collect();
        let child = VmRun(
            self.command(&["vm", "run", "--", "sleep", "1000"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let new = self.ps().into_iter().find(|s| {
                !before.contains(&id(s).to_string())
                    && s["state"] == "running"
                    && !s["boot"].is_null()
                    && s["containers"] == serde_json::json!(["main"])
            });
            if let Some(s) = new {
                return (child, id(&s).to_string());
            }
            assert!(
                Instant::now() < deadline,
                "the VM never ran: {:?}",
                self.ps()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn id(s: &Value) -> &str {
    s["id"].as_str().unwrap()
}

/// `shoji logs --follow SANDBOX`, its output read as it comes.
struct Follower {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    /// Starts the follower and waits for its first line (the initial dump has begun).
    fn start(cli: &Cli, sandbox: &str) -> Follower {
        let mut child = cli
            .command(&["logs", "--follow", sandbox])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(10));
        assert!(first.is_ok_and(|l| l.starts_with("==> ")), "no logs header");
        Follower { child, lines }
    }

    /// Waits (at most `limit`) for the follower to end by itself, successfully; its output.
    fn end(mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("logs --follow still ran {limit:?} after the sandbox was gone");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "logs --follow: {status}");
        // The reader ends at the pipe's EOF, the follower being gone.
        self.lines.iter().collect::<Vec<_>>().join("\n")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits until the guest console in `dir` shows `line`: guest output a VMM has not yet
/// written to the file dies with it.
fn wait_for_console(dir: &Path, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let console = dir.join("console.log");
    while !std::fs::read_to_string(&console).is_ok_and(|c| c.contains(line)) {
        assert!(
            Instant::now() < deadline,
            "{line:?} never reached {console:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILLs the CLI that owns a sandbox and every process its ledger records: nothing of
/// the sandbox runs any more, its directory stays.
fn kill_everything(cli: &mut VmRun, dir: &Path) {
    cli.0.kill().unwrap();
    cli.0.wait().unwrap();
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    for p in state["pids"].as_array().unwrap() {
        // SAFETY: kill(2) of a process this test's VM launched.
        unsafe { libc::kill(p["pid"].as_i64().unwrap() as i32, libc::SIGKILL) };
    }
}

#[tokio::test]
async fn ps_logs_console_metrics_and_cleanup_on_a_running_and_a_killed_sandbox() {
    let env = TestEnv::new("operator").await;
    let cli = Cli::new(&env, "debug", true);
    let plain = Cli::new(&env, "plain", false);

    // No sandbox yet.
    let out = cli.run(&["ps"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
    assert!(cli.ps().is_empty());

    // The sandbox to be killed, booted without the debug console.
    let (mut killed_cli, killed) = plain.start_vm();
    let killed_dir = env.run_dir.join(&killed);
    // A hostile (or just mistaken) call: the agent itself refuses a console on a VM the
    // host booted without it.
    let agent = AgentClient::connect(
        &shoji::sandbox::agent_socket(&killed_dir),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let refused = agent
        .start_debug_console(DebugConsoleRequest::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, AgentError::Rpc { .. })
            && refused.to_string().contains("PERMISSION_DENIED"),
        "{refused}"
    );
    drop(agent);
    let out = cli.run(&["console", &killed]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("booted without the debug console"),
        "{}",
        text(&out.stderr)
    );
    wait_for_console(&killed_dir, "agent ready");
    kill_everything(&mut killed_cli, &killed_dir);

    // The running one.
    let (running_cli, running) = cli.start_vm();
    let running_dir = env.run_dir.join(&running);

    // ps: both, with what each is.
    let all = cli.ps();
    assert_eq!(all.len(), 2, "{all:#?}");
    let r = all.iter().find(|s| id(s) == running).unwrap();
    let k = all.iter().find(|s| id(s) == killed).unwrap();
    assert_eq!(r["state"], "running");
    let hypervisor = backend::hypervisor().to_string();
    assert_eq!(
        (r["hypervisor"].as_str(), r["vcpus"].as_u64()),
        (Some(hypervisor.as_str()), Some(1))
    );
    assert!(
        r["accel"].is_string() && r["memory_mib"].as_u64() == Some(256),
        "{r}"
    );
    assert!(r["rss_kib"].as_u64().unwrap() > 10_000, "{r}");
    assert!(r["pss_kib"].as_u64().unwrap() > 0, "{r}");
    let names: Vec<&str> = r["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for want in backend::vm_processes() {
        assert!(names.contains(want), "{names:?}");
    }
    assert!(r["boot"]["agent_ready_ms"].as_f64().unwrap() > 0.0);
    assert!(r["debug_console"].as_bool().unwrap() && r["hint"].is_null());
    assert_eq!(k["state"], "dead");
    assert_eq!(k["hint"], format!("shoji cleanup {killed}"));
    assert_eq!(k["rss_kib"], 0);
    let table = text(&cli.run(&["ps", "--no-trunc"]).stdout);
    assert!(
        table.contains(&format!("sandbox {killed} is dead: shoji cleanup {killed}")),
        "{table}"
    );
    let row = table.lines().find(|l| l.starts_with(&running)).unwrap();
    assert!(
        row.contains("running") && row.contains(&format!("{hypervisor}/")),
        "{table}"
    );

    // console: refused by a CLI whose configuration does not allow it, then a shell.
    let out = plain.run(&["console", &running]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("debug_console = true"),
        "{}",
        text(&out.stderr)
    );
    // logs --follow, started before the session: it prints the session's audit lines as they
    // come, and ends by itself once the sandbox is gone (below).
    assert!(!running_dir.join("debug-console.log").exists());
    let follower = Follower::start(&cli, &running);
    let mut shell = cli
        .command(&["console", &running[..running.len() - 2]])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo $((6*7)); ls /run/shoji/shared; exit 3\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("\n42\r\n"), "{stdout:?}");
    // The guest's root: the shared directory holds the container's files, outside it.
    assert!(stdout.contains("main"), "{stdout:?}");
    let audit = std::fs::read_to_string(running_dir.join("debug-console.log")).unwrap();
    assert!(
        audit.contains("debug console opened") && audit.contains("\"status\":3"),
        "{audit}"
    );

    // metrics: scraped and parsed as Prometheus text. The shim's agent call figures reach
    // their file every few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(running_dir.join("agent-calls.json"))
        .is_ok_and(|t| t.contains("CreateContainer"))
    {
        assert!(
            Instant::now() < deadline,
            "agent-calls.json was never written"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (server, addr) = metrics::start(cli.command(&[]));
    let (scrape, body) = metrics::scrape(&addr);
    assert!(metrics::get(&addr, "/nothing").0.contains("404"));
    drop(server);
    let rl = [("sandbox_id", running.as_str())];
    let gauge = |metric: &str, extra: &[(&str, &str)]| {
        let labels: Vec<(&str, &str)> = rl.iter().chain(extra).copied().collect();
        metrics::sample(&scrape, metric, &labels)
            .map(metrics::value)
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in\n{body}"))
    };
    assert_eq!(
        gauge(
            "shoji_sandbox_info",
            &[("state", "running"), ("hypervisor", hypervisor.as_str())]
        ),
        1.0
    );
    assert_eq!(gauge("shoji_sandbox_vcpus", &[]), 1.0);
    assert_eq!(
        gauge("shoji_sandbox_memory_bytes", &[]),
        256.0 * 1024.0 * 1024.0
    );
    assert_eq!(gauge("shoji_sandbox_containers", &[]), 1.0);
    assert!(
        gauge(
            "shoji_sandbox_boot_phase_seconds",
            &[("phase", "agent_ready")]
        ) > 0.0
    );
    assert!(
        gauge(
            "shoji_sandbox_process_rss_bytes",
            &[("process", backend::vmm_name())]
        ) > 10e6
    );
    assert!(
        gauge(
            "shoji_sandbox_process_pss_bytes",
            &[("process", "virtiofsd")]
        ) > 0.0
    );
    assert_eq!(gauge("shoji_sandbox_guest_up", &[]), 1.0);
    assert!(gauge("shoji_guest_memory_total_bytes", &[]) > 100e6);
    assert!(gauge("shoji_guest_memory_used_bytes", &[]) > 0.0);
    assert!(
        gauge(
            "shoji_container_cpu_usage_seconds_total",
            &[("container", "main")]
        ) >= 0.0
    );
    assert_eq!(gauge("shoji_container_pids", &[("container", "main")]), 1.0);
    // The shim's (here: `vm run`'s) agent calls, as a histogram.
    let calls = metrics::sample(
        &scrape,
        "shoji_agent_call_duration_seconds",
        &[("sandbox_id", &running), ("call", "CreateContainer")],
    )
    .unwrap_or_else(|| panic!("no CreateContainer latency in\n{body}"));
    let metrics::Value::Histogram(buckets) = &calls.value else {
        panic!("not a histogram: {calls:?}");
    };
    assert_eq!(buckets.last().unwrap().count, 1.0, "{buckets:?}");
    let killed_info =
        metrics::sample(&scrape, "shoji_sandbox_info", &[("sandbox_id", &killed)]).unwrap();
    assert_eq!(killed_info.labels.get("state"), Some("dead"));
    assert_eq!(
        metrics::sample(&scrape, "shoji_sandboxes", &[("state", "dead")]).map(metrics::value),
        Some(1.0)
    );
    assert!(metrics::sample(
        &scrape,
        "shoji_sandbox_guest_up",
        &[("sandbox_id", &killed)]
    )
    .is_none());
    // Every family is documented and typed.
    for family in [
        "shoji_sandbox_info",
        "shoji_agent_call_duration_seconds",
        "shoji_container_cpu_usage_seconds_total",
    ] {
        assert!(scrape.docs.contains_key(family), "no HELP for {family}");
    }

    // logs of the running one: its directory.
    let out = cli.run(&["logs", &running]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = text(&out.stdout);
    assert!(
        logs.contains(&format!("==> {}/console.log <==", running_dir.display())),
        "{logs}"
    );
    assert!(logs.contains("debug console opened"), "{logs}");
    let tail = text(&cli.run(&["logs", "--tail", "1", &running]).stdout);
    assert!(tail.lines().count() < logs.lines().count());

    // cleanup of the killed one keeps its logs; the kept copy is what `logs` shows.
    let out = cli.run(&["cleanup", &killed]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!killed_dir.exists());
    let out = cli.run(&["logs", &killed]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("kept"), "{}", text(&out.stderr));
    let kept = text(&out.stdout);
    assert!(kept.contains(&format!(
        "==> {}/{killed}/console.log <==",
        cli.log_dir.display()
    )));
    assert!(kept.contains("agent ready"), "{kept}");

    // The running one, stopped by its CLI: gone from ps, its logs kept.
    drop(running_cli);
    assert!(cli.ps().is_empty());
    let kept = text(&cli.run(&["logs", &running]).stdout);
    assert!(kept.contains("debug-console.log"), "{kept}");
    let followed = follower.end(Duration::from_secs(20));
    let audit_header = format!("==> {}/debug-console.log <==", running_dir.display());
    let after = followed
        .split_once(&audit_header)
        .unwrap_or_else(|| panic!("--follow never printed {audit_header}:\n{followed}"))
        .1;
    assert!(
        after.contains("debug console opened") && after.contains("\"status\":3"),
        "{followed}"
    );
    assert!(cli.log_dir.join(&running).join("state.json").is_file());

    env.assert_no_leak().await;
    std::fs::remove_dir_all(&cli.log_dir).unwrap();
    std::fs::remove_file(&cli.config).unwrap();
    std::fs::remove_file(&plain.config).unwrap();
}
