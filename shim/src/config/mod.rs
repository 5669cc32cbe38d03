//! The runtime's configuration file (TOML), shared by the shim and the `shoji` CLI.
//!
//! Looked up at `$SHOJI_CONFIG`, else `/etc/shoji/config.toml`; every key is optional and
//! the defaults work on a host prepared by `hack/setup.sh`. Unknown keys are rejected (a
//! typo must not silently fall back to a default). See docs/configuration.md.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
/// Bare binary names are looked up in `$PATH`, then `~/.cargo/bin`.
pub use shoji_probe::find_binary;

/// Where the configuration file is read from when `$SHOJI_CONFIG` is not set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shoji/config.toml";
/// Base directory of the per-sandbox directories when `$SHOJI_RUN_DIR` is not set.
pub const DEFAULT_RUN_DIR: &str = "/run/shoji";
/// Where the logs of torn-down sandboxes are kept by default.
pub const DEFAULT_LOG_DIR: &str = "/var/log/shoji";
/// Most torn-down sandboxes whose logs `log_retention` may keep.
const MAX_LOG_RETENTION: u32 = 10_000;
/// Build cache of the guest kernel and initramfs when `$SHOJI_CACHE` is not set.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/shoji";
/// Bounds of the VM-size settings: what the VMMs and the guest kernel (NR_CPUS 64) accept.
const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u64 = 64;
const MAX_MEMORY_MIB: u64 = 1 << 20;
/// No timeout is longer than an hour: a bound, and far from any arithmetic overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The host's CPUs (the default `max_vcpus`).
fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() as u32)
        .clamp(1, MAX_VCPUS)
}

/// The host's memory in MiB (the default `max_memory_mib`), from /proc/meminfo.
fn host_memory_mib() -> u64 {
    crate::procfs::mem_total_kib()
        .map_or(1024, |kib| kib / 1024)
        .clamp(MIN_MEMORY_MIB, MAX_MEMORY_MIB)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration in {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The whole file. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `auto` (Cloud Hypervisor where it can run, else QEMU; see
    /// [`crate::hypervisor::choice`]), `qemu` or `clh`.
    pub hypervisor: HypervisorChoice,
    /// Guest kernel (uncompressed vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs holding shoji-agent as /init.
    pub initrd: PathBuf,
    /// vCPUs of a sandbox whose pod declares no CPU limit.
    pub default_vcpus: u32,
    /// Guest memory (MiB) of a sandbox whose pod declares no memory limit.
    pub default_memory_mib: u64,
    /// Memory (MiB) added to a pod's declared memory limit for the guest kernel and agent.
    pub memory_overhead_mib: u64,
    /// The most vCPUs a sandbox may have; a pod asking for more is refused (default: the
    /// host's CPUs).
    pub max_vcpus: u32,
    /// The most memory (MiB, overhead included) a sandbox may have; a pod asking for more is
    /// refused (default: the host's memory).
    pub max_memory_mib: u64,
    /// Extra guest kernel arguments, appended to the driver's own.
    pub kernel_args: Vec<String>,
    /// Log level of the shim and the agent: error, warn, info or debug.
    pub log_level: String,
    /// Base directory of the per-sandbox directories (`$SHOJI_RUN_DIR` overrides it).
    pub run_dir: PathBuf,
    /// Where a torn-down sandbox's logs (guest console, daemons) are kept: `<log_dir>/<id>/`.
    pub log_dir: PathBuf,
    /// How many torn-down sandboxes keep their logs in `log_dir` (the oldest go first);
    /// 0 keeps none.
    pub log_retention: u32,
    /// Allows `shoji console` (a shell in the guest, outside every container) on sandboxes
    /// booted while it is set.
    pub debug_console: bool,
    /// The guest reports memory it has freed (whole 2 MiB blocks) and the VMM returns it to
    /// the host (virtio-balloon free page reporting): a pod that once used a lot and freed it
    /// no longer holds it on the host. Reusing a returned block costs the guest a host page
    /// fault.
    pub free_page_reporting: bool,
    pub virtiofsd: VirtiofsdConfig,
    pub qemu: QemuConfig,
    pub clh: ClhConfig,
    pub vhost_device_vsock: BinaryConfig,
    pub jail: JailConfig,
    pub timeouts: Timeouts,
}

/// How the VMM and the vsock back-end are confined (see [`crate::jail`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// Off runs them as the shim does (root, the host's namespaces): for debugging only.
    pub enabled: bool,
    /// The range of per-sandbox uids (and gids): no account on the node may use it.
    pub first_uid: u32,
    pub uid_count: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        // Far above the ranges of accounts (< 65536) and of subordinate ids for user
        // namespaces (100000 + 65536 * n, as useradd hands them out).
        JailConfig {
            enabled: true,
            first_uid: 0x7e00_0000,
            uid_count: 65536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VirtiofsdConfig {
    pub path: PathBuf,
    /// `--cache` mode: never, auto or always.
    pub cache: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub path: PathBuf,
    /// `auto` (KVM when [`crate::kvm::probe`] shows it runs an ordinary guest, else TCG),
    /// `kvm` or `tcg`.
    pub accel: AccelChoice,
    /// TCG translation cache size (MiB) when QEMU has to emulate. QEMU keeps it all resident
    /// once filled; when full it is flushed and everything is translated again, so too small
    /// a cache makes every exec and create retranslate the code they run (docs/benchmarks.md).
    pub tcg_tb_size_mib: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorChoice {
    Auto,
    Qemu,
    /// Cloud Hypervisor: needs a KVM that runs ordinary guests.
    Clh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClhConfig {
    pub path: PathBuf,
}

/// A helper binary whose only setting is its path.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryConfig {
    pub path: PathBuf,
}

/// Time limits, in milliseconds in the file.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// VMM and its device daemons launched and the guest booting.
    #[serde(rename = "vm_start_ms", with = "millis")]
    pub vm_start: Duration,
    /// VMM start → the agent announced itself.
    #[serde(rename = "agent_ready_ms", with = "millis")]
    pub agent_ready: Duration,
    /// One ordinary agent call.
    #[serde(rename = "agent_call_ms", with = "millis")]
    pub agent_call: Duration,
    /// Graceful VM shutdown before the VMM is killed.
    #[serde(rename = "shutdown_ms", with = "millis")]
    pub shutdown: Duration,
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        // Sized for TCG on a loaded 2-core host; KVM hosts finish well within them.
        Timeouts {
            vm_start: Duration::from_secs(10),
            agent_ready: Duration::from_secs(30),
            agent_call: Duration::from_secs(15),
            shutdown: Duration::from_secs(3),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let cache = cache_dir();
        Config {
            hypervisor: HypervisorChoice::Auto,
            kernel: cache.join("vmlinux"),
            initrd: cache.join("initramfs.img"),
            default_vcpus: 1,
            default_memory_mib: 256,
            memory_overhead_mib: 64,
            max_vcpus: host_cpus(),
            max_memory_mib: host_memory_mib(),
            kernel_args: Vec::new(),
            log_level: "info".into(),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            log_dir: PathBuf::from(DEFAULT_LOG_DIR),
            log_retention: 20,
            debug_console: false,
            free_page_reporting: true,
            virtiofsd: VirtiofsdConfig::default(),
            qemu: QemuConfig::default(),
            clh: ClhConfig::default(),
            vhost_device_vsock: BinaryConfig {
                path: find_binary("vhost-device-vsock"),
            },
            jail: JailConfig::default(),
            timeouts: Timeouts::default(),
        }
    }
}

impl Default for VirtiofsdConfig {
    fn default() -> Self {
        // `auto` lets the guest cache lookups for a second; `never` costs a round trip each.
        VirtiofsdConfig {
            path: find_binary("virtiofsd"),
            cache: "auto".into(),
        }
    }
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            path: find_binary("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            tcg_tb_size_mib: 32,
        }
    }
}

impl Default for ClhConfig {
    fn default() -> Self {
        ClhConfig {
            path: find_binary("cloud-hypervisor"),
        }
    }
}

impl Config {
    /// Reads `$SHOJI_CONFIG` or [`DEFAULT_CONFIG_PATH`]; an absent default file means defaults.
    /// `$SHOJI_RUN_DIR` overrides `run_dir`.
    pub fn load() -> Result<Config, ConfigError> {
        Config::load_from(None)
    }

    /// Like [`Config::load`], but `path` (the runtime's `ConfigPath` option from containerd)
    /// wins over `$SHOJI_CONFIG` and the default path.
    pub fn load_from(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("SHOJI_CONFIG").map(PathBuf::from))
        {
            Some(path) => Config::from_file(&path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Config::default(),
        };
        if let Some(dir) = std::env::var_os("SHOJI_RUN_DIR") {
            cfg.run_dir = PathBuf::from(dir);
        }
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            // The message alone may not name the key ("invalid value: integer `-1`"): quote
            // the line it is about.
            let line = e.span().map(|span| {
                let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
                let end = text[span.start..]
                    .find('\n')
                    .map_or(text.len(), |i| span.start + i);
                let number = text[..span.start].matches('\n').count() + 1;
                format!(" (line {number}: `{}`)", text[start..end].trim())
            });
            ConfigError::Parse {
                path: origin.into(),
                message: format!("{}{}", e.message().trim(), line.unwrap_or_default()),
            }
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| {
            Err(ConfigError::Invalid {
                path: origin.into(),
                key,
                message,
            })
        };
        if self.jail.uid_count == 0
            || self.jail.first_uid == 0
            || self
                .jail
                .first_uid
                .checked_add(self.jail.uid_count)
                .is_none()
        {
            return invalid(
                "jail",
                format!(
                    "first_uid {} and uid_count {} must name a non-empty range of non-root uids below 2^32",
                    self.jail.first_uid, self.jail.uid_count
                ),
            );
        }
        if !(1..=MAX_VCPUS).contains(&self.max_vcpus) {
            return invalid(
                "max_vcpus",
                format!("{} is not within 1..={MAX_VCPUS}", self.max_vcpus),
            );
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.max_memory_mib) {
            return invalid(
                "max_memory_mib",
                format!(
                    "{} MiB is not within {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    self.max_memory_mib
                ),
            );
        }
        if !(1..=self.max_vcpus).contains(&self.default_vcpus) {
            return invalid(
                "default_vcpus",
                format!(
                    "{} is not within 1..={} (max_vcpus)",
                    self.default_vcpus, self.max_vcpus
                ),
            );
        }
        if !(MIN_MEMORY_MIB..=self.max_memory_mib).contains(&self.default_memory_mib) {
            return invalid(
                "default_memory_mib",
                format!(
                    "{} MiB is not within {MIN_MEMORY_MIB}..={} (max_memory_mib)",
                    self.default_memory_mib, self.max_memory_mib
                ),
            );
        }
        if self.memory_overhead_mib > self.max_memory_mib {
            return invalid(
                "memory_overhead_mib",
                format!(
                    "{} MiB is above max_memory_mib ({} MiB)",
                    self.memory_overhead_mib, self.max_memory_mib
                ),
            );
        }
        if !["never", "auto", "always", "metadata"].contains(&self.virtiofsd.cache.as_str()) {
            return invalid(
                "virtiofsd.cache",
                format!(
                    "{:?} is not one of never, auto, always, metadata",
                    self.virtiofsd.cache
                ),
            );
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return invalid(
                "log_level",
                format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    self.log_level
                ),
            );
        }
        if self
            .kernel_args
            .iter()
            .any(|a| a.is_empty() || a.contains(char::is_whitespace))
        {
            return invalid(
                "kernel_args",
                "each entry must be one non-empty word".into(),
            );
        }
        if self.log_retention > MAX_LOG_RETENTION {
            return invalid(
                "log_retention",
                format!("{} is above {MAX_LOG_RETENTION}", self.log_retention),
            );
        }
        if !self.log_dir.is_absolute() {
            return invalid(
                "log_dir",
                format!("{} is not an absolute path", self.log_dir.display()),
            );
        }
        let t = &self.timeouts;
        for (key, d) in [
            ("timeouts.vm_start_ms", t.vm_start),
            ("timeouts.agent_ready_ms", t.agent_ready),
            ("timeouts.agent_call_ms", t.agent_call),
            ("timeouts.shutdown_ms", t.shutdown),
        ] {
            if d.is_zero() || d > MAX_TIMEOUT {
                return invalid(
                    key,
                    format!(
                        "{} ms is not within 1..={} ms",
                        d.as_millis(),
                        MAX_TIMEOUT.as_millis()
                    ),
                );
            }
        }
        Ok(())
    }
}

/// `$SHOJI_CACHE` or [`DEFAULT_CACHE_DIR`].
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SHOJI_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
}

#[cfg(test)]
mod tests;
