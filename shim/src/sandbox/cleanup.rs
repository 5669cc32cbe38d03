//! Undoing a sandbox: one path for a failed boot, an orderly stop (after its graceful part)
//! and the crash cleanup of `containerd-shim-shoji-v2 delete` / `shoji cleanup`. Every step
//! treats "already gone" as done, so it can run any number of times.
use std::{path::Path, time::Duration};

use slog::{warn, Logger};

use super::{
    logs,
    state::{RecordedPid, State},
    validate_id, IdError,
};
use crate::{
    host_cgroup::CgroupError,
    jail, network, procfs,
    sharefs::{self, MountError},
};

/// How long killed processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("process {name} ({pid}) of the sandbox survived SIGKILL")]
    Survivor { name: String, pid: u32 },
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("giving back sandbox uid {uid}: {source}")]
    Uid {
        uid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Removes whatever sandbox `id` left under `run_dir` after its shim died: kills its
/// processes, unmounts everything below its directory, removes its taps and host cgroup and
/// the directory (its logs are kept where the ledger says). A sandbox that is already gone
/// is success.
pub async fn cleanup(run_dir: &Path, id: &str, log: &Logger) -> Result<(), CleanupError> {
    validate_id("sandbox id", id)?;
    let dir = run_dir.join(id);
    let state = State::read(&dir).unwrap_or_else(|_| State {
        id: id.into(),
        ..Default::default()
    });
    release(&dir, &state, log).await
}

/// Removes everything `state` records and the sandbox directory `dir`, keeping its logs
/// (once its processes are gone, so they are complete). Every step runs even when an
/// earlier one failed; the first error is returned. Logs that cannot be kept are only
/// logged: they never fail a teardown.
pub(super) async fn release(dir: &Path, state: &State, log: &Logger) -> Result<(), CleanupError> {
    let mut first = Ok(());
    let mut keep = |r: Result<(), CleanupError>| {
        if first.is_ok() {
            first = r;
        }
    };
    keep(kill_processes(dir, &state.pids).await);
    keep(sharefs::unmount_tree(dir).map_err(Into::into));
    if let Some(retention) = state.logs.as_ref().filter(|_| dir.is_dir()) {
        if let Err(e) = logs::retain(dir, retention) {
            warn!(log, "the sandbox's logs were not kept"; "log_dir" => %retention.dir.display(), "error" => %e);
        }
    }
    if let Some(bridges) = &state.network {
        network::teardown(bridges).await;
    }
    if let Some(cgroup) = &state.cgroup {
        keep(cgroup.remove().await.map_err(Into::into));
    }
    keep(sharefs::remove_tree(dir).map_err(Into::into));
    // Last: the uid is free once nothing of the sandbox can still run as it.
    if let Some(id) = &state.jail {
        keep(
            jail::uids::release(id.uid, dir).map_err(|source| CleanupError::Uid {
                uid: id.uid,
                source,
            }),
        );
    }
    first
}

/// SIGKILLs the recorded processes that still run, and any process whose command line names
/// the sandbox directory (a daemon launched a moment before a crash, not yet recorded),
/// then waits for them to be gone.
async fn kill_processes(dir: &Path, recorded: &[RecordedPid]) -> Result<(), CleanupError> {
    let marker = format!("{}/", dir.display());
    let me = std::process::id();
    let mut victims: Vec<(String, u32)> = recorded
        .iter()
        .filter(|p| p.is_alive())
        .map(|p| (p.name.clone(), p.pid))
        .collect();
    for pid in procfs::all_pids() {
        if pid != me
            && !victims.iter().any(|(_, p)| *p == pid)
            && procfs::cmdline(pid).is_some_and(|c| c.contains(&marker))
        {
            victims.push((procfs::name(pid).unwrap_or_default(), pid));
        }
    }
    for (_, pid) in &victims {
        // SAFETY: kill(2); the start time or command line was checked just now.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    for (name, pid) in victims {
        while procfs::stat(pid).is_some_and(|s| s.state != 'Z') {
            if tokio::time::Instant::now() > deadline {
                return Err(CleanupError::Survivor { name, pid });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    #[tokio::test]
    async fn cleanup_kills_recorded_and_unrecorded_processes_and_removes_the_dir() {
        let run = std::env::temp_dir().join(format!("shoji-cleanup-{}", std::process::id()));
        let dir = run.join("sb");
        std::fs::create_dir_all(dir.join("shared/c1")).unwrap();
        let recorded = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        // Launched but never recorded: found by the directory in its command line.
        std::fs::write(dir.join("console.log"), b"").unwrap();
        let unrecorded = std::process::Command::new("tail")
            .arg("-f")
            .arg(dir.join("console.log"))
            .spawn()
            .unwrap();
        // Right after the spawn, the new image's command line can still read empty.
        while !procfs::cmdline(unrecorded.id()).is_some_and(|c| c.contains("console.log")) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let state = State {
            id: "sb".into(),
            pids: vec![RecordedPid {
                name: "sleep".into(),
                pid: recorded.id(),
                start_time: procfs::start_time(recorded.id()).unwrap(),
            }],
            ..Default::default()
        };
        std::fs::write(dir.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
        let reapers: Vec<_> = [recorded, unrecorded]
            .into_iter()
            .map(|mut c| std::thread::spawn(move || c.wait().unwrap()))
            .collect();
        cleanup(&run, "sb", &log()).await.unwrap();
        for r in reapers {
            assert!(!r.join().unwrap().success());
        }
        assert!(!dir.exists());
        // Already gone is success.
        cleanup(&run, "sb", &log()).await.unwrap();
        std::fs::remove_dir_all(run).unwrap();
    }

    #[tokio::test]
    async fn ids_that_name_other_directories_are_refused_and_nothing_is_deleted() {
        let run = std::env::temp_dir().join(format!("shoji-cleanup-bad-{}", std::process::id()));
        std::fs::create_dir_all(run.join("inner")).unwrap();
        std::fs::write(run.join("sibling"), b"keep").unwrap();
        for bad in ["..", "", "/", ".", "../x", "a/b", &"a".repeat(65)] {
            let err = cleanup(&run.join("inner"), bad, &log()).await.unwrap_err();
            assert!(matches!(err, CleanupError::InvalidId(_)), "{bad:?}: {err}");
        }
        assert!(run.join("sibling").exists());
        std::fs::remove_dir_all(run).unwrap();
    }
}
