//! Where one Cloud Hypervisor's API socket and logs live, and what they say when it ends:
//! the last `ERROR` line of its log (or a panic on stderr) and its last events.
use std::path::{Path, PathBuf};

use crate::{hypervisor::describe_status, logtail};

pub(super) const API_SOCKET: &str = "clh-api.sock";
const LOG_FILE: &str = "clh.log";
const EVENTS_FILE: &str = "clh-events.json";
/// The VMM's stdout/stderr (CH writes its own log to [`LOG_FILE`]).
const STDIO_LOG: &str = "clh-stdio.log";

/// Where one VMM's API socket (the VMM directory) and logs (the sandbox directory) live.
#[derive(Clone)]
pub(super) struct Files {
    pub(super) api_socket: PathBuf,
    pub(super) log: PathBuf,
    pub(super) events: PathBuf,
    pub(super) stdio: PathBuf,
}

impl Files {
    pub(super) fn new(dir: &Path) -> Files {
        Files {
            api_socket: crate::hypervisor::vmm_dir(dir).join(API_SOCKET),
            log: dir.join(LOG_FILE),
            events: dir.join(EVENTS_FILE),
            stdio: dir.join(STDIO_LOG),
        }
    }

    /// The VMM's own account of what went wrong: the message of the last `ERROR` line of its
    /// log, else the last line it printed (flag errors and panics go to stderr).
    pub(super) fn vmm_error(&self) -> Option<String> {
        last_error_line(&self.log).or_else(|| {
            let lines = logtail::last_lines(&self.stdio, 8);
            let lines: Vec<&str> = lines.iter().map(|l| l.trim()).collect();
            // A Rust panic: "thread 'vmm' panicked at file:line:col:", the message, a note.
            if let Some(i) = lines.iter().rposition(|l| l.contains(" panicked at ")) {
                return Some(
                    lines[i..]
                        .iter()
                        .take(2)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            lines
                .iter()
                .rev()
                .find(|l| !l.starts_with("note:"))
                .map(|l| l.to_string())
        })
    }

    /// Why the VMM ended: its error and the event monitor's last events.
    pub(super) fn exit_reason(&self, status: Option<i32>) -> String {
        let status = describe_status(status);
        let events = last_events(&self.events, 4);
        let events = if events.is_empty() {
            String::new()
        } else {
            format!("; last events: {}", events.join(", "))
        };
        match self.vmm_error() {
            Some(error) => format!("cloud-hypervisor exited ({status}): {error}{events}"),
            None => format!("cloud-hypervisor exited ({status}){events}"),
        }
    }
}

/// The message of the last `ERROR` line of CH's log (`… <thread> ERROR:file:line -- message`).
fn last_error_line(log_file: &Path) -> Option<String> {
    logtail::last_matching(log_file, |line| {
        line.contains(" ERROR:").then(|| {
            line.split_once(" -- ")
                .map(|(_, msg)| msg)
                .unwrap_or(line)
                .trim()
                .to_string()
        })
    })
}

/// The last `n` events of the event monitor file (pretty-printed JSON objects back to back),
/// as "source event".
fn last_events(events: &Path, n: usize) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Event {
        source: String,
        event: String,
    }
    let Ok(text) = std::fs::read_to_string(events) else {
        return Vec::new();
    };
    // A half-written last object ends the stream; what came before still counts.
    let all: Vec<String> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Event>()
        .map_while(|e| e.ok())
        .map(|e| format!("{} {}", e.source, e.event))
        .collect();
    all[all.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reason_prefers_the_last_error_line_and_lists_events() {
        let dir = std::env::temp_dir().join(format!("shoji-clh-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("clh.log");
        std::fs::write(
            &log,
            "cloud-hypervisor:  0.1s: <vmm> WARN:vmm/src/lib.rs:1 -- something\n\
             cloud-hypervisor: 14.2s: <vcpu0> ERROR:vmm/src/cpu.rs:1180 -- VCPU generated error: VcpuRun(Failed to run vcpu)\n",
        )
        .unwrap();
        let events = dir.join("clh-events.json");
        let ev = |s: &str, e: &str| {
            serde_json::to_string_pretty(&serde_json::json!({
                "timestamp": {"secs": 0, "nanos": 1}, "source": s, "event": e, "properties": null
            }))
            .unwrap()
        };
        std::fs::write(
            &events,
            format!(
                "{}\n{}\n{}\n{{\"timestamp\":",
                ev("vm", "booted"),
                ev("vm", "shutdown"),
                ev("vmm", "shutdown")
            ),
        )
        .unwrap();
        assert_eq!(
            Files::new(&dir).exit_reason(Some(1)),
            "cloud-hypervisor exited (exit status 1): VCPU generated error: VcpuRun(Failed to run vcpu); \
             last events: vm booted, vm shutdown, vmm shutdown"
        );
        assert_eq!(
            Files::new(&dir.join("none")).exit_reason(Some(137)),
            "cloud-hypervisor exited (killed by signal 9)"
        );
        std::fs::remove_file(&log).unwrap();
        std::fs::write(
            dir.join("clh-stdio.log"),
            "thread 'vmm' panicked at vmm/src/lib.rs:12:5:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n",
        )
        .unwrap();
        assert_eq!(
            Files::new(&dir).vmm_error().as_deref(),
            Some("thread 'vmm' panicked at vmm/src/lib.rs:12:5: boom")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
