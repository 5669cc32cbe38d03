//! `shoji ps`: every sandbox on the node, one line each (or one JSON document).
use serde::Serialize;

use crate::{
    node::{ProcessMemory, SandboxView, Status},
    sandbox::BootRecord,
};

/// One sandbox as `shoji ps --json` prints it.
#[derive(Debug, Serialize)]
pub struct PsEntry<'a> {
    pub id: &'a str,
    pub pod_namespace: Option<&'a str>,
    pub pod_name: Option<&'a str>,
    pub hypervisor: Option<crate::hypervisor::HypervisorKind>,
    pub accel: Option<crate::hypervisor::Accel>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub started_unix: Option<u64>,
    pub uptime_secs: u64,
    pub containers: &'a [String],
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub processes: &'a [ProcessMemory],
    pub boot: Option<BootRecord>,
    pub debug_console: bool,
    pub state: Status,
    pub hint: Option<&'a str>,
}

impl<'a> PsEntry<'a> {
    pub fn new(v: &'a SandboxView) -> PsEntry<'a> {
        let info = v.state.info.as_ref();
        PsEntry {
            id: &v.id,
            pod_namespace: info.and_then(|i| i.pod_namespace.as_deref()),
            pod_name: info.and_then(|i| i.pod_name.as_deref()),
            hypervisor: info.map(|i| i.hypervisor),
            accel: info.and_then(|i| i.accel),
            vcpus: info.map(|i| i.vcpus),
            memory_mib: info.map(|i| i.memory_mib),
            started_unix: info.map(|i| i.started_unix),
            uptime_secs: v.uptime_secs,
            containers: &v.state.containers,
            rss_kib: v.rss_kib(),
            pss_kib: v.pss_kib(),
            processes: &v.processes,
            boot: v.state.boot,
            debug_console: info.is_some_and(|i| i.debug_console),
            state: v.status,
            hint: v.hint.as_deref(),
        }
    }
}

/// The sandboxes as one JSON array.
pub fn json(views: &[SandboxView]) -> String {
    let entries: Vec<PsEntry> = views.iter().map(PsEntry::new).collect();
    serde_json::to_string_pretty(&entries).expect("ps entries serialize")
}

/// The sandboxes as a table; ids cut to 12 characters unless `full_ids`.
pub fn table(views: &[SandboxView], full_ids: bool) -> String {
    let mut rows = vec![[
        "SANDBOX",
        "POD",
        "VM",
        "VCPUS",
        "MEMORY",
        "UPTIME",
        "CONTAINERS",
        "RSS",
        "PSS",
        "STATE",
    ]
    .map(String::from)];
    let mut hints = Vec::new();
    for v in views {
        let e = PsEntry::new(v);
        let id = if full_ids {
            e.id.to_string()
        } else {
            e.id.chars().take(12).collect()
        };
        let pod = match (e.pod_namespace, e.pod_name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            (None, Some(name)) => name.to_string(),
            _ => "-".into(),
        };
        let vm = match (e.hypervisor, e.accel) {
            (Some(h), Some(a)) => format!("{}/{}", lower(&h), lower(&a)),
            (Some(h), None) => lower(&h),
            _ => "-".into(),
        };
        let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        let alive = matches!(e.state, Status::Running | Status::Orphaned);
        rows.push([
            id,
            pod,
            vm,
            dash(e.vcpus.map(|n| n.to_string())),
            dash(e.memory_mib.map(|m| format!("{m}MiB"))),
            if alive && e.started_unix.is_some() {
                duration(e.uptime_secs)
            } else {
                "-".into()
            },
            e.containers.len().to_string(),
            mib(e.rss_kib),
            mib(e.pss_kib),
            e.state.as_str().to_string(),
        ]);
        if let Some(h) = e.hint {
            hints.push(format!("sandbox {} is {}: {h}", e.id, e.state.as_str()));
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    for h in hints {
        out += &h;
        out.push('\n');
    }
    out
}

/// How serde names an enum value (`qemu`, `tcg`).
fn lower<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn mib(kib: u64) -> String {
    if kib == 0 {
        "-".into()
    } else {
        format!("{:.1}MiB", kib as f64 / 1024.0)
    }
}

/// `3d4h`, `2h5m`, `4m10s`, `9s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(9), "9s");
        assert_eq!(duration(250), "4m10s");
        assert_eq!(duration(7500), "2h5m");
        assert_eq!(duration(3 * 86400 + 4 * 3600 + 1), "3d4h");
    }

    #[test]
    fn an_empty_node_has_a_header_only() {
        assert_eq!(
            table(&[], false),
            "SANDBOX  POD  VM  VCPUS  MEMORY  UPTIME  CONTAINERS  RSS  PSS  STATE\n"
        );
        assert_eq!(json(&[]), "[]");
    }
}
