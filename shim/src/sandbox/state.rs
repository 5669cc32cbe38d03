//! What a sandbox leaves on the host, persisted in `<sandbox dir>/state.json` as it is
//! created, so that [`cleanup`] can remove it after the shim died (`containerd-shim-shoji-v2
//! delete`) without the in-memory [`super::Sandbox`].
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::sharefs;

pub const STATE_FILE: &str = "state.json";

/// A process started for the sandbox. `start_time` (clock ticks since boot, from
/// /proc/<pid>/stat) tells a recycled pid from ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedPid {
    pub name: String,
    pub pid: u32,
    pub start_time: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub pids: Vec<RecordedPid>,
    /// Host mount points created for containers (rootfs and volumes), in creation order.
    pub mounts: Vec<PathBuf>,
}

impl State {
    pub fn read(dir: &Path) -> std::io::Result<State> {
        let text = std::fs::read(dir.join(STATE_FILE))?;
        serde_json::from_slice(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Writes atomically (temp file + rename), so a crash never leaves half a file.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).expect("state serializes"),
        )?;
        std::fs::rename(tmp, dir.join(STATE_FILE))
    }

    /// Records `pid` (unless already recorded).
    pub fn add_pid(&mut self, name: &str, pid: u32) {
        if !self.pids.iter().any(|p| p.pid == pid) {
            let start_time = start_time(pid).unwrap_or(0);
            self.pids.push(RecordedPid {
                name: name.into(),
                pid,
                start_time,
            });
        }
    }
}

/// Field 22 of /proc/<pid>/stat: the process's start time.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; it ends at the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// True while the recorded process still runs (same pid, same start time).
pub fn is_alive(p: &RecordedPid) -> bool {
    start_time(p.pid).is_some_and(|t| p.start_time == 0 || t == p.start_time)
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("process {name} ({pid}) of sandbox {id} survived SIGKILL")]
    Survivor { id: String, name: String, pid: u32 },
    #[error(transparent)]
    Mount(#[from] sharefs::MountError),
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Removes whatever sandbox `id` left under `run_dir`: kills its recorded processes,
/// unmounts everything below its directory and removes the directory. A sandbox that is
/// already gone is success.
pub async fn cleanup(run_dir: &Path, id: &str) -> Result<(), CleanupError> {
    let dir = run_dir.join(id);
    if let Ok(state) = State::read(&dir) {
        for p in state.pids.iter().filter(|p| is_alive(p)) {
            // SAFETY: kill(2); the start time check above makes a recycled pid unlikely.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
        for p in &state.pids {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while is_alive(p) && !is_zombie(p.pid) {
                if tokio::time::Instant::now() > deadline {
                    return Err(CleanupError::Survivor {
                        id: id.into(),
                        name: p.name.clone(),
                        pid: p.pid,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    sharefs::unmount_tree(&dir)?;
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CleanupError::Remove {
            path: dir,
            source: e,
        }),
        _ => Ok(()),
    }
}

/// A killed child of a dead shim may linger as a zombie until its new parent reaps it: it
/// holds nothing any more.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_records_start_time() {
        let dir = std::env::temp_dir().join(format!("shoji-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = State {
            id: "x".into(),
            ..Default::default()
        };
        s.add_pid("self", std::process::id());
        s.add_pid("self", std::process::id());
        assert_eq!(s.pids.len(), 1);
        assert!(s.pids[0].start_time > 0);
        assert!(is_alive(&s.pids[0]));
        s.write(&dir).unwrap();
        assert_eq!(State::read(&dir).unwrap(), s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn cleanup_kills_recorded_processes_and_removes_the_dir() {
        let run = std::env::temp_dir().join(format!("shoji-cleanup-{}", std::process::id()));
        let dir = run.join("sb");
        std::fs::create_dir_all(dir.join("shared/c1")).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let mut s = State {
            id: "sb".into(),
            ..Default::default()
        };
        s.add_pid("sleep", child.id());
        s.write(&dir).unwrap();
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        cleanup(&run, "sb").await.unwrap();
        assert!(!reaper.join().unwrap().success());
        assert!(!dir.exists());
        // Already gone is success.
        cleanup(&run, "sb").await.unwrap();
        std::fs::remove_dir_all(run).unwrap();
    }
}
