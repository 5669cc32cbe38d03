//! What the shim reads about host processes from `/proc`: start time (to tell a recycled pid
//! from a recorded one), state, parent, CPU time, memory, command line.
use std::time::Duration;

/// The fields of `/proc/<pid>/stat` the shim uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `Z`, ...
    pub state: char,
    pub ppid: u32,
    /// User and system CPU time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Clock ticks since boot when the process started.
    pub start_time: u64,
}

/// Parses `/proc/<pid>/stat`; `None` when the process does not exist.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) may contain spaces and ')': it ends at the last ')'.
    let rest: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    // `rest[0]` is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        state: rest.first()?.chars().next()?,
        ppid: field(4)? as u32,
        utime: field(14)?,
        stime: field(15)?,
        start_time: field(22)?,
    })
}

/// The process's start time (clock ticks since boot).
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

/// True for a process that exited but was not reaped yet: it holds nothing any more.
pub fn is_zombie(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state == 'Z')
}

/// User + system CPU time.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = stat(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis((s.utime + s.stime) * 1000 / hz))
}

/// A `Key:  value` line of `/proc/<pid>/status`.
fn status_field(pid: u32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// The process's name (`comm`).
pub fn name(pid: u32) -> Option<String> {
    status_field(pid, "Name")
}

/// Resident memory in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS")?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Proportional set size in KiB (shared pages divided among their users).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The command line, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .split('\0')
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The host's memory in KiB (MemTotal).
pub fn mem_total_kib() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Whether a Unix socket at `path` is listening, in the `/proc/net/unix` of process `pid`'s
/// network namespace (a jailed daemon has its own). Read instead of probed: a vhost-user
/// daemon takes a connection that ends as its front-end leaving, and re-creates its socket,
/// which a VMM connecting in that moment does not find.
pub fn unix_listening(pid: u32, path: &std::path::Path) -> bool {
    /// `__SO_ACCEPTCON`: the socket called listen().
    const LISTENING: &str = "00010000";
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return false;
    };
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() == 8 && f[3] == LISTENING && std::path::Path::new(f[7]) == path
    })
}

/// Every pid on the host.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// `pids` and their direct children (virtiofsd serves from a sandboxed child process).
pub fn with_children(pids: &[u32]) -> Vec<u32> {
    let mut all = pids.to_vec();
    all.extend(
        all_pids()
            .into_iter()
            .filter(|p| stat(*p).is_some_and(|s| pids.contains(&s.ppid))),
    );
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_unix_socket_is_seen_and_a_closed_one_is_not() {
        let path = std::env::temp_dir().join(format!("shoji-listen-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        assert!(!unix_listening(std::process::id(), &path));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(unix_listening(std::process::id(), &path));
        drop(listener);
        assert!(!unix_listening(std::process::id(), &path));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn stat_fields_survive_a_name_with_spaces_and_parens() {
        let line = "42 (a b) c) S 7 42 42 0 -1 4194304 1 0 0 0 11 22 0 0 20 0 1 0 12345 100 10";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 7);
        assert_eq!((s.utime, s.stime), (11, 22));
        assert_eq!(s.start_time, 12345);
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(start_time(me).unwrap() > 0);
        assert!(!is_zombie(me));
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cmdline(me).is_some());
        assert!(all_pids().contains(&me));
    }
}
