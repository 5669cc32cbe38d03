//! The sandbox's ledger: every host resource of the VM, written to `<sandbox dir>/state.json`
//! *before* the step that creates it, so that [`super::cleanup`] can undo a crash at any
//! point (`containerd-shim-shoji-v2 delete`, `shoji cleanup`) without the shim's memory.
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use slog::{warn, Logger};

use crate::{
    daemon::PidLedger,
    host_cgroup::PodCgroup,
    hypervisor::{Accel, HypervisorKind},
    network::Bridges,
    procfs,
};

pub const STATE_FILE: &str = "state.json";

/// A process started for the sandbox. `start_time` (clock ticks since boot) tells a
/// recycled pid from ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedPid {
    pub name: String,
    pub pid: u32,
    pub start_time: u64,
}

impl RecordedPid {
    /// This process, named as `/proc` names it.
    pub fn me() -> RecordedPid {
        let pid = std::process::id();
        RecordedPid {
            name: procfs::name(pid).unwrap_or_default(),
            pid,
            start_time: procfs::start_time(pid).unwrap_or(0),
        }
    }

    /// True while the recorded process still runs (same pid, same start time, not a
    /// zombie: a process that exited and waits for its parent holds nothing).
    pub fn is_alive(&self) -> bool {
        procfs::stat(self.pid).is_some_and(|s| {
            s.state != 'Z' && (self.start_time == 0 || s.start_time == self.start_time)
        })
    }
}

/// What the sandbox made on the host, besides its own directory (whose contents go with
/// it: sockets, logs, and every mount below it, container rootfs and volumes included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    /// The pod's host cgroup the shim joined so the VM's processes are born in it.
    #[serde(default)]
    pub cgroup: Option<PodCgroup>,
    /// Taps and tc redirects in the pod's network namespace.
    #[serde(default)]
    pub network: Option<Bridges>,
    /// Processes launched for the VM (VMM, virtiofsd, vsock back-end).
    #[serde(default)]
    pub pids: Vec<RecordedPid>,
    /// The uid the VMM and the vsock back-end run as (claimed from the node's range).
    #[serde(default)]
    pub jail: Option<crate::jail::Identity>,
    /// What the sandbox is, for `shoji ps` and `shoji metrics` (not a resource).
    #[serde(default)]
    pub info: Option<SandboxInfo>,
    /// How long each boot phase took, once the agent announced itself.
    #[serde(default)]
    pub boot: Option<BootRecord>,
    /// The containers in the guest (created, not yet removed).
    #[serde(default)]
    pub containers: Vec<String>,
    /// Where the sandbox's logs go when it is torn down.
    #[serde(default)]
    pub logs: Option<LogRetention>,
}

/// What a sandbox is: its pod, its VM and who booted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// The pod's namespace and name (CRI annotations of the VM owner's spec), when it has them.
    #[serde(default)]
    pub pod_namespace: Option<String>,
    #[serde(default)]
    pub pod_name: Option<String>,
    pub hypervisor: HypervisorKind,
    /// Known once the driver is made.
    #[serde(default)]
    pub accel: Option<Accel>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Unix seconds when the boot began.
    pub started_unix: u64,
    /// Booted with the debug console allowed (`debug_console = true`).
    #[serde(default)]
    pub debug_console: bool,
    /// The process that booted and serves the sandbox (the shim, or `shoji vm run`): never
    /// killed by the cleanup, only looked at.
    #[serde(default)]
    pub owner: Option<RecordedPid>,
}

/// Boot phase durations in milliseconds, measured from the start of the boot
/// ([`super::BootTimes`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootRecord {
    pub daemons_ready_ms: f64,
    pub vmm_running_ms: f64,
    pub agent_ready_ms: f64,
}

impl From<super::BootTimes> for BootRecord {
    fn from(t: super::BootTimes) -> Self {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        BootRecord {
            daemons_ready_ms: ms(t.daemons_ready),
            vmm_running_ms: ms(t.vmm_running),
            agent_ready_ms: ms(t.agent_ready),
        }
    }
}

/// Where a torn-down sandbox's logs are kept, and how many sandboxes' logs are kept there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRetention {
    pub dir: PathBuf,
    pub keep: u32,
}

impl State {
    pub fn read(dir: &Path) -> std::io::Result<State> {
        let text = std::fs::read(dir.join(STATE_FILE))?;
        serde_json::from_slice(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes atomically, root-only: it names the processes cleanup kills.
    fn write(&self, dir: &Path) -> std::io::Result<()> {
        crate::private_file::replace(
            &dir.join(STATE_FILE),
            &serde_json::to_vec_pretty(self).expect("state serializes"),
        )
    }
}

/// The in-memory state, persisted on every change.
pub struct Ledger {
    dir: PathBuf,
    state: Mutex<State>,
    log: Logger,
}

impl Ledger {
    /// Starts the ledger of a sandbox in `dir` (which exists) with `state` and writes it.
    pub fn create(dir: &Path, state: State, log: &Logger) -> std::io::Result<Ledger> {
        state.write(dir)?;
        Ok(Ledger {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            log: log.clone(),
        })
    }

    /// Changes the state and persists it. Call before creating what `change` records: an
    /// error means the resource must not be created (a crash could not undo it).
    pub fn record(&self, change: impl FnOnce(&mut State)) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap();
        change(&mut state);
        state.write(&self.dir)
    }

    /// Like [`Ledger::record`] for what is already undone: a failed write only means
    /// cleanup will find it gone.
    pub fn forget(&self, change: impl FnOnce(&mut State)) {
        self.note(change)
    }

    /// Like [`Ledger::record`] for what is only information (no resource depends on it):
    /// a failed write is logged.
    pub fn note(&self, change: impl FnOnce(&mut State)) {
        if let Err(e) = self.record(change) {
            warn!(self.log, "cannot persist the sandbox state"; "error" => %e);
        }
    }

    pub fn snapshot(&self) -> State {
        self.state.lock().unwrap().clone()
    }

    /// Pids of the recorded processes that still run.
    pub fn live_pids(&self) -> Vec<u32> {
        let state = self.state.lock().unwrap();
        state
            .pids
            .iter()
            .filter(|p| p.is_alive())
            .map(|p| p.pid)
            .collect()
    }
}

impl PidLedger for Ledger {
    /// Called right after the fork: the cleanup also finds processes by their command line
    /// (every daemon names the sandbox directory), so this short window is covered too.
    fn record(&self, name: &'static str, pid: u32) {
        let start_time = procfs::start_time(pid).unwrap_or(0);
        self.forget(|s| {
            s.pids.push(RecordedPid {
                name: name.into(),
                pid,
                start_time,
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_is_on_disk_before_the_call_returns() {
        let dir = std::env::temp_dir().join(format!("shoji-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let state = State {
            id: "x".into(),
            ..Default::default()
        };
        let ledger = Ledger::create(&dir, state, &log).unwrap();
        assert_eq!(State::read(&dir).unwrap().id, "x");
        PidLedger::record(&ledger, "self", std::process::id());
        ledger.record(|s| s.id = "y".into()).unwrap();
        let on_disk = State::read(&dir).unwrap();
        assert_eq!(on_disk, ledger.snapshot());
        assert!(on_disk.pids[0].start_time > 0);
        assert!(on_disk.pids[0].is_alive());
        assert_eq!(ledger.live_pids(), [std::process::id()]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
