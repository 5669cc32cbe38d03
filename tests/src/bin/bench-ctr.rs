//! Side-by-side benchmark of container runtimes through a private containerd (`hack/bench-ctr.sh`):
//! `ctr run --rm <busybox> true`; CRI RunPodSandbox + CreateContainer + StartContainer, ExecSync,
//! StopPodSandbox + RemovePodSandbox, 10 pods at once; a container's stdout throughput; `dd` in
//! its filesystem and in a volume (and on the host); idle memory and pod density. Each `--runs`
//! times; prints min/median/max and the median's ratio to the first runtime, the shim's start-up
//! breakdown, and (with `--plot FILE`) an SVG of the ratios.
//!
//! Usage: bench-ctr [--containerd 1.7|2] [--runs N] [--shim-dir DIR] [--shoji-config FILE]
//! [--plot FILE] RUNTIME... where RUNTIME is `runc` or `shoji` (shoji needs --shim-dir).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shoji_tests::bench::{self, io, memory, plot, Row};
use shoji_tests::containerd::Version;
use shoji_tests::cri;
use shoji_tests::image;
use shoji_tests::scenario::{self, Env, Runtime};

struct Args {
    version: Version,
    runs: usize,
    runtimes: Vec<(String, Runtime)>,
    plot: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut version = Version::V2;
    let mut runs = 10;
    let mut shim_dir = None;
    let mut shoji_config = None;
    let mut plot = None;
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
            "--plot" => plot = Some(PathBuf::from(value()?)),
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
        plot,
    })
}

/// Measures runtime `name` in its own containerd; rows are appended as each operation completes, so a
/// failure later still leaves the earlier measurements.
async fn bench_runtime(
    version: Version,
    name: &str,
    rt: &Runtime,
    runs: usize,
    rows: &mut Vec<Row>,
    reports: &mut Vec<String>,
) -> scenario::Result<()> {
    let env = Env::start(version, rt, Some(231)).await?;
    let result = async {
        let at_once = measure(&env, name, rt, runs, rows).await?;
        throughput(&env, name, runs, rows).await?;
        let mut report = memory::report(name, &memory::idle_pod(&env, "bench-idle").await?);
        let together = [
            "bench-idle-1",
            "bench-idle-2",
            "bench-idle-3",
            "bench-idle-4",
        ];
        report += &memory::report_together(&memory::idle_pods(&env, &together).await?);
        reports.push(report);
        if rt.shim_dir.is_some() {
            // One median over both kinds of sandbox would land in either group by chance.
            let log = env.ctrd.log_text();
            let alone = [log.get(..at_once.start), log.get(at_once.end..)];
            let alone: String = alone.into_iter().flatten().collect();
            reports.push(breakdown("started one at a time", &alone));
            let at_once = log.get(at_once).unwrap_or_default();
            reports.push(breakdown("started 10 at once", at_once));
        }
        Ok(())
    }
    .await;
    env.conclude(result).await
}

/// stdout throughput and `dd` in the container's filesystem and in a volume.
async fn throughput(
    env: &Env,
    name: &str,
    runs: usize,
    rows: &mut Vec<Row>,
) -> scenario::Result<()> {
    let volume = tempfile::Builder::new()
        .prefix("shoji-bench-vol-")
        .tempdir()?;
    let id = "bench-io";
    let mount = format!(
        "type=bind,src={},dst=/vol,options=rbind:rw",
        volume.path().display()
    );
    let config = env
        .runtime
        .config_path
        .as_ref()
        .map(|p| p.display().to_string());
    let mut args = vec![
        "run",
        "-d",
        "--runtime",
        &env.runtime.runtime_type,
        "--mount",
        &mount,
    ];
    if let Some(c) = &config {
        args.extend(["--runtime-config-path", c]);
    }
    args.extend([image::BUSYBOX, id, "sleep", "1000"]);
    let out = env
        .ctrd
        .ctr(scenario::CTR_NAMESPACE, &args, Duration::from_secs(120))
        .await?;
    if !out.status.success() {
        return Err(format!("ctr run -d (io): {out:?}").into());
    }
    let (mut small, mut large, mut root, mut vol) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        small.push(io::stdout_rate(env, id, i, io::Piece::Small).await?);
        large.push(io::stdout_rate(env, id, i, io::Piece::Large).await?);
        root.push(io::dd_rates(env, id, "/bench.dat", i).await?);
        vol.push(io::dd_rates(env, id, "/vol/bench.dat", i + runs).await?);
    }
    rows.push(Row::rates(
        name,
        "stdout, 4 KiB writes (ctr exec head -c)",
        small,
    ));
    rows.push(Row::rates(
        name,
        "stdout, 64 KiB writes (ctr exec dd)",
        large,
    ));
    for (write_op, read_op, rates) in [
        (
            "write, container filesystem (fsync)",
            "read, container filesystem",
            &root,
        ),
        ("write, volume (fsync)", "read, volume", &vol),
    ] {
        let (write, read) = rates.iter().copied().unzip();
        rows.push(Row::rates(name, write_op, write));
        rows.push(Row::rates(name, read_op, read));
    }
    for args in [
        &["task", "kill", "-s", "SIGKILL", id][..],
        &["task", "delete", id],
        &["container", "rm", id],
    ] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = env
            .ctrd
            .ctr(scenario::CTR_NAMESPACE, args, Duration::from_secs(60))
            .await;
    }
    Ok(())
}

/// Returns where the 10 pods started at once are in containerd's log (a byte range).
async fn measure(
    env: &Env,
    name: &str,
    rt: &Runtime,
    runs: usize,
    rows: &mut Vec<Row>,
) -> scenario::Result<std::ops::Range<usize>> {
    let row = |op, samples| Row::times(name, op, samples);
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
    let (mut start, mut stop, mut exec) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let pod_config = cri::pod_config(&format!("bench-{i}"), "bench", logs.path());
        let t = Instant::now();
        let pod = cri.run_pod(&pod_config, &rt.cri_handler).await?;
        let c = cri::container_config("c", image::BUSYBOX, &["sleep", "1000"]);
        let started = async {
            let id = cri.create_container(&pod, &c, &pod_config).await?;
            cri.start_container(&id).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(id)
        }
        .await;
        start.push(t.elapsed());
        if let Ok(id) = &started {
            for _ in 0..3 {
                let t = Instant::now();
                let out = cri
                    .exec_sync(id, &["true"], Duration::from_secs(30))
                    .await?;
                if out.exit_code != 0 {
                    return Err(format!("ExecSync true: {out:?}").into());
                }
                exec.push(t.elapsed());
            }
        }
        let t = Instant::now();
        let stopped = cri.stop_pod(&pod).await;
        let removed = cri.remove_pod(&pod).await;
        stop.push(t.elapsed());
        started?;
        stopped?;
        removed?;
    }
    rows.push(row("CRI run pod+create+start", start));
    rows.push(row("CRI ExecSync true", exec));
    rows.push(row("CRI stop+remove pod", stop));
    let from = env.ctrd.log_len();
    rows.push(row(
        "CRI 10 pods at once, each",
        parallel_pods(env, rt, 10, logs.path()).await?,
    ));
    Ok(from..env.ctrd.log_len())
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

/// The shim's phase timings (its JSON log lines in containerd's log): median of each, for
/// the sandboxes `which` names.
fn breakdown(which: &str, log: &str) -> String {
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
    let mut out = format!(
        "shoji start-up breakdown (median ms over {} sandboxes {which}, from the shim's log):\n",
        field("sandbox ready", "agent_ready_ms").len()
    );
    for (what, msg, key) in [
        (
            "shim start → first container created",
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
        ("Stop: VMM gone", "sandbox stopped", "vmm_stopped_ms"),
        (
            "Stop: host resources released",
            "sandbox stopped",
            "released_ms",
        ),
    ] {
        out += &format!("  {what:<42} {:>6}\n", median(&field(msg, key)));
    }
    out
}

#[tokio::main]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("bench-ctr: {e}");
        std::process::exit(2);
    });
    let mut rows = Vec::new();
    let mut reports = Vec::new();
    let mut failed = false;
    for (name, rt) in &args.runtimes {
        let result =
            bench_runtime(args.version, name, rt, args.runs, &mut rows, &mut reports).await;
        for dir in &rt.run_dirs {
            // Empty after the runtime cleaned up; anything left was reported by Env::finish.
            let _ = std::fs::remove_dir(dir);
        }
        if let Err(e) = result {
            eprintln!("bench-ctr: runtime {name}: {e}");
            failed = true;
        }
    }
    let host = tempfile::tempdir().expect("temp dir");
    match io::host_dd_rates(host.path()).await {
        Ok((w, r)) => reports.push(format!(
            "host baseline (same dd on the host's {}): write {w:.0} MB/s, read {r:.0} MB/s",
            host.path().display()
        )),
        Err(e) => eprintln!("bench-ctr: host dd: {e}"),
    }
    for r in &reports {
        println!("{r}");
    }
    println!(
        "containerd {}, {} runs each (ratio: how many times slower than the first runtime)",
        args.version, args.runs
    );
    print!("{}", bench::table(&rows));
    if let (Some(path), Some((name, _))) = (&args.plot, args.runtimes.get(1)) {
        let title = format!(
            "{name} vs {}: how many times slower (log scale)",
            args.runtimes[0].0
        );
        if let Err(e) = std::fs::write(path, plot::svg(&rows, name, &title)) {
            eprintln!("bench-ctr: writing {}: {e}", path.display());
        }
    }
    if failed {
        std::process::exit(1);
    }
}
