//! The guest's cgroup figures of a container as containerd's cgroup v2 `Metrics`.
use containerd_shim_protos::{
    cgroups_v2::metrics::{CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat},
    protobuf::MessageField,
};
use shoji_agent_api::types::ContainerStatsResponse;

pub fn metrics(s: &ContainerStatsResponse) -> Metrics {
    Metrics {
        pids: MessageField::some(PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            max_usage: s.memory_max_usage_bytes,
            anon: s.memory_rss_bytes,
            file: s.memory_cache_bytes,
            // The working set (what kubelet reports) is usage minus inactive file pages.
            inactive_file: s
                .memory_usage_bytes
                .saturating_sub(s.memory_working_set_bytes),
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents {
            oom_kill: s.oom_kill_count,
            ..Default::default()
        }),
        ..Default::default()
    }
}
