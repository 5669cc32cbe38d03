//! The guest's serial console on the host, bounded: the VMM appends to `console.log`; when
//! it holds more than [`CONSOLE_MAX`], its last [`KEPT`] bytes move to `console.log.1` and it
//! starts over. A guest that floods its console (an OOM loop, a hostile kernel) cannot fill
//! the host's `/run`. The daemons' logs (the VMM's own, virtiofsd's, the vsock back-end's,
//! which a guest can make them write) are bounded the same way, checked less often.
use std::{
    io::{Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::watch;

use crate::hypervisor::VmExit;

/// Most bytes `console.log` holds before it is rotated.
pub const CONSOLE_MAX: u64 = 1 << 20;
/// What is kept of a full `console.log`, in `console.log.1`.
const KEPT: u64 = 256 << 10;
/// How often the console's size is checked (what the guest can write in between is the slack).
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// How often the daemons' logs are checked: they grow much slower than a flooded console.
const CHECK_DAEMON_LOGS_EVERY: Duration = Duration::from_secs(1);

/// The rotated file next to `console`.
pub fn previous(console: &Path) -> PathBuf {
    let mut p = console.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Keeps `console` (which the VMM opened for appending) under [`CONSOLE_MAX`] until the VM
/// ends.
pub fn bound(console: PathBuf, end: watch::Receiver<Option<VmExit>>) {
    bound_files(vec![console], CHECK_EVERY, end);
}

/// Keeps the daemons' logs `logs` (opened for appending) under [`CONSOLE_MAX`] each until the
/// VM ends. A file that does not exist is skipped.
pub fn bound_daemon_logs(logs: Vec<PathBuf>, end: watch::Receiver<Option<VmExit>>) {
    bound_files(logs, CHECK_DAEMON_LOGS_EVERY, end);
}

fn bound_files(files: Vec<PathBuf>, every: Duration, mut end: watch::Receiver<Option<VmExit>>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = end.wait_for(Option::is_some) => return,
                _ = tokio::time::sleep(every) => {}
            }
            for file in &files {
                // Allocated size: a writer that does not append leaves a sparse file after a
                // truncation, whose holes cost nothing.
                let used = std::fs::metadata(file).map_or(0, |m| m.blocks() * 512);
                if used > CONSOLE_MAX {
                    let _ = rotate(file);
                }
            }
        }
    });
}

fn rotate(console: &Path) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(console)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(KEPT)))?;
    let mut tail = Vec::with_capacity(KEPT as usize);
    (&mut f).take(KEPT).read_to_end(&mut tail)?;
    std::fs::write(previous(console), &tail)?;
    f.set_len(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn daemon_logs_are_bounded_until_the_vm_ends() {
        let dir = std::env::temp_dir().join(format!("shoji-daemon-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("virtiofsd.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        std::io::Write::write_all(&mut f, &vec![b'x'; 2 * CONSOLE_MAX as usize]).unwrap();
        let (tx, end) = watch::channel(None);
        bound_daemon_logs(vec![log.clone(), dir.join("absent.log")], end);
        let deadline = tokio::time::Instant::now() + 5 * CHECK_DAEMON_LOGS_EVERY;
        while std::fs::metadata(&log).unwrap().len() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never rotated");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(std::fs::metadata(previous(&log)).unwrap().len(), KEPT);
        // Appends go on at the start of the file.
        std::io::Write::write_all(&mut f, b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "after\n");
        tx.send_replace(Some(VmExit {
            status: None,
            reason: "test".into(),
        }));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_console_keeps_its_tail_and_starts_over() {
        let dir = std::env::temp_dir().join(format!("shoji-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join("console.log");
        let mut text = "x".repeat(2 * CONSOLE_MAX as usize);
        text.push_str("the last line\n");
        std::fs::write(&console, &text).unwrap();
        rotate(&console).unwrap();
        assert_eq!(std::fs::metadata(&console).unwrap().len(), 0);
        let kept = std::fs::read_to_string(previous(&console)).unwrap();
        assert_eq!(kept.len() as u64, KEPT);
        assert!(kept.ends_with("the last line\n"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
