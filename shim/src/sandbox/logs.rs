//! A sandbox's logs (guest console, daemons, debug console use) after the sandbox is gone:
//! at teardown ([`super::cleanup::release`]) they are copied to `<log_dir>/<id>/`, each
//! file bounded to its last [`FILE_MAX`] bytes, and only the newest `log_retention`
//! sandboxes are kept there. `shoji logs` reads them from the sandbox directory while it
//! runs and from there afterwards.
use std::{
    io::{Seek, SeekFrom},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use super::state::{LogRetention, STATE_FILE};

/// The log files of a sandbox directory, oldest content first (the rotated console before
/// the console). The ledger (`state.json`) is kept with them: it says what the sandbox was.
pub const LOG_FILES: &[&str] = &[
    "console.log.1",
    "console.log",
    DEBUG_CONSOLE_LOG,
    "qemu.log",
    "vhost-device-vsock.log",
    "virtiofsd.log",
    "clh.log",
    "clh-stdio.log",
    "clh-events.json",
];
/// The logs the VM's daemons write (each bounded while they run, like the console).
pub const DAEMON_LOGS: &[&str] = &[
    "qemu.log",
    "vhost-device-vsock.log",
    "virtiofsd.log",
    "clh.log",
    "clh-stdio.log",
];
/// Marks a directory of `log_dir` as a sandbox's kept logs: pruning removes nothing else, so
/// a `log_dir` shared with other programs (`/var/log`) loses none of theirs.
const KEPT_MARKER: &str = ".shoji-sandbox-logs";
/// Where `shoji console` records each use, in the sandbox directory.
pub const DEBUG_CONSOLE_LOG: &str = "debug-console.log";
/// Most bytes kept of one file (its end): the console is already capped at 1 MiB plus
/// 256 KiB rotated; daemon logs are not, so this bounds them.
pub const FILE_MAX: u64 = 1 << 20;

/// Where a sandbox's logs are: its live directory, or what was kept of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogPlace {
    Live(PathBuf),
    Retained(PathBuf),
}

impl LogPlace {
    pub fn dir(&self) -> &Path {
        match self {
            LogPlace::Live(d) | LogPlace::Retained(d) => d,
        }
    }

    /// Whether the sandbox still runs (a live directory whose state file is there).
    pub fn running(&self) -> bool {
        matches!(self, LogPlace::Live(d) if d.join(STATE_FILE).is_file())
    }

    /// The log files that hold something, in [`LOG_FILES`] order.
    pub fn files(&self) -> Vec<PathBuf> {
        LOG_FILES
            .iter()
            .map(|f| self.dir().join(f))
            .filter(|p| p.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
            .collect()
    }
}

/// Finds the logs of sandbox `prefix` (its id, or a unique prefix of it): a running
/// sandbox's directory first, else the kept copy.
pub fn find(run_dir: &Path, log_dir: &Path, prefix: &str) -> Result<LogPlace, String> {
    let live = |d: &Path| d.join(STATE_FILE).is_file();
    let kept = |d: &Path| {
        d.is_dir()
            && !d
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    };
    match super::lookup::unique_prefix(&[(run_dir, &live), (log_dir, &kept)], prefix)? {
        Some((id, 0)) => Ok(LogPlace::Live(run_dir.join(id))),
        Some((id, _)) => Ok(LogPlace::Retained(log_dir.join(id))),
        None => Err(format!(
            "no logs of sandbox {prefix}: not running under {} and none kept in {}",
            run_dir.display(),
            log_dir.display()
        )),
    }
}

/// Copies the logs of the sandbox directory `dir` to `<retention.dir>/<id>/` (replacing
/// an older copy of the same id), then removes the oldest copies beyond `retention.keep`.
pub fn retain(dir: &Path, retention: &LogRetention) -> std::io::Result<()> {
    let id = dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| super::validate_id("sandbox id", n).is_ok())
        .ok_or_else(|| std::io::Error::other(format!("{} names no sandbox", dir.display())))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&retention.dir)?;
    // Built aside and renamed: a reader never sees half a copy.
    let tmp = retention
        .dir
        .join(format!(".{id}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    let copied = (|| {
        std::fs::write(tmp.join(KEPT_MARKER), b"")?;
        for name in LOG_FILES.iter().chain([&STATE_FILE]) {
            let src = dir.join(name);
            if src.is_file() {
                copy_tail(&src, &mut std::fs::File::create(tmp.join(name))?, FILE_MAX)?;
            }
        }
        let dest = retention.dir.join(id);
        match std::fs::remove_dir_all(&dest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::rename(&tmp, &dest)
    })();
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    copied?;
    prune(&retention.dir, retention.keep as usize)
}

/// Copies the last `max` bytes of `src` to `to`.
pub fn copy_tail<W: std::io::Write>(src: &Path, to: &mut W, max: u64) -> std::io::Result<u64> {
    let mut from = std::fs::File::open(src)?;
    let len = from.metadata()?.len();
    from.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    std::io::copy(&mut std::io::Read::take(from, max), to)
}

/// Keeps the `keep` most recently kept sandboxes' logs in `log_dir`, removes the others.
/// Only directories this module wrote count (named by a sandbox id, holding its marker).
fn prune(log_dir: &Path, keep: usize) -> std::io::Result<()> {
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(log_dir)?
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            super::validate_id("sandbox id", &name.to_string_lossy()).is_ok()
                && e.path().join(KEPT_MARKER).is_file()
        })
        .filter_map(|e| {
            let m = e.metadata().ok().filter(|m| m.is_dir())?;
            Some((m.modified().ok()?, e.path()))
        })
        .collect();
    kept.sort_by_key(|k| std::cmp::Reverse(k.0));
    for (_, old) in kept.into_iter().skip(keep) {
        match std::fs::remove_dir_all(&old) {
            // A concurrent teardown pruned it first.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoji-logs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn logs_are_kept_bounded_and_only_for_the_newest_sandboxes() {
        let base = scratch("retain");
        let run = base.join("run");
        let retention = LogRetention {
            dir: base.join("kept"),
            keep: 2,
        };
        // What other programs keep in the same directory is never pruned.
        let journal = retention.dir.join("journal");
        std::fs::create_dir_all(&journal).unwrap();
        std::fs::write(journal.join("system.journal"), "theirs").unwrap();
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(&journal)
            .unwrap()
            .set_modified(t)
            .unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let dir = run.join(id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("console.log"), format!("console of {id}\n")).unwrap();
            std::fs::write(dir.join(STATE_FILE), "{}").unwrap();
            // A daemon log above the bound keeps its end.
            let mut big = vec![b'x'; FILE_MAX as usize + 10];
            big.extend_from_slice(b"last line\n");
            std::fs::write(dir.join("qemu.log"), &big).unwrap();
            std::fs::write(dir.join("vsock.sock"), "not a log").unwrap();
            retain(&dir, &retention).unwrap();
            // Distinct modification times for the pruning order: the first kept is oldest.
            let t =
                std::time::SystemTime::now() - std::time::Duration::from_secs(20 - 10 * i as u64);
            std::fs::File::open(retention.dir.join(id))
                .unwrap()
                .set_modified(t)
                .unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // "a" was pruned; "b" and "c" are kept, and the other program's directory.
        assert!(find(&run, &retention.dir, "a").is_err());
        assert!(journal.join("system.journal").is_file());
        let c = find(&run, &retention.dir, "c").unwrap();
        assert_eq!(c, LogPlace::Retained(retention.dir.join("c")));
        let names: Vec<_> = c
            .files()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["console.log", "qemu.log"]);
        std::fs::write(c.dir().join("virtiofsd.log"), "").unwrap();
        assert_eq!(c.files().len(), 2, "empty files are not listed");
        let qemu = std::fs::read(c.dir().join("qemu.log")).unwrap();
        assert_eq!(qemu.len() as u64, FILE_MAX);
        assert!(qemu.ends_with(b"last line\n"));
        assert!(c.dir().join(STATE_FILE).is_file());
        assert!(!c.dir().join("vsock.sock").exists());
        // A running sandbox's logs are its own directory's; bad ids find nothing.
        std::fs::create_dir_all(run.join("c")).unwrap();
        std::fs::write(run.join("c").join(STATE_FILE), "{}").unwrap();
        assert_eq!(
            find(&run, &retention.dir, "c"),
            Ok(LogPlace::Live(run.join("c")))
        );
        assert!(find(&run, &retention.dir, "../kept/c").is_err());
        assert_eq!(
            find(&run, &retention.dir, "b"),
            Ok(LogPlace::Retained(retention.dir.join("b")))
        );
        std::fs::remove_dir_all(base).unwrap();
    }
}
