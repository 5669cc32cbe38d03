//! Side-by-side start-up benchmark of container runtimes through a private containerd (`hack/bench-ctr.sh`):
//! `ctr run --rm <busybox> true`, and CRI RunPodSandbox + CreateContainer + StartContainer (then
//! StopPodSandbox + RemovePodSandbox), each `--runs` times; prints min/median/max and the median's ratio to
//! the first runtime.
//!
//! Usage: bench-ctr [--containerd 1.7|2] [--runs N] [--shim-dir DIR] [--shoji-config FILE] RUNTIME...
//! where RUNTIME is `runc` or `shoji` (shoji needs --shim-dir).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoji_tests::containerd::Version;
use shoji_tests::cri;
use shoji_tests::image;
use shoji_tests::scenario::{self, Env, Runtime};

struct Args {
    version: Version,
    runs: usize,
    runtimes: Vec<(String, Runtime)>,
}

fn parse_args() -> Result<Args, String> {
    let mut version = Version::V2;
    let mut runs = 10;
    let mut shim_dir = None;
    let mut shoji_config = None;
    let mut names = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--containerd" => {
                version = match value()?.as_str() {
                    "1.6" => Version::V1_6,
                    "1.7" => Version::V1_7,
                    "2" | "2.x" => Version::V2,
                    v => return Err(format!("unknown containerd version {v:?} (1.6, 1.7 or 2)")),
                }
            }
            "--runs" => runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--shim-dir" => shim_dir = Some(PathBuf::from(value()?)),
            "--shoji-config" => shoji_config = Some(PathBuf::from(value()?)),
            name if !name.starts_with('-') => names.push(name.to_string()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let runtimes = names
        .into_iter()
        .map(|n| {
            let rt = match n.as_str() {
                "runc" => Runtime::runc(),
                "shoji" => {
                    let dir = shim_dir.clone().ok_or("runtime shoji needs --shim-dir")?;
                    // Short: sandbox socket paths live under it (Unix socket paths are limited to 108 bytes).
                    let run_dir = PathBuf::from(format!("/tmp/shjb{}", std::process::id()));
                    Runtime::shoji(dir, shoji_config.clone(), run_dir)
                }
                other => return Err(format!("unknown runtime {other:?} (runc or shoji)")),
            };
            Ok((n, rt))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if runtimes.is_empty() {
        return Err("name at least one runtime (runc, shoji)".into());
    }
    Ok(Args {
        version,
        runs,
        runtimes,
    })
}

/// min, median, max.
fn summary(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

struct Row {
    runtime: String,
    op: &'static str,
    stats: (Duration, Duration, Duration),
}

/// Measures runtime `name` in its own containerd; rows are appended as each operation completes, so a
/// failure later still leaves the earlier measurements.
async fn bench_runtime(
    version: Version,
    name: &str,
    rt: &Runtime,
    runs: usize,
    rows: &mut Vec<Row>,
) -> scenario::Result<()> {
    let env = Env::start(version, rt, Some(231)).await?;
    let result = measure(&env, name, rt, runs, rows).await;
    env.conclude(result).await
}

async fn measure(
    env: &Env,
    name: &str,
    rt: &Runtime,
    runs: usize,
    rows: &mut Vec<Row>,
) -> scenario::Result<()> {
    let row = |op, samples| Row {
        runtime: name.into(),
        op,
        stats: summary(samples),
    };
    let mut ctr = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let out = scenario::ctr_run(env, &format!("bench-{i}"), &["true"]).await?;
        if !out.status.success() {
            return Err(format!("ctr run failed: {out:?}").into());
        }
        ctr.push(t.elapsed());
    }
    rows.push(row("ctr run --rm true", ctr));
    let cri = env.cri().await?;
    let logs = tempfile::Builder::new()
        .prefix("shoji-bench-logs-")
        .tempdir()?;
    let (mut start, mut stop) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let pod_config = cri::pod_config(&format!("bench-{i}"), "bench", logs.path());
        let t = Instant::now();
        let pod = cri.run_pod(&pod_config, &rt.cri_handler).await?;
        let c = cri::container_config("c", image::BUSYBOX, &["sleep", "1000"]);
        let started = async {
            let id = cri.create_container(&pod, &c, &pod_config).await?;
            cri.start_container(&id).await
        }
        .await;
        start.push(t.elapsed());
        let t = Instant::now();
        let stopped = cri.stop_pod(&pod).await;
        let removed = cri.remove_pod(&pod).await;
        stop.push(t.elapsed());
        started?;
        stopped?;
        removed?;
    }
    rows.push(row("CRI run pod+create+start", start));
    rows.push(row("CRI stop+remove pod", stop));
    rows.push(row(
        "CRI 10 pods at once, each",
        parallel_pods(env, rt, 10, logs.path()).await?,
    ));
    if rt.shim_dir.is_some() {
        breakdown(&env.ctrd.log_text());
        idle_memory(env).await?;
    }
    Ok(())
}

/// Starts `n` pods (RunPodSandbox + CreateContainer + StartContainer) concurrently; returns
/// each pod's start time (the slowest is the wall time of the batch), then removes them.
async fn parallel_pods(
    env: &Env,
    rt: &Runtime,
    n: usize,
    logs: &std::path::Path,
) -> scenario::Result<Vec<Duration>> {
    let cri = env.cri().await?;
    let one = |i: usize| {
        let cri = &cri;
        async move {
            let pod_config = cri::pod_config(&format!("par-{i}"), "bench", logs);
            let t = Instant::now();
            let pod = cri.run_pod(&pod_config, &rt.cri_handler).await?;
            let c = cri::container_config("c", image::BUSYBOX, &["sleep", "1000"]);
            let id = cri.create_container(&pod, &c, &pod_config).await?;
            cri.start_container(&id).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((pod, t.elapsed()))
        }
    };
    let results = futures_util::future::join_all((0..n).map(one)).await;
    let mut times = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok((pod, t)) => {
                times.push(t);
                let _ = cri.stop_pod(&pod).await;
                let _ = cri.remove_pod(&pod).await;
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(times),
    }
}

/// The shim's phase timings (its JSON log lines in containerd's log): median of each.
fn breakdown(log: &str) {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let field = |msg: &str, key: &str| -> Vec<u64> {
        let mut v: Vec<u64> = lines
            .iter()
            .filter(|j| j["msg"] == msg)
            .filter_map(|j| j[key].as_u64())
            .collect();
        v.sort();
        v
    };
    let median = |v: &[u64]| {
        v.get(v.len() / 2)
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "shoji start-up breakdown (median ms over {} sandboxes, from the shim's log):",
        field("sandbox ready", "agent_ready_ms").len()
    );
    for (what, msg, key) in [
        (
            "shim start → Create received",
            "container created",
            "since_shim_start_ms",
        ),
        (
            "VM boot: device daemons ready",
            "sandbox ready",
            "daemons_ready_ms",
        ),
        ("VM boot: VMM running", "sandbox ready", "vmm_running_ms"),
        ("VM boot: agent ready", "sandbox ready", "agent_ready_ms"),
        (
            "Create total (boot + container created)",
            "container created",
            "create_ms",
        ),
        ("Start (process started)", "process started", "start_ms"),
    ] {
        println!("  {what:<42} {:>6}", median(&field(msg, key)));
    }
}

/// Host memory of one idle sandbox: every process in its pod cgroup (shim, VMM, daemons).
async fn idle_memory(env: &Env) -> scenario::Result<()> {
    let id = "bench-idle";
    let out = scenario::ctr_run_detached(env, id, &["sleep", "1000"]).await?;
    if !out.status.success() {
        return Err(format!("ctr run -d failed: {out:?}").into());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let procs = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .map(|root| format!("{root}/{}/{id}/cgroup.procs", scenario::CTR_NAMESPACE))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let kib = |pid: &str, file: &str, key: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
            .unwrap_or(0)
    };
    println!("host memory of one idle sandbox (processes in its pod cgroup):");
    println!("  {:<28} {:>10} {:>10}", "process", "RSS MiB", "PSS MiB");
    let (mut rss, mut pss) = (0, 0);
    for pid in procs.lines() {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let (r, p) = (
            kib(pid, "status", "VmRSS:"),
            kib(pid, "smaps_rollup", "Pss:"),
        );
        rss += r;
        pss += p;
        println!(
            "  {:<28} {:>10.1} {:>10.1}",
            name.trim(),
            r as f64 / 1024.0,
            p as f64 / 1024.0
        );
    }
    println!(
        "  {:<28} {:>10.1} {:>10.1}",
        "total",
        rss as f64 / 1024.0,
        pss as f64 / 1024.0
    );
    for args in [
        &["task", "kill", "-s", "SIGKILL", id][..],
        &["task", "delete", id],
        &["container", "rm", id],
    ] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = env
            .ctrd
            .ctr(scenario::CTR_NAMESPACE, args, Duration::from_secs(60))
            .await;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("bench-ctr: {e}");
        std::process::exit(2);
    });
    let mut rows = Vec::new();
    let mut failed = false;
    for (name, rt) in &args.runtimes {
        let result = bench_runtime(args.version, name, rt, args.runs, &mut rows).await;
        for dir in &rt.run_dirs {
            // Empty after the runtime cleaned up; anything left was reported by Env::finish.
            let _ = std::fs::remove_dir(dir);
        }
        if let Err(e) = result {
            eprintln!("bench-ctr: runtime {name}: {e}");
            failed = true;
        }
    }
    println!(
        "containerd {}, {} runs each, times in ms (ratio: median / first runtime's median)",
        args.version, args.runs
    );
    println!(
        "{:<8} {:<26} {:>7} {:>7} {:>7} {:>6}",
        "runtime", "operation", "min", "median", "max", "ratio"
    );
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.op == r.op)
            .expect("r itself has this op");
        let ratio = r.stats.1.as_secs_f64() / base.stats.1.as_secs_f64();
        println!(
            "{:<8} {:<26} {:>7} {:>7} {:>7} {:>6.2}",
            r.runtime,
            r.op,
            ms(r.stats.0),
            ms(r.stats.1),
            ms(r.stats.2),
            ratio
        );
    }
    if failed {
        std::process::exit(1);
    }
}
