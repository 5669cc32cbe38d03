//! Containers' cgroup v2 directories: setup, stats, limits, freezing, membership, removal.
//!
//! Every container lives in `/sys/fs/cgroup/shoji/<id>` (its spec's cgroupsPath is
//! `/shoji/<id>`). The agent and its helpers stay in the root cgroup, outside `shoji`.
use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use libcontainer::oci_spec::runtime::LinuxResources;
use shoji_agent_api::types::ContainerStatsResponse;

pub const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every container's cgroup, relative to [`ROOT`].
pub const PARENT: &str = "shoji";
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: cannot parse {text:?}")]
    Parse { path: PathBuf, text: String },
    #[error("cgroup {0} still has processes after they were killed")]
    Busy(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroupsPath a container's spec gets.
pub fn spec_path(id: &str) -> String {
    format!("/{PARENT}/{id}")
}

pub fn dir(id: &str) -> PathBuf {
    Path::new(ROOT).join(PARENT).join(id)
}

/// Creates the containers' parent cgroup with every controller enabled down to the
/// containers. One by one, so that a controller missing from the kernel disables only
/// itself (reported in the error).
pub fn init_root() -> Result<(), CgroupError> {
    let root = Path::new(ROOT);
    let parent = root.join(PARENT);
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let mut first_error = None;
    for dir in [root, parent.as_path()] {
        for c in CONTROLLERS {
            if let Err(e) = write(&dir.join("cgroup.subtree_control"), &format!("+{c}")) {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// A flat-keyed file (`cpu.stat`, `memory.stat`, `memory.events`) as a map.
fn parse_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| v.trim().parse().ok().map(|v| (k, v)))
        .collect()
}

/// A single-value file; `max` is 0 (unlimited).
fn parse_value(path: &Path, text: &str) -> Result<u64, CgroupError> {
    match text.trim() {
        "max" => Ok(0),
        t => t.parse().map_err(|_| CgroupError::Parse {
            path: path.to_path_buf(),
            text: t.to_string(),
        }),
    }
}

fn read_value(dir: &Path, file: &str) -> Result<u64, CgroupError> {
    let path = dir.join(file);
    parse_value(&path, &read(&path)?)
}

fn read_keyed(dir: &Path, file: &str) -> Result<HashMap<String, u64>, CgroupError> {
    let text = read(&dir.join(file))?;
    Ok(parse_keyed(&text)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect())
}

/// The number of OOM kills recorded in a cgroup's `memory.events`.
pub fn oom_kills(dir: &Path) -> Result<u64, CgroupError> {
    Ok(read_keyed(dir, "memory.events")?
        .get("oom_kill")
        .copied()
        .unwrap_or(0))
}

pub fn stats(dir: &Path) -> Result<ContainerStatsResponse, CgroupError> {
    let cpu = read_keyed(dir, "cpu.stat")?;
    let mem = read_keyed(dir, "memory.stat")?;
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let usage = read_value(dir, "memory.current")?;
    let mut s = ContainerStatsResponse::new();
    s.cpu_usage_usec = get(&cpu, "usage_usec");
    s.cpu_user_usec = get(&cpu, "user_usec");
    s.cpu_system_usec = get(&cpu, "system_usec");
    s.cpu_nr_periods = get(&cpu, "nr_periods");
    s.cpu_nr_throttled = get(&cpu, "nr_throttled");
    s.cpu_throttled_usec = get(&cpu, "throttled_usec");
    s.memory_usage_bytes = usage;
    s.memory_limit_bytes = read_value(dir, "memory.max")?;
    s.memory_working_set_bytes = usage.saturating_sub(get(&mem, "inactive_file"));
    s.memory_rss_bytes = get(&mem, "anon");
    s.memory_cache_bytes = get(&mem, "file");
    // memory.peak exists from Linux 5.19.
    s.memory_max_usage_bytes = read_value(dir, "memory.peak").unwrap_or(0);
    s.pids_current = read_value(dir, "pids.current")?;
    s.pids_limit = read_value(dir, "pids.max")?;
    s.oom_kill_count = oom_kills(dir)?;
    Ok(s)
}

/// Every pid in the cgroup and its descendants.
pub fn pids(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let mut out = Vec::new();
    collect_pids(dir, &mut out)?;
    Ok(out)
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    out.extend(
        read(&procs)?
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok()),
    );
    for entry in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_pids(&entry.path(), out)?;
        }
    }
    Ok(())
}

/// Freezes or thaws the cgroup and waits (≤ 2 s) until the kernel reports it done.
pub async fn freeze(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
    write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    let events = dir.join("cgroup.events");
    for _ in 0..200 {
        if read(&events)?.lines().any(|l| l == want) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(CgroupError::Parse {
        path: events,
        text: format!("did not reach {want:?} within 2 s"),
    })
}

/// True when the cgroup is frozen (paused); a cgroup that cannot be read is not.
pub fn is_frozen(dir: &Path) -> bool {
    read(&dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
}

/// SIGKILLs everything in the cgroup (also works while it is frozen).
pub fn kill_all(dir: &Path) -> Result<(), CgroupError> {
    match fs::write(dir.join("cgroup.kill"), "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(io_err(dir)),
    }
}

/// Removes the cgroup (children first), waiting up to 2 s for killed processes to leave.
/// Already gone is success.
pub async fn remove(dir: &Path) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                Box::pin(remove(&entry.path())).await?;
            }
        }
    }
    for _ in 0..200 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => {
                return Err(CgroupError::Io {
                    path: dir.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    Err(CgroupError::Busy(dir.to_path_buf()))
}

/// cgroup v1 cpu.shares → cgroup v2 cpu.weight, the conversion runc and the kernel docs use.
fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + (shares.clamp(2, 262144) - 2) * 9999 / 262142
}

/// The cgroup v2 files (name, content) that apply `r`.
fn resource_files(r: &LinuxResources) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let limit = |v: i64| {
        if v < 0 {
            "max".to_string()
        } else {
            v.to_string()
        }
    };
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            files.push(("cpu.weight".into(), shares_to_weight(shares).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = cpu
                .quota()
                .filter(|q| *q > 0)
                .map(|q| q.to_string())
                .unwrap_or_else(|| "max".into());
            let period = cpu.period().unwrap_or(100_000);
            files.push(("cpu.max".into(), format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus() {
            files.push(("cpuset.cpus".into(), cpus.clone()));
        }
        if let Some(mems) = cpu.mems() {
            files.push(("cpuset.mems".into(), mems.clone()));
        }
    }
    if let Some(mem) = r.memory() {
        if let Some(l) = mem.limit() {
            files.push(("memory.max".into(), limit(l)));
        }
        if let Some(l) = mem.reservation() {
            files.push(("memory.low".into(), limit(l)));
        }
    }
    if let Some(pids) = r.pids() {
        files.push((
            "pids.max".into(),
            if pids.limit() > 0 {
                pids.limit().to_string()
            } else {
                "max".into()
            },
        ));
    }
    if let Some(unified) = r.unified() {
        let mut extra: Vec<_> = unified
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    files
}

/// Applies OCI LinuxResources to the cgroup's files.
pub fn update(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
    for (file, value) in resource_files(r) {
        // A file name must not climb out of the cgroup.
        if file.contains('/') {
            return Err(CgroupError::Parse {
                path: dir.to_path_buf(),
                text: file,
            });
        }
        write(&dir.join(&file), &value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files() {
        let m = parse_keyed("usage_usec 120\nuser_usec 100\nsystem_usec 20\nbogus\n");
        assert_eq!(m["usage_usec"], 120);
        assert_eq!(m.len(), 3);
        assert_eq!(parse_value(Path::new("x"), "max\n").unwrap(), 0);
        assert_eq!(parse_value(Path::new("x"), "4096\n").unwrap(), 4096);
        assert!(parse_value(Path::new("x"), "lots").is_err());
    }

    #[test]
    fn stats_from_files() {
        let d = std::env::temp_dir().join(format!("shoji-agent-cg-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        for (f, v) in [
            ("cpu.stat", "usage_usec 50\nuser_usec 30\nsystem_usec 20\nnr_periods 4\nnr_throttled 1\nthrottled_usec 7\n"),
            ("memory.stat", "anon 1000\nfile 3000\ninactive_file 2500\n"),
            ("memory.current", "5000\n"),
            ("memory.max", "max\n"),
            ("pids.current", "3\n"),
            ("pids.max", "100\n"),
            ("memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n"),
            ("cgroup.procs", "12\n13\n"),
        ] {
            fs::write(d.join(f), v).unwrap();
        }
        let s = stats(&d).unwrap();
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_nr_throttled, s.cpu_throttled_usec),
            (50, 1, 7)
        );
        assert_eq!(
            (
                s.memory_usage_bytes,
                s.memory_limit_bytes,
                s.memory_working_set_bytes
            ),
            (5000, 0, 2500)
        );
        assert_eq!(
            (
                s.memory_rss_bytes,
                s.memory_cache_bytes,
                s.memory_max_usage_bytes
            ),
            (1000, 3000, 0)
        );
        assert_eq!(
            (s.pids_current, s.pids_limit, s.oom_kill_count),
            (3, 100, 1)
        );
        assert_eq!(pids(&d).unwrap(), vec![12, 13]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resources_to_files() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"cpu":{"shares":1024,"quota":50000,"period":100000},"memory":{"limit":33554432},"pids":{"limit":-1},
                "unified":{"memory.high":"30000000"}}"#,
        )
        .unwrap();
        assert_eq!(
            resource_files(&r),
            vec![
                ("cpu.weight".to_string(), "39".to_string()),
                ("cpu.max".into(), "50000 100000".into()),
                ("memory.max".into(), "33554432".into()),
                ("pids.max".into(), "max".into()),
                ("memory.high".into(), "30000000".into()),
            ]
        );
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262144), 10000);
    }
}
