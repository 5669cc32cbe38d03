//! How long the shim's agent calls take and how many fail, per call: counted by
//! [`crate::agent_client::AgentClient`] (a lock and a few additions per call), written by
//! the sandbox to `<sandbox dir>/agent-calls.json` every [`PERSIST_EVERY`] while it runs,
//! and served by `shoji metrics` as a histogram per call. Long polls (WaitProcess,
//! WaitOomEvent) are not counted: they last until something happens.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::hypervisor::VmExit;

/// The file in the sandbox directory.
pub const CALL_STATS_FILE: &str = "agent-calls.json";
/// Upper bounds (seconds) of the latency buckets; one more bucket holds the rest.
pub const LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];
/// How often the counts reach the file.
const PERSIST_EVERY: Duration = Duration::from_secs(5);
/// The file is the shim's, but `shoji metrics` reads it: bounded all the same.
const FILE_MAX: u64 = 64 << 10;

/// The calls of one name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallStat {
    pub count: u64,
    pub errors: u64,
    pub seconds_sum: f64,
    /// Calls per bucket (not cumulative): [`LATENCY_BUCKETS`], then the rest.
    pub buckets: Vec<u64>,
}

/// Every call's figures since the client was made.
#[derive(Debug, Default)]
pub struct CallStats {
    calls: Mutex<BTreeMap<&'static str, CallStat>>,
    changed: AtomicBool,
}

impl CallStats {
    pub fn record(&self, call: &'static str, took: Duration, ok: bool) {
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        let mut calls = self.calls.lock().unwrap();
        let stat = calls.entry(call).or_default();
        stat.buckets.resize(LATENCY_BUCKETS.len() + 1, 0);
        stat.count += 1;
        stat.errors += u64::from(!ok);
        stat.seconds_sum += secs;
        stat.buckets[bucket] += 1;
        self.changed.store(true, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BTreeMap<String, CallStat> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// Writes the figures to `path` (atomically) if they changed since the last write.
    fn persist(&self, path: &Path) -> std::io::Result<()> {
        if !self.changed.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        crate::private_file::replace(path, &serde_json::to_vec(&self.snapshot())?)
    }

    /// Keeps `path` up to date until the VM ends.
    pub fn persist_until(
        stats: std::sync::Arc<CallStats>,
        path: PathBuf,
        mut end: watch::Receiver<Option<VmExit>>,
    ) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = end.wait_for(Option::is_some) => return,
                    _ = tokio::time::sleep(PERSIST_EVERY) => {}
                }
                let _ = stats.persist(&path);
            }
        });
    }
}

/// The figures a sandbox's shim wrote (empty when there are none or the file is damaged).
pub fn read(dir: &Path) -> BTreeMap<String, CallStat> {
    let path = dir.join(CALL_STATS_FILE);
    if path.metadata().map_or(true, |m| m.len() > FILE_MAX) {
        return BTreeMap::new();
    }
    let mut calls: BTreeMap<String, CallStat> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    calls.retain(|name, s| {
        name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric())
            && s.buckets.len() == LATENCY_BUCKETS.len() + 1
    });
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_latency_and_written_when_changed() {
        let stats = CallStats::default();
        stats.record("Health", Duration::from_micros(500), true);
        stats.record("Health", Duration::from_millis(30), false);
        stats.record("CreateContainer", Duration::from_secs(60), true);
        let snap = stats.snapshot();
        let health = &snap["Health"];
        assert_eq!((health.count, health.errors), (2, 1));
        assert_eq!(health.buckets[0], 1, "0.5 ms is in the 1 ms bucket");
        assert_eq!(health.buckets[5], 1, "30 ms is in the 50 ms bucket");
        assert_eq!(*snap["CreateContainer"].buckets.last().unwrap(), 1);
        let dir = std::env::temp_dir().join(format!("shoji-calls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CALL_STATS_FILE);
        stats.persist(&path).unwrap();
        assert_eq!(read(&dir), snap);
        std::fs::remove_file(&path).unwrap();
        stats.persist(&path).unwrap();
        assert!(!path.exists(), "unchanged figures are not written again");
        std::fs::write(
            &path,
            br#"{"bad name":{"count":1,"errors":0,"seconds_sum":1,"buckets":[]}}"#,
        )
        .unwrap();
        assert!(read(&dir).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
