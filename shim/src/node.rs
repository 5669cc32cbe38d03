//! What runs on this node: every sandbox under `run_dir` (each directory holding a ledger),
//! what its ledger says and what `/proc` says about its processes. Read by `shoji ps` and
//! `shoji metrics`; it never changes anything.
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{
    procfs,
    sandbox::{RecordedPid, State, STATE_FILE},
};

/// Whether a sandbox's processes and its owner (the shim, or `shoji vm run`) still run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its VM's processes and its owner run.
    Running,
    /// Its owner runs and has launched nothing yet, or is still booting.
    Starting,
    /// Its VM's processes run but its owner is gone: nobody will tear it down.
    Orphaned,
    /// None of its recorded processes runs: what is left is the directory and whatever
    /// the ledger records (mounts, taps, cgroup).
    Dead,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Starting => "starting",
            Status::Orphaned => "orphaned",
            Status::Dead => "dead",
        }
    }
}

/// One process of a sandbox on the host: a recorded one, or a direct child of one
/// (virtiofsd serves from a sandboxed child), named as the ledger names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    pub name: String,
    pub pid: u32,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// One sandbox as the node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxView {
    pub id: String,
    pub dir: PathBuf,
    pub status: Status,
    /// Seconds since the boot began (0 when the ledger does not say).
    pub uptime_secs: u64,
    pub processes: Vec<ProcessMemory>,
    /// The ledger as read.
    pub state: State,
    /// What to run about it, for an orphaned or dead sandbox.
    pub hint: Option<String>,
}

impl SandboxView {
    pub fn rss_kib(&self) -> u64 {
        self.processes.iter().map(|p| p.rss_kib).sum()
    }

    pub fn pss_kib(&self) -> u64 {
        self.processes.iter().map(|p| p.pss_kib).sum()
    }

    /// RSS of the processes named `name` (e.g. all of virtiofsd), in KiB.
    pub fn rss_of(&self, name: &str) -> u64 {
        self.processes
            .iter()
            .filter(|p| p.name == name)
            .map(|p| p.rss_kib)
            .sum()
    }
}

/// Every sandbox under `run_dir`, sorted by id. A directory whose ledger cannot be read is
/// listed with an empty ledger (status dead): `shoji cleanup` still applies to it.
pub fn sandboxes(run_dir: &Path) -> Vec<SandboxView> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut all: Vec<SandboxView> = entries
        .flatten()
        .filter(|e| e.path().join(STATE_FILE).is_file())
        .filter_map(|e| {
            let id = e.file_name().to_str()?.to_string();
            crate::sandbox::validate_id("sandbox id", &id).ok()?;
            Some(view(&id, &e.path()))
        })
        .collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all
}

/// One sandbox directory, looked at now.
pub fn view(id: &str, dir: &Path) -> SandboxView {
    let state = State::read(dir).unwrap_or_else(|_| State {
        id: id.into(),
        ..Default::default()
    });
    let live: Vec<&RecordedPid> = state.pids.iter().filter(|p| p.is_alive()).collect();
    let owner = state.info.as_ref().and_then(|i| i.owner.as_ref());
    // A ledger without an owner predates the field: its processes tell.
    let owner_alive = owner.is_none_or(RecordedPid::is_alive);
    let status = match (live.is_empty(), owner_alive) {
        (false, true) => Status::Running,
        (false, false) => Status::Orphaned,
        (true, true) if owner.is_some() && state.boot.is_none() => Status::Starting,
        (true, _) => Status::Dead,
    };
    // Named as recorded (`/proc` cuts names at 15 characters); children by their parent.
    let processes = live
        .iter()
        .flat_map(|p| {
            procfs::with_children(&[p.pid])
                .into_iter()
                .map(|pid| (p.name.clone(), pid))
        })
        .filter_map(|(name, pid)| {
            Some(ProcessMemory {
                name,
                pid,
                rss_kib: procfs::rss_kib(pid)?,
                pss_kib: procfs::pss_kib(pid).unwrap_or(0),
            })
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let uptime_secs = state
        .info
        .as_ref()
        .map_or(0, |i| now.saturating_sub(i.started_unix));
    let hint =
        matches!(status, Status::Orphaned | Status::Dead).then(|| format!("shoji cleanup {id}"));
    SandboxView {
        id: id.into(),
        dir: dir.to_path_buf(),
        status,
        uptime_secs,
        processes,
        state,
        hint,
    }
}

/// A sandbox under `run_dir` (one with a ledger) whose id is `prefix` or the one id
/// starting with it.
pub fn resolve(run_dir: &Path, prefix: &str) -> Result<String, String> {
    let is_sandbox = |d: &Path| d.join(STATE_FILE).is_file();
    match crate::sandbox::unique_prefix(&[(run_dir, &is_sandbox)], prefix)? {
        Some((id, _)) => Ok(id),
        None => Err(format!(
            "no sandbox {prefix} in {} (`shoji ps` lists them)",
            run_dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxInfo;

    fn info(owner: Option<RecordedPid>) -> SandboxInfo {
        SandboxInfo {
            pod_namespace: Some("default".into()),
            pod_name: Some("web".into()),
            hypervisor: crate::hypervisor::HypervisorKind::Qemu,
            accel: Some(crate::hypervisor::Accel::Tcg),
            vcpus: 1,
            memory_mib: 256,
            started_unix: 0,
            debug_console: false,
            owner,
        }
    }

    fn write(run: &Path, state: &State) {
        let dir = run.join(&state.id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), serde_json::to_vec(state).unwrap()).unwrap();
    }

    #[test]
    fn sandboxes_are_running_starting_orphaned_or_dead() {
        let run = std::env::temp_dir().join(format!("shoji-node-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(run.join("no-ledger")).unwrap();
        let me = RecordedPid::me();
        let gone = RecordedPid {
            name: "gone".into(),
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        let sb =
            |id: &str, pids: Vec<RecordedPid>, owner: Option<RecordedPid>, booted: bool| State {
                id: id.into(),
                pids,
                info: Some(info(owner)),
                boot: booted.then_some(crate::sandbox::BootRecord {
                    daemons_ready_ms: 1.0,
                    vmm_running_ms: 2.0,
                    agent_ready_ms: 3.0,
                }),
                ..Default::default()
            };
        write(&run, &sb("a-run", vec![me.clone()], Some(me.clone()), true));
        write(&run, &sb("b-boot", vec![], Some(me.clone()), false));
        write(
            &run,
            &sb("c-orph", vec![me.clone()], Some(gone.clone()), true),
        );
        write(
            &run,
            &sb("d-dead", vec![gone.clone()], Some(gone.clone()), true),
        );
        write(&run, &sb("e-dead", vec![gone], Some(me.clone()), true));
        let all = sandboxes(&run);
        let got: Vec<(&str, Status)> = all.iter().map(|s| (s.id.as_str(), s.status)).collect();
        assert_eq!(
            got,
            [
                ("a-run", Status::Running),
                ("b-boot", Status::Starting),
                ("c-orph", Status::Orphaned),
                ("d-dead", Status::Dead),
                ("e-dead", Status::Dead),
            ]
        );
        assert!(all[0].rss_kib() > 0 && all[0].hint.is_none());
        assert_eq!(all[0].processes[0].pid, me.pid);
        assert_eq!(all[3].hint.as_deref(), Some("shoji cleanup d-dead"));
        assert!(all[3].processes.is_empty());
        assert_eq!(resolve(&run, "b").unwrap(), "b-boot");
        assert!(resolve(&run, "e-").is_ok());
        assert!(resolve(&run, "x").unwrap_err().contains("no sandbox x"));
        std::fs::create_dir_all(run.join("a-other")).unwrap();
        std::fs::write(run.join("a-other").join(STATE_FILE), b"{").unwrap();
        assert!(resolve(&run, "a").unwrap_err().contains("2 sandboxes"));
        assert!(resolve(&run, "..").is_err());
        // An unreadable ledger still lists the sandbox, as dead.
        let broken = view("a-other", &run.join("a-other"));
        assert_eq!(broken.status, Status::Dead);
        std::fs::remove_dir_all(run).unwrap();
    }
}
