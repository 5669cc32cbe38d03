//! Soak benchmark (`hack/soak.sh`): pod cycles through CRI on a private containerd, each
//! RunPodSandbox → two containers → ExecSync → container log → StopPodSandbox →
//! RemovePodSandbox, with the host checked for leftovers after every cycle (processes,
//! mounts, tap/veth devices, netns, run-dir entries, pod cgroups). Every `--every` cycles it
//! prints the shim's open fds and RSS and the VM processes' RSS (measured while the pod
//! runs), so growth shows.
//!
//! Usage: soak [--cycles N] [--every N] [--containerd 1.7|2] --shim-dir DIR

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use shoji::{procfs, sandbox::State};
use shoji_tests::{
    containerd::Version,
    cri::{self, Cri},
    image,
    scenario::{self, Env, Runtime},
};

type Result<T = ()> = scenario::Result<T>;

struct Sample {
    cycle_ms: u128,
    /// Objects left on the host after the cycle (processes, mounts, devices, netns, dirs).
    leaked: usize,
    shim_fds: usize,
    shim_rss_kib: u64,
    vm_rss_kib: Vec<(String, u64)>,
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Open fds of the shim, its RSS (KiB), and the RSS of each VM process by name.
type Measure = (usize, u64, Vec<(String, u64)>);

/// Measures the running pod's shim and VM processes.
fn measure(run_dir: &Path, pod: &str) -> Result<Measure> {
    let shim = scenario::find_shim(run_dir).ok_or("no shim")? as u32;
    let state = State::read(&run_dir.join(pod))?;
    let vm = state
        .pids
        .iter()
        .filter_map(|p| Some((p.name.clone(), procfs::rss_kib(p.pid)?)))
        .collect();
    Ok((fds(shim), procfs::rss_kib(shim).unwrap_or(0), vm))
}

async fn cycle(env: &Env, cri: &Cri, n: usize, logs: &Path) -> Result<Sample> {
    let started = Instant::now();
    let pod_config = cri::pod_config(&format!("soak-{n}"), "soak", logs);
    let pod = cri.run_pod(&pod_config, &env.runtime.cri_handler).await?;
    let steps = async {
        let mut ids = Vec::new();
        for (name, cmd) in [
            ("sleeper", "exec sleep 1000"),
            ("talker", "echo hello from cycle; exec sleep 1000"),
        ] {
            let c = cri::container_config(name, image::BUSYBOX, &["sh", "-c", cmd]);
            let id = cri.create_container(&pod, &c, &pod_config).await?;
            cri.start_container(&id).await?;
            ids.push(id);
        }
        let out = cri
            .exec_sync(&ids[0], &["echo", "exec-ok"], Duration::from_secs(30))
            .await?;
        if out.exit_code != 0 || out.stdout != "exec-ok\n" {
            return Err(format!("ExecSync: {out:?}").into());
        }
        let log = logs.join("talker.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("hello from cycle")
        {
            if Instant::now() > deadline {
                return Err("the container log never showed the line".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        measure(&env.runtime.run_dirs[0], &pod)
    }
    .await;
    let stop = cri.stop_pod(&pod).await;
    let remove = cri.remove_pod(&pod).await;
    let (shim_fds, shim_rss_kib, vm_rss_kib) = steps?;
    stop?;
    remove?;
    let cycle_ms = started.elapsed().as_millis();
    let _ = std::fs::remove_file(logs.join("sleeper.log"));
    let _ = std::fs::remove_file(logs.join("talker.log"));
    let leaks = env.leaks().await;
    if !leaks.is_empty() {
        eprintln!("cycle {n} left:\n{leaks}");
    }
    Ok(Sample {
        cycle_ms,
        leaked: leaks.count(),
        shim_fds,
        shim_rss_kib,
        vm_rss_kib,
    })
}

fn row(label: &str, samples: &[Sample]) {
    let median = |mut v: Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    let vm = |name: &str| {
        median(
            samples
                .iter()
                .map(|s| {
                    s.vm_rss_kib
                        .iter()
                        .filter(|(n, _)| n == name)
                        .map(|(_, k)| k)
                        .sum::<u64>()
                })
                .collect(),
        ) / 1024
    };
    println!(
        "| {label:>9} | {:>8} | {:>8} | {:>9.1} | {:>8} | {:>9} | {:>9} | {:>5} |",
        median(samples.iter().map(|s| s.cycle_ms as u64).collect()),
        samples.iter().map(|s| s.shim_fds).max().unwrap_or(0),
        median(samples.iter().map(|s| s.shim_rss_kib).collect()) as f64 / 1024.0,
        vm("qemu"),
        vm("virtiofsd"),
        vm("vhost-device-vsock"),
        samples.iter().map(|s| s.leaked).max().unwrap_or(0)
    );
}

#[tokio::main]
async fn main() {
    let mut cycles = 200;
    let mut every = 50;
    let mut version = Version::V2;
    let mut shim_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--cycles" => cycles = v.parse().expect("--cycles N"),
            "--every" => every = v.parse().expect("--every N"),
            "--containerd" => {
                version = if v == "1.7" {
                    Version::V1_7
                } else {
                    Version::V2
                }
            }
            "--shim-dir" => shim_dir = Some(PathBuf::from(v)),
            other => panic!("unknown option {other}"),
        }
    }
    let shim_dir = shim_dir.expect("--shim-dir DIR (where containerd-shim-shoji-v2 is)");
    let run_dir = PathBuf::from(format!("/tmp/shjs{}", std::process::id()));
    let runtime = Runtime::shoji(shim_dir, None, run_dir);
    let env = Env::start(version, &runtime, Some(231))
        .await
        .expect("containerd");
    let cri = env.cri().await.expect("CRI");
    let logs = tempfile::tempdir().expect("log dir");
    println!(
        "soak: {cycles} pod cycles (2 containers, exec, log, stop, remove), leak check after each"
    );
    println!("| cycles    | cycle ms | shim fds | shim RSS  | QEMU RSS | virtiofsd | vsock RSS | leaks |");
    println!("|-----------|----------|----------|-----------|----------|-----------|-----------|-------|");
    let mut batch = Vec::new();
    let mut failure = None;
    let mut leaked = 0;
    for n in 1..=cycles {
        match cycle(&env, &cri, n, logs.path()).await {
            Ok(s) => {
                leaked = leaked.max(s.leaked);
                batch.push(s)
            }
            Err(e) => {
                failure = Some(format!(
                    "cycle {n}: {e}\n--- containerd log tail ---\n{}",
                    env.ctrd.log_tail()
                ));
                break;
            }
        }
        if n % every == 0 {
            row(&format!("{}-{n}", n + 1 - batch.len()), &batch);
            batch.clear();
        }
    }
    if !batch.is_empty() && failure.is_none() {
        row("rest", &batch);
    }
    let finished = env.finish().await;
    if leaked > 0 {
        failure.get_or_insert(format!("{leaked} objects left on the host"));
    }
    if let Some(f) = failure {
        eprintln!("soak FAILED: {f}");
        std::process::exit(1);
    }
    if let Err(e) = finished {
        eprintln!("soak FAILED at the end: {e}");
        std::process::exit(1);
    }
    println!(
        "(MiB; shim fds: the most seen in the batch; leaks: the most objects left after a cycle)"
    );
}
