//! The end of a log file (guest console, daemon logs), for error messages: what a failed
//! VM or daemon said last is usually the reason.
use std::path::Path;

/// How much of a log's end is read: the lines wanted are at the end, and a flooding guest
/// must not make an error message read a huge file.
const TAIL_BYTES: u64 = 64 * 1024;

/// The non-empty lines of the last [`TAIL_BYTES`] of `path` (empty when unreadable).
fn tail(path: &Path) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    lines
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The last `n` non-empty lines.
pub fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let lines = tail(path);
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The last non-empty line, or a note that there was none.
pub fn last_line(path: &Path) -> String {
    tail(path)
        .pop()
        .unwrap_or_else(|| format!("no output (see {})", path.display()))
}

/// The last line for which `pick` gives a value.
pub fn last_matching<T>(path: &Path, pick: impl Fn(&str) -> Option<T>) -> Option<T> {
    tail(path).iter().rev().find_map(|l| pick(l))
}

/// The last `n` lines, indented, for quoting in an error message.
pub fn quoted(path: &Path, n: usize) -> String {
    let lines = last_lines(path, n);
    if lines.is_empty() {
        return format!("  (no output in {})", path.display());
    }
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_skip_blank_lines_and_read_only_the_end() {
        let dir = tempdir();
        let log = dir.join("log");
        std::fs::write(&log, "one\n\ntwo\nthree\n  \n").unwrap();
        assert_eq!(last_lines(&log, 2), ["two", "three"]);
        assert_eq!(last_line(&log), "three");
        assert_eq!(
            last_matching(&log, |l| l.strip_prefix("t").map(str::to_string)),
            Some("hree".to_string())
        );
        assert_eq!(quoted(&log, 1), "  three");
        let big = "x".repeat(100) + "\n";
        std::fs::write(&log, big.repeat(2000) + "last\n").unwrap();
        assert_eq!(last_line(&log), "last");
        assert!(tail(&log).len() < 700);
        assert!(last_line(&dir.join("none")).contains("no output"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("shoji-logtail-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
