//! containerd's configuration as `shoji check` reads it: the handlers whose `runtime_type`
//! is shoji's (1.6/1.7 `version = 2` and 2.x `version = 3` layouts, drop-ins named by
//! `imports`), their `ConfigPath`, runc's cgroup driver (`SystemdCgroup`) and CNI's
//! plugin directories.
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::{Check, Verdict};
use crate::containerd::RUNTIME_TYPE;

/// Where containerd reads its configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/containerd/config.toml";
/// Most files read through `imports`.
const MAX_FILES: usize = 32;
/// Where the CRI plugin keeps its runtimes, by config version.
const V2_RUNTIMES: &[&str] = &[
    "plugins",
    "io.containerd.grpc.v1.cri",
    "containerd",
    "runtimes",
];
const V3_RUNTIMES: &[&str] = &[
    "plugins",
    "io.containerd.cri.v1.runtime",
    "containerd",
    "runtimes",
];

/// A handler of shoji's runtime type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    pub name: String,
    /// Its table, dotted (`plugins.io.containerd.grpc.v1.cri.containerd.runtimes.shoji`).
    pub table: String,
    pub config_path: Option<PathBuf>,
    /// Whether the table is where this file's `version` puts runtimes.
    pub layout_ok: bool,
    pub file: PathBuf,
}

/// What `shoji check` needs of containerd's configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    pub files: Vec<PathBuf>,
    /// The main file's `version` (1 when absent, as containerd reads it).
    pub version: i64,
    pub handlers: Vec<Handler>,
    /// `SystemdCgroup` of any runtime's options, when set.
    pub systemd_cgroup: Option<bool>,
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The main file's `[grpc] address`: containerd's socket.
    pub grpc_address: Option<PathBuf>,
}

/// Reads `path` and the files it imports.
pub fn read(path: &Path) -> Result<ContainerdConfig, String> {
    let mut cfg = ContainerdConfig::default();
    let mut pending = vec![path.to_path_buf()];
    while let Some(file) = pending.pop() {
        if cfg.files.contains(&file) || cfg.files.len() >= MAX_FILES {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("{}: {}", file.display(), e.message()))?;
        let version = table
            .get("version")
            .and_then(Value::as_integer)
            .unwrap_or(1);
        if cfg.files.is_empty() {
            cfg.version = version;
            cfg.grpc_address = table
                .get("grpc")
                .and_then(|g| g.get("address"))
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
                .map(PathBuf::from);
        }
        cfg.files.push(file.clone());
        let base = file.parent().unwrap_or(Path::new("/"));
        for pattern in table
            .get("imports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            pending.extend(expand(&base.join(pattern)));
        }
        walk(&table, &mut Vec::new(), &mut |keys, t| {
            visit(&mut cfg, &file, version, keys, t)
        });
    }
    Ok(cfg)
}

/// Calls `f` for every table with its key path.
fn walk(t: &Table, keys: &mut Vec<String>, f: &mut dyn FnMut(&[String], &Table)) {
    f(keys, t);
    for (k, v) in t {
        if let Value::Table(sub) = v {
            keys.push(k.clone());
            walk(sub, keys, f);
            keys.pop();
        }
    }
}

fn visit(cfg: &mut ContainerdConfig, file: &Path, version: i64, keys: &[String], t: &Table) {
    if t.get("runtime_type").and_then(Value::as_str) == Some(RUNTIME_TYPE) {
        let expected = if version >= 3 {
            V3_RUNTIMES
        } else {
            V2_RUNTIMES
        };
        cfg.handlers.push(Handler {
            name: keys.last().cloned().unwrap_or_default(),
            table: keys.join("."),
            config_path: t
                .get("options")
                .and_then(Value::as_table)
                .and_then(|o| o.get("ConfigPath"))
                .and_then(Value::as_str)
                .map(PathBuf::from),
            layout_ok: keys.len() == expected.len() + 1
                && keys.iter().zip(expected).all(|(a, b)| a == b),
            file: file.to_path_buf(),
        });
    }
    if let Some(systemd) = t.get("SystemdCgroup").and_then(Value::as_bool) {
        cfg.systemd_cgroup = Some(cfg.systemd_cgroup.unwrap_or(false) || systemd);
    }
    if keys.last().map(String::as_str) == Some("cni") {
        let dirs = t
            .get("bin_dirs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        let dir = t.get("bin_dir").into_iter();
        cfg.cni_bin_dirs
            .extend(dirs.chain(dir).filter_map(Value::as_str).map(PathBuf::from));
    }
}

/// The files a pattern names: a path, or a `*` in its last component.
fn expand(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![pattern.to_path_buf()];
    };
    let dir = pattern.parent().unwrap_or(Path::new("/"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().map(|n| n.to_string_lossy()).is_some_and(|n| {
                n.starts_with(prefix)
                    && n.ends_with(suffix)
                    && n.len() >= prefix.len() + suffix.len()
            })
        })
        .collect();
    files.sort();
    // Popped from the end: keep the order containerd merges them in.
    files.reverse();
    files
}

/// The containerd lines of `shoji check` for the configuration at `path`.
pub fn checks(path: &Path) -> (Vec<Check>, Option<ContainerdConfig>) {
    let line = |name, verdict, detail: String, fix: Option<&str>| Check {
        name,
        verdict,
        detail,
        fix: fix.map(String::from),
    };
    let cfg = match read(path) {
        Ok(c) => c,
        Err(e) => {
            let fix = "write containerd's configuration with a shoji handler (docs/operating.md, section 4)";
            return (
                vec![line("containerd config", Verdict::Warn, e, Some(fix))],
                None,
            );
        }
    };
    let mut out = vec![line(
        "containerd config",
        Verdict::Ok,
        format!(
            "{} (version = {}, {} file(s))",
            path.display(),
            cfg.version,
            cfg.files.len()
        ),
        None,
    )];
    if cfg.handlers.is_empty() {
        out.push(line(
            "shoji handler",
            Verdict::Warn,
            format!("no runtime with runtime_type = \"{RUNTIME_TYPE}\": CRI (Kubernetes) cannot use shoji"),
            Some("add the handler tables of docs/operating.md section 4 (hack/install.sh does), restart containerd"),
        ));
    }
    for h in &cfg.handlers {
        let config = h.config_path.as_ref().map_or("no ConfigPath".into(), |p| {
            format!("ConfigPath {}", p.display())
        });
        let detail = format!("{} ({config}) in {}", h.name, h.file.display());
        out.push(match &h.config_path {
            _ if !h.layout_ok => line(
                "shoji handler",
                Verdict::Warn,
                format!(
                    "{detail}: table [{}] is not where version = {} keeps runtimes",
                    h.table, cfg.version
                ),
                Some("use the tables of docs/operating.md section 4 for this containerd version"),
            ),
            Some(p) if !p.is_file() => line(
                "shoji handler",
                Verdict::Missing,
                format!("{detail}: {} does not exist", p.display()),
                Some("install the handler's configuration file (hack/install.sh)"),
            ),
            _ => line("shoji handler", Verdict::Ok, detail, None),
        });
    }
    // Both drivers' cgroup paths put the VM in its pod's cgroup (host_cgroup): informational.
    let driver = match cfg.systemd_cgroup {
        Some(true) => "systemd (SystemdCgroup = true): VMs go in cri-containerd-<id>.scope",
        _ => "cgroupfs (SystemdCgroup is not set)",
    };
    out.push(line("cgroup driver", Verdict::Ok, driver.into(), None));
    (out, Some(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("shoji-check-ctrd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("conf.d")).unwrap();
        d
    }

    #[test]
    fn version_2_with_a_drop_in_and_systemd_runc() {
        let d = scratch("v2");
        let handler_cfg = d.join("qemu.toml");
        std::fs::write(&handler_cfg, "").unwrap();
        std::fs::write(
            d.join("config.toml"),
            "version = 2\nimports = [\"conf.d/*.toml\"]\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/opt/cni/bin\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = true\n",
        )
        .unwrap();
        std::fs::write(
            d.join("conf.d/shoji.toml"),
            format!(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.shoji-qemu]\n  \
                 runtime_type = \"io.containerd.shoji.v2\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.shoji-qemu.options]\n  ConfigPath = \"{}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.shoji]\n  runtime_type = \"io.containerd.shoji.v2\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.shoji.options]\n  ConfigPath = \"/nonexistent/clh.toml\"\n",
                handler_cfg.display()
            ),
        )
        .unwrap();
        let cfg = read(&d.join("config.toml")).unwrap();
        assert_eq!(cfg.version, 2);
        assert_eq!(cfg.files.len(), 2);
        assert_eq!(cfg.systemd_cgroup, Some(true));
        assert_eq!(cfg.cni_bin_dirs, [PathBuf::from("/opt/cni/bin")]);
        let mut names: Vec<&str> = cfg.handlers.iter().map(|h| h.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["shoji", "shoji-qemu"]);
        assert!(cfg.handlers.iter().all(|h| h.layout_ok));
        let (lines, _) = checks(&d.join("config.toml"));
        let verdict = |name: &str, want: Verdict| {
            assert!(
                lines.iter().any(|c| c.name == name && c.verdict == want),
                "{name} {want}: {lines:#?}"
            );
        };
        verdict("shoji handler", Verdict::Ok);
        verdict("shoji handler", Verdict::Missing);
        verdict("cgroup driver", Verdict::Ok);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn version_3_layout_and_misplaced_tables() {
        let d = scratch("v3");
        std::fs::write(
            d.join("config.toml"),
            "version = 3\n\
             [plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = [\"/usr/lib/cni\"]\n\
             [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.shoji]\n  runtime_type = \"io.containerd.shoji.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.old]\n  runtime_type = \"io.containerd.shoji.v2\"\n",
        )
        .unwrap();
        let cfg = read(&d.join("config.toml")).unwrap();
        assert_eq!(cfg.version, 3);
        assert_eq!(cfg.systemd_cgroup, None);
        assert_eq!(cfg.cni_bin_dirs, [PathBuf::from("/usr/lib/cni")]);
        let ok: Vec<(&str, bool)> = cfg
            .handlers
            .iter()
            .map(|h| (h.name.as_str(), h.layout_ok))
            .collect();
        assert!(
            ok.contains(&("shoji", true)) && ok.contains(&("old", false)),
            "{ok:?}"
        );
        let (lines, _) = checks(&d.join("config.toml"));
        assert!(lines
            .iter()
            .any(|c| c.verdict == Verdict::Warn && c.detail.contains("not where version = 3")));
        // No file: containerd's defaults have no shoji handler.
        let (lines, cfg) = checks(&d.join("absent.toml"));
        assert!(
            cfg.is_none() && lines[0].verdict == Verdict::Warn,
            "{lines:?}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
