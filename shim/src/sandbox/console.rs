//! The guest's serial console on the host, bounded: the VMM appends to `console.log`; when
//! it holds more than [`CONSOLE_MAX`], its last [`KEPT`] bytes move to `console.log.1` and it
//! starts over. A guest that floods its console (an OOM loop, a hostile kernel) cannot fill
//! the host's `/run`.
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
/// How often the size is checked (what the guest can write in between is the slack).
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The rotated file next to `console`.
pub fn previous(console: &Path) -> PathBuf {
    let mut p = console.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Keeps `console` (which the VMM opened for appending) under [`CONSOLE_MAX`] until the VM
/// ends.
pub fn bound(console: PathBuf, mut end: watch::Receiver<Option<VmExit>>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = end.wait_for(Option::is_some) => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            // Allocated size: a VMM that does not append leaves a sparse file after a
            // truncation, whose holes cost nothing.
            let used = std::fs::metadata(&console).map_or(0, |m| m.blocks() * 512);
            if used > CONSOLE_MAX {
                let _ = rotate(&console);
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
