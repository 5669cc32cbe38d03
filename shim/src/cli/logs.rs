//! `shoji logs SANDBOX`: the guest console and the daemon logs of a sandbox, from its
//! directory while it runs, from the kept copy (`log_dir`) after it is gone. `--follow`
//! then prints what a running sandbox's files gain, until it is gone.
use std::{collections::HashMap, io::Write, path::PathBuf, time::Duration};

use super::CliError;
use crate::{
    config::Config,
    sandbox::logs::{self, LogPlace, FILE_MAX, LOG_FILES},
};

/// How often `--follow` looks at the files.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Writes sandbox `prefix`'s logs to `out`, each file under a `==> path <==` header (the
/// rotated console first); `tail` keeps the last lines of each file. Says on `note` where
/// the logs were found.
pub fn logs(
    config: &Config,
    prefix: &str,
    tail: Option<usize>,
    out: &mut impl Write,
    note: &mut impl Write,
) -> Result<LogPlace, CliError> {
    let place = logs::find(&config.run_dir, &config.log_dir, prefix).map_err(CliError::Refused)?;
    let io = |context: String| move |source| CliError::Io { context, source };
    let _ = match &place {
        LogPlace::Live(dir) => writeln!(note, "sandbox is running; logs in {}", dir.display()),
        LogPlace::Retained(dir) => writeln!(
            note,
            "sandbox is gone; its logs were kept in {}",
            dir.display()
        ),
    };
    for file in place.files() {
        let mut text = Vec::new();
        logs::copy_tail(&file, &mut text, FILE_MAX)
            .map_err(io(format!("read {}", file.display())))?;
        if let Some(n) = tail {
            text = last_lines(&text, n);
        }
        let mut write = || -> std::io::Result<()> {
            writeln!(out, "==> {} <==", file.display())?;
            out.write_all(&text)?;
            if !text.is_empty() && !text.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
            Ok(())
        };
        write().map_err(io("write the logs".into()))?;
    }
    Ok(place)
}

/// Prints what the files of a live sandbox gain (a rotated or truncated file from its
/// start, at most [`FILE_MAX`] per look) until its state file is gone.
pub async fn follow(place: &LogPlace, out: &mut impl Write) -> Result<(), CliError> {
    let LogPlace::Live(dir) = place else {
        return Ok(());
    };
    let len = |p: &PathBuf| p.metadata().map_or(0, |m| m.len());
    let files: Vec<PathBuf> = LOG_FILES.iter().map(|f| dir.join(f)).collect();
    let mut seen: HashMap<&PathBuf, u64> = files.iter().map(|f| (f, len(f))).collect();
    let mut current: Option<&PathBuf> = None;
    while place.running() {
        for file in &files {
            let (now, was) = (len(file), seen[file]);
            let from = if now < was { 0 } else { was };
            seen.insert(file, now);
            if now <= from {
                continue;
            }
            let text = read_range(file, from.max(now.saturating_sub(FILE_MAX)), now).map_err(
                |source| CliError::Io {
                    context: format!("read {}", file.display()),
                    source,
                },
            )?;
            let mut write = || -> std::io::Result<()> {
                if current != Some(file) {
                    writeln!(out, "==> {} <==", file.display())?;
                    current = Some(file);
                }
                out.write_all(&text)?;
                out.flush()
            };
            write().map_err(|source| CliError::Io {
                context: "write the logs".into(),
                source,
            })?;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
    Ok(())
}

/// Bytes `from..to` of `path` (fewer if it shrank meanwhile).
fn read_range(path: &std::path::Path, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut text = Vec::new();
    f.take(to - from).read_to_end(&mut text)?;
    Ok(text)
}

/// The last `n` lines of `text`.
fn last_lines(text: &[u8], n: usize) -> Vec<u8> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let start = body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    if n == 0 {
        return Vec::new();
    }
    text[start..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_of_a_file() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 1), b"c");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
    }
}
