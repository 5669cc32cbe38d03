//! `shoji vm bench`: boot VMs one after another and measure start-up and memory.
use std::time::{Duration, Instant};

use slog::Logger;

use super::{sandbox_config, throwaway_id, CliError};
use crate::{config::Config, procfs, sandbox::Sandbox};

/// One boot measured by [`bench_once`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootSample {
    /// VMM launch (its device daemons already up) → the agent announced itself.
    pub vmm_to_ready_ms: f64,
    /// `Sandbox::start` called → the agent answered its first call (the host's whole cost).
    pub start_to_answer_ms: f64,
    /// CPU time the VMM had used when the agent answered: under TCG the boot's cost
    /// independent of how busy the host is (wall-clock times grow with the host's load).
    pub vmm_cpu_ms: f64,
    /// Median round trip of an agent call that does no work (Health), over
    /// [`ROUND_TRIPS`] calls on the idle VM: the floor under every shim → agent call.
    pub agent_round_trip_ms: f64,
    pub agent_rss_kib: u64,
    pub guest_used_kib: u64,
    pub guest_total_kib: u64,
    /// Host RSS of each process of the VM, by name.
    pub host_rss_kib: Vec<(String, u64)>,
}

/// Calls timed for [`BootSample::agent_round_trip_ms`].
const ROUND_TRIPS: usize = 20;

/// Boots a VM, measures it, stops it.
pub async fn bench_once(config: Config, log: Logger) -> Result<BootSample, CliError> {
    let id = throwaway_id("bench");
    let started = Instant::now();
    let sandbox = Sandbox::start(sandbox_config(config, &id, None, None), log).await?;
    let measured = async {
        sandbox.agent().health().await?;
        let start_to_answer_ms = ms(started.elapsed());
        let vmm_cpu_ms = procfs::cpu_time(sandbox.vmm_pid()).map(ms).unwrap_or(0.0);
        let t = sandbox.boot_times();
        // Let the guest settle (lazy work after boot) before reading memory figures.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut trips = Vec::with_capacity(ROUND_TRIPS);
        for _ in 0..ROUND_TRIPS {
            let t = Instant::now();
            sandbox.agent().health().await?;
            trips.push(ms(t.elapsed()));
        }
        trips.sort_by(f64::total_cmp);
        let details = sandbox.agent().guest_details().await?;
        let host_rss_kib = procfs::with_children(&sandbox.pids())
            .into_iter()
            .filter_map(|pid| Some((procfs::name(pid)?, procfs::rss_kib(pid)?)))
            .collect();
        Ok::<_, CliError>(BootSample {
            vmm_to_ready_ms: ms(t.agent_ready - t.daemons_ready),
            start_to_answer_ms,
            vmm_cpu_ms,
            agent_round_trip_ms: trips[ROUND_TRIPS / 2],
            agent_rss_kib: details.agent_rss_bytes / 1024,
            guest_used_kib: details.mem_used_bytes / 1024,
            guest_total_kib: details.mem_total_bytes / 1024,
            host_rss_kib,
        })
    }
    .await;
    sandbox.stop().await?;
    measured
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// min / median / max of each figure over the samples, as a Markdown table.
pub fn bench_table(samples: &[BootSample]) -> String {
    fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }
    if samples.is_empty() {
        return String::new();
    }
    let mib = |k: u64| k as f64 / 1024.0;
    let mut rows: Vec<(String, &str, Vec<f64>)> = vec![
        (
            "VMM launch → agent ready".into(),
            "ms",
            samples.iter().map(|s| s.vmm_to_ready_ms).collect(),
        ),
        (
            "sandbox start → agent answers".into(),
            "ms",
            samples.iter().map(|s| s.start_to_answer_ms).collect(),
        ),
        (
            "VMM CPU time until ready".into(),
            "ms",
            samples.iter().map(|s| s.vmm_cpu_ms).collect(),
        ),
        (
            "agent call round trip (Health, median)".into(),
            "ms",
            samples.iter().map(|s| s.agent_round_trip_ms).collect(),
        ),
        (
            "agent RSS (guest)".into(),
            "MiB",
            samples.iter().map(|s| mib(s.agent_rss_kib)).collect(),
        ),
        (
            "guest used memory".into(),
            "MiB",
            samples.iter().map(|s| mib(s.guest_used_kib)).collect(),
        ),
    ];
    let mut names: Vec<&str> = samples
        .iter()
        .flat_map(|s| s.host_rss_kib.iter().map(|(n, _)| n.as_str()))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let values = samples
            .iter()
            .map(|s| {
                s.host_rss_kib
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, k)| mib(*k))
                    .sum()
            })
            .collect();
        rows.push((format!("host RSS: {name}"), "MiB", values));
    }
    let mut out = format!(
        "| figure ({} runs) | unit | min | median | max |\n|---|---|---|---|---|\n",
        samples.len()
    );
    for (name, unit, values) in rows {
        let (min, med, max) = stats(values);
        out += &format!("| {name} | {unit} | {min:.1} | {med:.1} | {max:.1} |\n");
    }
    out
}
