//! `shoji metrics`: the node's sandboxes in the Prometheus text format (0.0.4), one scrape
//! at a time ([`http`] serves them). Each scrape reads every sandbox's ledger and `/proc`
//! ([`crate::node`]), the agent call figures its shim wrote ([`crate::call_stats`]), and
//! asks each running sandbox's agent for the guest's memory and its containers' cgroup
//! figures over the sandbox's vsock socket, each sandbox within [`GUEST_TIMEOUT`]. Every
//! per-sandbox series is labelled `sandbox_id`, `pod_namespace`, `pod_name`.
pub mod http;

use std::time::{Duration, Instant};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, MetricType, TypedMetric},
    registry::Registry,
};
use shoji_agent_api::types::{ContainerStatsResponse, GuestDetailsResponse};

use crate::{
    agent_client::AgentClient,
    call_stats::{self, CallStat, LATENCY_BUCKETS},
    node::{self, SandboxView, Status},
};

/// How long one sandbox's agent may take to answer a scrape (connect, GuestDetails, the
/// containers' stats): a stuck guest costs its own series, never the scrape.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Most containers of one sandbox asked about per scrape.
const MAX_CONTAINERS: usize = 64;

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;
type CounterF = Counter<f64, std::sync::atomic::AtomicU64>;

/// What a running sandbox's agent said.
struct GuestSample {
    details: GuestDetailsResponse,
    containers: Vec<(String, ContainerStatsResponse)>,
}

/// One scrape of the node: every sandbox under `run_dir`, as Prometheus text.
pub async fn scrape(run_dir: &std::path::Path) -> String {
    let began = Instant::now();
    let views = node::sandboxes(run_dir);
    let mut guests = tokio::task::JoinSet::new();
    for (i, v) in views.iter().enumerate() {
        if v.status == Status::Running && v.state.boot.is_some() {
            let (dir, containers) = (v.dir.clone(), v.state.containers.clone());
            guests.spawn(async move {
                let sample = tokio::time::timeout(GUEST_TIMEOUT, guest(dir, containers)).await;
                (i, sample.ok().flatten())
            });
        }
    }
    let mut samples: Vec<Option<GuestSample>> = views.iter().map(|_| None).collect();
    while let Some(Ok((i, sample))) = guests.join_next().await {
        samples[i] = sample;
    }
    let mut m = Metrics::new();
    for (v, sample) in views.iter().zip(&samples) {
        m.sandbox(v, sample.as_ref());
    }
    m.scrape_seconds.set(began.elapsed().as_secs_f64());
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry)
        .expect("encoding into a String");
    text
}

/// Asks a sandbox's agent about the guest and its containers.
async fn guest(dir: std::path::PathBuf, containers: Vec<String>) -> Option<GuestSample> {
    let agent = AgentClient::connect(&crate::sandbox::agent_socket(&dir), GUEST_TIMEOUT)
        .await
        .ok()?;
    let details = agent.guest_details().await.ok()?;
    let mut stats = Vec::new();
    for id in containers.into_iter().take(MAX_CONTAINERS) {
        if let Ok(s) = agent.container_stats(&id).await {
            stats.push((id, s));
        }
    }
    Some(GuestSample {
        details,
        containers: stats,
    })
}

/// The metric families of one scrape.
struct Metrics {
    registry: Registry,
    sandboxes: Family<Labels, GaugeF>,
    info: Family<Labels, GaugeF>,
    vcpus: Family<Labels, GaugeF>,
    memory: Family<Labels, GaugeF>,
    start_time: Family<Labels, GaugeF>,
    containers: Family<Labels, GaugeF>,
    boot_phase: Family<Labels, GaugeF>,
    rss: Family<Labels, GaugeF>,
    pss: Family<Labels, GaugeF>,
    guest_up: Family<Labels, GaugeF>,
    guest_mem_total: Family<Labels, GaugeF>,
    guest_mem_used: Family<Labels, GaugeF>,
    agent_rss: Family<Labels, GaugeF>,
    container_cpu: Family<Labels, CounterF>,
    container_mem: Family<Labels, GaugeF>,
    container_ws: Family<Labels, GaugeF>,
    container_pids: Family<Labels, GaugeF>,
    container_ooms: Family<Labels, CounterF>,
    agent_calls: Family<Labels, FixedHistogram>,
    agent_errors: Family<Labels, CounterF>,
    scrape_seconds: GaugeF,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("shoji");
        macro_rules! family {
            ($name:expr, $help:expr) => {{
                let f = Family::default();
                registry.register($name, $help, f.clone());
                f
            }};
        }
        let scrape_seconds = GaugeF::default();
        let m = Metrics {
            sandboxes: family!("sandboxes", "Sandboxes on this node, by state"),
            info: family!(
                "sandbox_info",
                "A sandbox: its VM (hypervisor, accelerator) and state (always 1)"
            ),
            vcpus: family!("sandbox_vcpus", "vCPUs of the sandbox's VM"),
            memory: family!("sandbox_memory_bytes", "Guest memory of the sandbox's VM"),
            start_time: family!(
                "sandbox_start_time_seconds",
                "When the sandbox's boot began (Unix time)"
            ),
            containers: family!("sandbox_containers", "Containers in the sandbox's guest"),
            boot_phase: family!(
                "sandbox_boot_phase_seconds",
                "Time from the boot's start to each phase: daemons_ready, vmm_running, agent_ready"
            ),
            rss: family!(
                "sandbox_process_rss_bytes",
                "Resident memory of the sandbox's host processes (VMM, virtiofsd, vsock back-end)"
            ),
            pss: family!(
                "sandbox_process_pss_bytes",
                "Proportional memory of the sandbox's host processes"
            ),
            guest_up: family!(
                "sandbox_guest_up",
                "1 when the sandbox's agent answered this scrape"
            ),
            guest_mem_total: family!("guest_memory_total_bytes", "Memory the guest kernel sees"),
            guest_mem_used: family!(
                "guest_memory_used_bytes",
                "Guest memory in use (MemTotal - MemAvailable)"
            ),
            agent_rss: family!(
                "guest_agent_rss_bytes",
                "Resident memory of the guest agent"
            ),
            container_cpu: family!(
                "container_cpu_usage_seconds",
                "CPU time of a container in the guest (its cgroup)"
            ),
            container_mem: family!(
                "container_memory_usage_bytes",
                "Memory of a container in the guest (its cgroup)"
            ),
            container_ws: family!(
                "container_memory_working_set_bytes",
                "Working set of a container in the guest (usage minus inactive file pages)"
            ),
            container_pids: family!("container_pids", "Processes of a container in the guest"),
            container_ooms: family!(
                "container_oom_kills",
                "OOM kills in a container's guest cgroup"
            ),
            agent_calls: family!(
                "agent_call_duration_seconds",
                "Latency of the shim's calls to the sandbox's agent, by call"
            ),
            agent_errors: family!(
                "agent_call_errors",
                "Failed calls of the shim to the sandbox's agent, by call"
            ),
            scrape_seconds: {
                registry.register(
                    "scrape_duration_seconds",
                    "How long this scrape took",
                    scrape_seconds.clone(),
                );
                scrape_seconds
            },
            registry,
        };
        for s in [
            Status::Running,
            Status::Starting,
            Status::Orphaned,
            Status::Dead,
        ] {
            m.sandboxes
                .get_or_create(&vec![("state".into(), s.as_str().into())])
                .set(0.0);
        }
        m
    }

    /// Adds one sandbox's series.
    fn sandbox(&mut self, v: &SandboxView, guest: Option<&GuestSample>) {
        let info = v.state.info.as_ref();
        let base: Labels = vec![
            ("sandbox_id".into(), v.id.clone()),
            (
                "pod_namespace".into(),
                info.and_then(|i| i.pod_namespace.clone())
                    .unwrap_or_default(),
            ),
            (
                "pod_name".into(),
                info.and_then(|i| i.pod_name.clone()).unwrap_or_default(),
            ),
        ];
        let with = |extra: &[(&str, &str)]| -> Labels {
            let mut l = base.clone();
            l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            l
        };
        let set = |f: &Family<Labels, GaugeF>, labels: &Labels, value: f64| {
            f.get_or_create(labels).set(value);
        };
        self.sandboxes
            .get_or_create(&vec![("state".into(), v.status.as_str().into())])
            .inc_by(1.0);
        let name = |x: Option<String>| x.unwrap_or_default();
        let hypervisor = name(info.and_then(|i| enum_name(&i.hypervisor)));
        let accel = name(info.and_then(|i| i.accel.and_then(|a| enum_name(&a))));
        set(
            &self.info,
            &with(&[
                ("hypervisor", &hypervisor),
                ("accel", &accel),
                ("state", v.status.as_str()),
            ]),
            1.0,
        );
        if let Some(i) = info {
            set(&self.vcpus, &base, i.vcpus.into());
            set(&self.memory, &base, (i.memory_mib << 20) as f64);
            set(&self.start_time, &base, i.started_unix as f64);
        }
        set(&self.containers, &base, v.state.containers.len() as f64);
        if let Some(b) = v.state.boot {
            for (phase, ms) in [
                ("daemons_ready", b.daemons_ready_ms),
                ("vmm_running", b.vmm_running_ms),
                ("agent_ready", b.agent_ready_ms),
            ] {
                set(&self.boot_phase, &with(&[("phase", phase)]), ms / 1000.0);
            }
        }
        for p in &v.processes {
            let labels = with(&[("process", &p.name)]);
            self.rss
                .get_or_create(&labels)
                .inc_by((p.rss_kib * 1024) as f64);
            self.pss
                .get_or_create(&labels)
                .inc_by((p.pss_kib * 1024) as f64);
        }
        for (call, stat) in call_stats::read(&v.dir) {
            let labels = with(&[("call", &call)]);
            self.agent_errors
                .get_or_create(&labels)
                .inc_by(stat.errors as f64);
            self.agent_calls.get_or_create(&labels).set(stat);
        }
        if v.status != Status::Running {
            return;
        }
        set(&self.guest_up, &base, f64::from(u8::from(guest.is_some())));
        let Some(g) = guest else {
            return;
        };
        set(
            &self.guest_mem_total,
            &base,
            g.details.mem_total_bytes as f64,
        );
        set(&self.guest_mem_used, &base, g.details.mem_used_bytes as f64);
        set(&self.agent_rss, &base, g.details.agent_rss_bytes as f64);
        for (id, s) in &g.containers {
            let labels = with(&[("container", id)]);
            self.container_cpu
                .get_or_create(&labels)
                .inc_by(s.cpu_usage_usec as f64 / 1e6);
            set(&self.container_mem, &labels, s.memory_usage_bytes as f64);
            set(
                &self.container_ws,
                &labels,
                s.memory_working_set_bytes as f64,
            );
            set(&self.container_pids, &labels, s.pids_current as f64);
            self.container_ooms
                .get_or_create(&labels)
                .inc_by(s.oom_kill_count as f64);
        }
    }
}

/// How serde names an enum value (`qemu`, `tcg`).
fn enum_name<T: serde::Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v).ok()?.as_str().map(String::from)
}

/// A histogram whose buckets were counted elsewhere (by the shim, [`CallStat`]).
#[derive(Debug, Default)]
struct FixedHistogram(std::sync::Mutex<CallStat>);

impl FixedHistogram {
    fn set(&self, stat: CallStat) {
        *self.0.lock().unwrap() = stat;
    }
}

impl TypedMetric for FixedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for FixedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let stat = self.0.lock().unwrap();
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(stat.buckets.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(stat.seconds_sum, stat.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_empty_node_has_no_sandbox_series() {
        let dir = std::env::temp_dir().join(format!("shoji-metrics-{}", std::process::id()));
        let text = scrape(&dir).await;
        assert!(
            text.contains("shoji_sandboxes{state=\"running\"} 0"),
            "{text}"
        );
        assert!(!text.contains("sandbox_id"), "{text}");
        assert!(
            text.contains("# TYPE shoji_scrape_duration_seconds gauge"),
            "{text}"
        );
    }
}
