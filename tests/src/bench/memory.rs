//! Host memory of one idle container (its processes and its runtime's shim), alone and with
//! others idle beside it, and how many such pods the host's memory would hold.
use std::time::Duration;

use shoji::procfs;

use crate::scenario::{self, Env, CTR_NAMESPACE};

/// One process's share of an idle pod.
pub struct Usage {
    pub name: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// The processes of an idle `ctr run -d` container `id`: those in its cgroup, and the shim
/// serving it (runc's shim stays outside the container's cgroup; shoji's shim is in it).
pub async fn idle_pod(env: &Env, id: &str) -> scenario::Result<Vec<Usage>> {
    Ok(idle_pods(env, &[id]).await?.remove(0))
}

/// [`idle_pod`] for several containers idle at once: what each holds while the others run
/// (PSS shares the pages they have in common, e.g. the VMM binary and the guest kernel).
pub async fn idle_pods(env: &Env, ids: &[&str]) -> scenario::Result<Vec<Vec<Usage>>> {
    let mut started = Vec::new();
    let mut result = Ok(());
    for id in ids {
        match scenario::ctr_run_detached(env, id, &["sleep", "1000"]).await {
            Ok(out) if out.status.success() => started.push(*id),
            Ok(out) => {
                result = Err(format!("ctr run -d failed: {out:?}").into());
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        // Let boots and lazy work settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let usage = started.iter().map(|id| usage_of(id)).collect();
    for id in started {
        remove(env, id).await;
    }
    result.map(|()| usage)
}

fn usage_of(id: &str) -> Vec<Usage> {
    let in_cgroup = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .map(|root| format!("{root}/{CTR_NAMESPACE}/{id}/cgroup.procs"))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let mut pids: Vec<u32> = in_cgroup.lines().filter_map(|l| l.parse().ok()).collect();
    let marker = format!("-id {id} ");
    pids.extend(procfs::all_pids().into_iter().filter(|p| {
        procfs::cmdline(*p).is_some_and(|c| c.contains("containerd-shim") && c.contains(&marker))
    }));
    pids.sort();
    pids.dedup();
    pids.into_iter()
        .filter_map(|p| {
            Some(Usage {
                name: procfs::name(p)?,
                rss_kib: procfs::rss_kib(p)?,
                pss_kib: procfs::pss_kib(p).unwrap_or(0),
            })
        })
        .collect()
}

async fn remove(env: &Env, id: &str) {
    for args in [
        &["task", "kill", "-s", "SIGKILL", id][..],
        &["task", "delete", id],
        &["container", "rm", id],
    ] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = env
            .ctrd
            .ctr(CTR_NAMESPACE, args, Duration::from_secs(60))
            .await;
    }
}

/// The host's memory in KiB.
pub fn host_memory_kib() -> u64 {
    shoji::procfs::mem_total_kib().unwrap_or(0)
}

/// The per-process table of one runtime's idle pod, with totals and the density it allows.
pub fn report(runtime: &str, usage: &[Usage]) -> String {
    let mib = |k: u64| k as f64 / 1024.0;
    let mut out =
        format!("{runtime}: host memory of one idle container (its cgroup and its shim)\n");
    out += &format!("  {:<24} {:>9} {:>9}\n", "process", "RSS MiB", "PSS MiB");
    for u in usage {
        out += &format!(
            "  {:<24} {:>9.1} {:>9.1}\n",
            u.name,
            mib(u.rss_kib),
            mib(u.pss_kib)
        );
    }
    let (rss, pss): (u64, u64) = (
        usage.iter().map(|u| u.rss_kib).sum(),
        usage.iter().map(|u| u.pss_kib).sum(),
    );
    out += &format!("  {:<24} {:>9.1} {:>9.1}\n", "total", mib(rss), mib(pss));
    out += &density("alone", pss);
    out
}

/// The density line for `pss_kib` per pod.
fn density(how: &str, pss_kib: u64) -> String {
    let pods = host_memory_kib().checked_div(pss_kib).unwrap_or(0);
    format!(
        "  density ({how}, {:.1} MiB PSS each): {pods} idle pods in the host's {:.1} GiB (the host's own use left out)\n",
        pss_kib as f64 / 1024.0,
        host_memory_kib() as f64 / (1 << 20) as f64
    )
}

/// The PSS per pod of `pods` idle at once, and the density that gives.
pub fn report_together(pods: &[Vec<Usage>]) -> String {
    let total: u64 = pods.iter().flatten().map(|u| u.pss_kib).sum();
    let n = pods.len().max(1) as u64;
    density(&format!("{n} at once"), total / n)
}
