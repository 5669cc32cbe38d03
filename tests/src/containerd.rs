//! A private containerd for tests: its own root, state, sockets and config in a temp dir, the CRI plugin set up
//! for runc and the shoji handlers, torn down (tasks, shims, mounts, dirs) by `stop()` or, as a safety net, `Drop`.
//!
//! Only one private containerd runs at a time on the host: containerd 1.6/1.7 put shim sockets and FIFOs under
//! `/run/containerd/{s,fifo}` whatever the config says, so `start` takes a host-wide file lock first.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use toml::{Table, Value};

/// Host-wide lock serialising private containerd instances (see the module doc).
const LOCK_PATH: &str = "/run/shoji-tests/containerd.lock";
/// The image CRI uses as the sandbox ("pause") container: `image::BUSYBOX`, whose default command sleeps.
pub const SANDBOX_IMAGE: &str = crate::image::BUSYBOX;
/// cgroup under which test pods get their cgroup parent (kubelet's job, so removing it is the harness's).
pub const POD_CGROUP_ROOT: &str = "/shoji-tests";
/// The runtime type the shoji shim answers to.
pub const SHOJI_RUNTIME: &str = "io.containerd.shoji.v2";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("containerd {version}: binary {path} missing (run hack/install-containerd.sh)")]
    NotInstalled { version: Version, path: PathBuf },
    #[error("containerd: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("containerd: timed out after {waited:?} waiting for the host-wide lock {LOCK_PATH}")]
    LockTimeout { waited: Duration },
    #[error("containerd {version} not ready after {waited:?}; log tail:\n{log}")]
    NotReady {
        version: Version,
        waited: Duration,
        log: String,
    },
    #[error("containerd {version} exited during start ({status}); log tail:\n{log}")]
    Exited {
        version: Version,
        status: ExitStatus,
        log: String,
    },
    #[error("ctr {args:?} timed out after {timeout:?}")]
    CtrTimeout {
        args: Vec<String>,
        timeout: Duration,
    },
    #[error("ctr {args:?} failed ({status}): {stderr}")]
    CtrFailed {
        args: Vec<String>,
        status: ExitStatus,
        stderr: String,
    },
    #[error("containerd left {0}")]
    Leftovers(String),
    #[error("containerd configuration {path}: {why}")]
    Config { path: PathBuf, why: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The containerd builds the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Debian bookworm, installed system-wide.
    V1_6,
    /// Debian trixie, unpacked by hack/install-containerd.sh.
    V1_7,
    /// Debian sid, unpacked by hack/install-containerd.sh.
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1_6 => "1.6",
            Version::V1_7 => "1.7",
            Version::V2 => "2.x",
        })
    }
}

impl Version {
    /// Directory holding `containerd`, `ctr` and that version's `containerd-shim-runc-v2`.
    pub fn bin_dir(self) -> PathBuf {
        let cache = cache_dir();
        match self {
            Version::V1_6 => PathBuf::from("/usr/bin"),
            Version::V1_7 => cache.join("containerd/1.7/usr/bin"),
            Version::V2 => cache.join("containerd/2/usr/bin"),
        }
    }

    /// The configuration `version` this containerd writes (`containerd config default`).
    fn config_version(self) -> i64 {
        match self {
            Version::V1_6 | Version::V1_7 => 2,
            Version::V2 => 3,
        }
    }

    /// `/etc/containerd/config.toml` as Debian's package of this version ships it (unpacked by
    /// hack/install-containerd.sh).
    pub fn packaged_config(self) -> PathBuf {
        let etc = match self {
            Version::V1_6 => cache_dir().join("containerd/1.6-conffiles"),
            Version::V1_7 | Version::V2 => self.bin_dir().join("../.."),
        };
        etc.join("etc/containerd/config.toml")
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("SHOJI_CACHE").map_or_else(|| PathBuf::from("/var/cache/shoji"), PathBuf::from)
}

/// What a test chooses about its containerd.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory holding `containerd-shim-shoji-v2`; put on containerd's PATH.
    pub shim_dir: Option<PathBuf>,
    /// CRI runtime handlers registered as `io.containerd.shoji.v2`, each with its `ConfigPath` option.
    pub shoji_handlers: Vec<(String, Option<PathBuf>)>,
    /// CNI conflist directory (see `cni::Network`); without it CRI has no pod network.
    pub cni_conf_dir: Option<PathBuf>,
    /// Extra environment for containerd (inherited by the shims), e.g. `SHOJI_RUN_DIR`.
    pub env: Vec<(String, String)>,
    /// An operator's configuration to run instead of the generated one (e.g. what
    /// hack/install.sh made of a node's): the harness sets only its isolation over it (see
    /// [`isolate`]) and gives runc the cgroupfs driver (this host runs no systemd for
    /// `SystemdCgroup = true`). `shoji_handlers` is then unused; `imports` must be absolute.
    pub operator_config: Option<PathBuf>,
    /// How long `start` waits for the host-wide lock (other tests' containerds).
    pub lock_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shim_dir: None,
            shoji_handlers: vec![("shoji".into(), None), ("shoji-qemu".into(), None)],
            cni_conf_dir: None,
            env: Vec::new(),
            operator_config: None,
            lock_timeout: Duration::from_secs(900),
        }
    }
}

struct ConfigParams<'a> {
    root: &'a Path,
    state: &'a Path,
    grpc: &'a Path,
    ttrpc: &'a Path,
    opt: &'a Path,
    cni_conf_dir: &'a Path,
    shoji_handlers: &'a [(String, Option<PathBuf>)],
}

/// The plugin that holds CRI's runtimes, CNI and OOM settings in a configuration `version`.
fn cri_runtime_plugin(version: i64) -> &'static str {
    if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

/// Sets `value` at the key path `keys` of `t`, making (or replacing with) tables on the way.
fn set(t: &mut Table, keys: &[impl AsRef<str>], value: impl Into<Value>) {
    let (last, path) = keys.split_last().expect("a key");
    let mut t = t;
    for k in path {
        let entry = t
            .entry(k.as_ref())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        t = entry.as_table_mut().expect("a table");
    }
    t.insert(last.as_ref().into(), value.into());
}

fn path_value(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// What keeps a test's containerd apart from the host's and from other tests': its own root,
/// state, sockets and opt directory, the test network's CNI configuration, the streaming server
/// on a free loopback port, no NRI socket, and no OOM score adjustment (root here lacks
/// CAP_SYS_RESOURCE).
fn isolate(t: &mut Table, version: i64, p: &ConfigParams) {
    let rt = cri_runtime_plugin(version);
    let grpc_cri = "io.containerd.grpc.v1.cri";
    set(t, &["root"], path_value(p.root));
    set(t, &["state"], path_value(p.state));
    set(t, &["grpc", "address"], path_value(p.grpc));
    set(t, &["ttrpc", "address"], path_value(p.ttrpc));
    set(
        t,
        &["plugins", "io.containerd.internal.v1.opt", "path"],
        path_value(p.opt),
    );
    set(t, &["plugins", "io.containerd.nri.v1.nri", "disable"], true);
    set(t, &["plugins", grpc_cri, "disable_tcp_service"], true);
    set(
        t,
        &["plugins", grpc_cri, "stream_server_address"],
        "127.0.0.1",
    );
    set(t, &["plugins", grpc_cri, "stream_server_port"], "0");
    set(t, &["plugins", rt, "restrict_oom_score_adj"], true);
    set(t, &["plugins", rt, "netns_mounts_under_state_dir"], true);
    set(t, &["plugins", rt, "enable_selinux"], false);
    if version >= 3 {
        set(t, &["plugins", rt, "enable_cdi"], false);
        set(t, &["plugins", rt, "cni", "bin_dirs"], vec!["/usr/lib/cni"]);
    } else {
        set(t, &["plugins", rt, "cni", "bin_dir"], "/usr/lib/cni");
    }
    set(
        t,
        &["plugins", rt, "cni", "conf_dir"],
        path_value(p.cni_conf_dir),
    );
}

/// The harness's own configuration: isolated, the busybox image as the sandbox image, runc
/// (cgroupfs) as the default runtime and the shoji handlers.
fn generated(version: i64, p: &ConfigParams) -> Table {
    let rt = cri_runtime_plugin(version);
    let mut t = Table::new();
    set(&mut t, &["version"], version);
    isolate(&mut t, version, p);
    if version >= 3 {
        let images = "io.containerd.cri.v1.images";
        set(
            &mut t,
            &["plugins", images, "pinned_images", "sandbox"],
            SANDBOX_IMAGE,
        );
    } else {
        set(&mut t, &["plugins", rt, "sandbox_image"], SANDBOX_IMAGE);
        set(
            &mut t,
            &["plugins", rt, "containerd", "snapshotter"],
            "overlayfs",
        );
    }
    set(
        &mut t,
        &["plugins", rt, "containerd", "default_runtime_name"],
        "runc",
    );
    let runtime = |name: &str, rest: &[&str]| -> Vec<String> {
        let path = ["plugins", rt, "containerd", "runtimes", name];
        path.iter().chain(rest).map(|k| k.to_string()).collect()
    };
    set(
        &mut t,
        &runtime("runc", &["runtime_type"]),
        "io.containerd.runc.v2",
    );
    set(
        &mut t,
        &runtime("runc", &["options", "SystemdCgroup"]),
        false,
    );
    for (handler, config) in p.shoji_handlers {
        set(&mut t, &runtime(handler, &["runtime_type"]), SHOJI_RUNTIME);
        if let Some(config) = config {
            set(
                &mut t,
                &runtime(handler, &["options", "ConfigPath"]),
                path_value(config),
            );
        }
    }
    t
}

/// An operator's configuration `text` with the harness's isolation set over it, and runc on
/// the cgroupfs driver (`SystemdCgroup = false` wherever it is true: no systemd here).
fn operator(text: &str, p: &ConfigParams) -> Result<Table, String> {
    let mut t: Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let version = t.get("version").and_then(Value::as_integer).unwrap_or(1);
    let relative = t
        .get("imports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|i| !i.starts_with('/'));
    if let Some(i) = relative {
        return Err(format!(
            "imports {i:?} is relative: the harness runs a copy elsewhere"
        ));
    }
    isolate(&mut t, version, p);
    let runtimes = [
        "plugins",
        cri_runtime_plugin(version),
        "containerd",
        "runtimes",
    ]
    .iter()
    .try_fold(&mut t, |t, k| t.get_mut(*k).and_then(Value::as_table_mut));
    for runtime in runtimes
        .into_iter()
        .flat_map(|r| r.iter_mut().map(|(_, v)| v))
    {
        let options = runtime.get_mut("options").and_then(Value::as_table_mut);
        if let Some(o) = options.filter(|o| o.get("SystemdCgroup") == Some(&Value::Boolean(true))) {
            o.insert("SystemdCgroup".into(), Value::Boolean(false));
        }
    }
    Ok(t)
}

/// Output of one `ctr` invocation.
#[derive(Debug)]
pub struct CtrOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtrOutput {
    /// The exit code, or 128 + signal when ctr was killed.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
}

/// A running private containerd. `stop()` tears it down; dropping it without `stop()` does the same, blocking.
pub struct Containerd {
    version: Version,
    dir: Option<tempfile::TempDir>,
    address: PathBuf,
    log: PathBuf,
    /// How containerd is launched (again, by `restart`).
    launch: Launch,
    child: tokio::process::Child,
    _lock: Flock<File>,
}

impl Containerd {
    /// Starts containerd `version` and waits (bounded) until it answers `ctr version`.
    pub async fn start(version: Version, opts: Options) -> Result<Containerd, Error> {
        let bin = version.bin_dir().join("containerd");
        if !bin.exists() {
            return Err(Error::NotInstalled { version, path: bin });
        }
        let lock = take_lock(opts.lock_timeout).await?;
        // Short paths: shim socket paths derive from them and Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("shoji-ctrd-")
            .tempdir_in("/tmp")
            .map_err(io_err("create temp dir"))?;
        let d = dir.path();
        let empty_cni = d.join("cni-none");
        let params = ConfigParams {
            root: &d.join("root"),
            state: &d.join("state"),
            grpc: &d.join("ctrd.sock"),
            ttrpc: &d.join("ctrd.ttrpc"),
            opt: &d.join("opt"),
            cni_conf_dir: opts.cni_conf_dir.as_deref().unwrap_or(&empty_cni),
            shoji_handlers: &opts.shoji_handlers,
        };
        fs::create_dir_all(&empty_cni).map_err(io_err("create cni-none"))?;
        let config = d.join("config.toml");
        let table = match &opts.operator_config {
            None => generated(version.config_version(), &params),
            Some(path) => {
                let text = fs::read_to_string(path).map_err(io_err(path.display().to_string()))?;
                operator(&text, &params).map_err(|why| Error::Config {
                    path: path.clone(),
                    why,
                })?
            }
        };
        let text = toml::to_string(&table).map_err(|e| Error::Config {
            path: config.clone(),
            why: e.to_string(),
        })?;
        fs::write(&config, text).map_err(io_err("write config.toml"))?;
        let address = params.grpc.to_path_buf();
        let log = d.join("containerd.log");

        let mut path = vec![version.bin_dir()];
        path.extend(opts.shim_dir.iter().cloned());
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let launch = Launch {
            bin,
            config,
            path: std::env::join_paths(path).expect("PATH entries without ':'"),
            env: opts.env.clone(),
        };
        let child = launch.spawn(&log)?;
        let mut ctrd = Containerd {
            version,
            dir: Some(dir),
            address,
            log,
            launch,
            child,
            _lock: lock,
        };
        ctrd.wait_ready(Duration::from_secs(30)).await?;
        Ok(ctrd)
    }

    /// Stops containerd (SIGTERM: its shims and their tasks keep running, as on a node) and
    /// starts it again on the same state; returns once it answers.
    pub async fn restart(&mut self) -> Result<(), Error> {
        let _ = kill(
            Pid::from_raw(self.child.id().expect("containerd runs") as i32),
            Signal::SIGTERM,
        );
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .map_err(|_| io_err("stop containerd")(std::io::ErrorKind::TimedOut.into()))?
            .map_err(io_err("wait containerd"))?;
        self.child = self.launch.spawn(&self.log)?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_err("wait containerd"))? {
                return Err(Error::Exited {
                    version: self.version,
                    status,
                    log: self.log_tail(),
                });
            }
            if self.address.exists() {
                if let Ok(out) = self
                    .ctr("default", &["version"], Duration::from_secs(5))
                    .await
                {
                    if out.status.success() {
                        return Ok(());
                    }
                }
            }
            if start.elapsed() > limit {
                return Err(Error::NotReady {
                    version: self.version,
                    waited: limit,
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The gRPC socket (CRI and containerd API).
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// Its configuration file.
    pub fn config_path(&self) -> &Path {
        &self.launch.config
    }

    /// This version's `containerd --config <its file> config dump`: the configuration as
    /// containerd merged it.
    pub async fn config_dump(&self) -> Result<String, Error> {
        let out = Command::new(self.version.bin_dir().join("containerd"))
            .arg("--config")
            .arg(&self.launch.config)
            .args(["config", "dump"])
            .stdin(Stdio::null())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .map_err(|_| io_err("containerd config dump")(std::io::ErrorKind::TimedOut.into()))?
            .map_err(io_err("containerd config dump"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The private directory (root, state, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir exists until stop").path()
    }

    /// containerd's whole log so far (it includes the shims' own log lines).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's length in bytes: where the next lines will start in [`Self::log_text`].
    pub fn log_len(&self) -> usize {
        fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    /// The last lines of containerd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs this version's `ctr --address <sock> -n <namespace> <args>`, killed after `timeout`.
    pub async fn ctr(
        &self,
        namespace: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<CtrOutput, Error> {
        let mut cmd = self.ctr_command(namespace, args);
        cmd.stdin(Stdio::null());
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| Error::CtrTimeout {
                args: args.iter().map(|s| s.to_string()).collect(),
                timeout,
            })?
            .map_err(io_err("run ctr"))?;
        Ok(CtrOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Like `ctr`, feeding `input` (None: nothing, only the EOF) on ctr's stdin and closing it once the task runs. `ctr run`/`ctr task exec`
    /// forward stdin and turn its EOF into CloseIO, but only once the task exists: an EOF before that is lost by
    /// ctr itself. So stdin is closed when `ctr tasks ls` shows a RUNNING task whose id is one of `args` (or
    /// when ctr exits first); the workload then sees the data and EOF.
    pub async fn ctr_with_input(
        &self,
        namespace: &str,
        args: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<CtrOutput, Error> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = self.ctr_command(namespace, args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let run = async {
            let mut child = cmd.spawn().map_err(io_err("spawn ctr"))?;
            let mut stdin = child.stdin.take().expect("piped stdin");
            // Output is drained concurrently so a chatty workload cannot block on a full pipe.
            let output = tokio::spawn(child.wait_with_output());
            if let Some(data) = input {
                stdin
                    .write_all(data)
                    .await
                    .map_err(io_err("write ctr stdin"))?;
            }
            while !output.is_finished() && !self.task_running(namespace, args).await? {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(stdin);
            output
                .await
                .expect("ctr output task")
                .map_err(io_err("wait ctr"))
        };
        let out = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| Error::CtrTimeout {
                args: args.iter().map(|s| s.to_string()).collect(),
                timeout,
            })??;
        Ok(CtrOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Whether `ctr tasks ls` shows a RUNNING task whose id is one of `candidates`.
    async fn task_running(&self, namespace: &str, candidates: &[&str]) -> Result<bool, Error> {
        let out = self
            .ctr_ok(namespace, &["tasks", "ls"], Duration::from_secs(10))
            .await?;
        Ok(out.stdout.lines().skip(1).any(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            cols.len() >= 3 && cols[2] == "RUNNING" && candidates.contains(&cols[0])
        }))
    }

    /// This version's `ctr --address <sock> -n <namespace> <args>` for interactive use (e.g. stdin): the caller
    /// sets stdio and bounds it with a timeout; it is killed when dropped.
    pub fn ctr_command(&self, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.version.bin_dir().join("ctr"));
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(namespace)
            .args(args);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Like `ctr`, but a non-zero exit is an error.
    pub async fn ctr_ok(
        &self,
        namespace: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<CtrOutput, Error> {
        let out = self.ctr(namespace, args, timeout).await?;
        if !out.status.success() {
            return Err(Error::CtrFailed {
                args: args.iter().map(|s| s.to_string()).collect(),
                status: out.status,
                stderr: out.stderr,
            });
        }
        Ok(out)
    }

    /// Names from a `ctr ... ls -q` listing.
    async fn list(&self, namespace: &str, args: &[&str]) -> Result<Vec<String>, Error> {
        let out = self
            .ctr_ok(namespace, args, Duration::from_secs(10))
            .await?;
        Ok(out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Every namespace's tasks and containers, as `namespace/id` (tasks prefixed `task `).
    pub async fn leftovers(&self) -> Result<Vec<String>, Error> {
        let mut left = Vec::new();
        for ns in self.list("default", &["namespaces", "ls", "-q"]).await? {
            for t in self.list(&ns, &["tasks", "ls", "-q"]).await? {
                left.push(format!("task {ns}/{t}"));
            }
            for c in self.list(&ns, &["containers", "ls", "-q"]).await? {
                left.push(format!("container {ns}/{c}"));
            }
        }
        Ok(left)
    }

    /// Leak check: no task and no container in any namespace.
    pub async fn assert_no_leftovers(&self) -> Result<(), Error> {
        let left = self.leftovers().await?;
        if left.is_empty() {
            Ok(())
        } else {
            Err(Error::Leftovers(left.join(", ")))
        }
    }

    /// Tears down: kills remaining tasks, containerd and its shims, unmounts and removes the private dir.
    /// Idempotent; errors are reported, not swallowed, but teardown always runs to the end.
    pub async fn stop(mut self) -> Result<(), Error> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        let pid = self.child.id();
        let address = self.address.clone();
        let ctr = self.version.bin_dir().join("ctr");
        let result = tokio::task::spawn_blocking(move || teardown(pid, &ctr, &address, dir))
            .await
            .expect("teardown thread");
        // teardown() reaped the child with waitpid; this only settles tokio's bookkeeping.
        let _ = self.child.try_wait();
        result
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if let Err(e) = teardown(
                self.child.id(),
                &self.version.bin_dir().join("ctr"),
                &self.address,
                dir,
            ) {
                eprintln!("containerd teardown (drop): {e}");
            }
        }
    }
}

async fn take_lock(limit: Duration) -> Result<Flock<File>, Error> {
    fs::create_dir_all(Path::new(LOCK_PATH).parent().expect("lock has a parent"))
        .map_err(io_err("create lock dir"))?;
    let start = Instant::now();
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .map_err(io_err(LOCK_PATH))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = writeln!(lock, "{}", std::process::id());
                return Ok(lock);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if start.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(Error::LockTimeout { waited: limit })
            }
            Err((_, errno)) => return Err(io_err(LOCK_PATH)(errno.into())),
        }
    }
}

/// Runs a command synchronously with a deadline (teardown must also work from `Drop`, outside any runtime).
fn run_bounded(
    cmd: &mut std::process::Command,
    limit: Duration,
) -> std::io::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output()
}

/// The containerd command line of one test instance.
struct Launch {
    bin: PathBuf,
    config: PathBuf,
    path: std::ffi::OsString,
    env: Vec<(String, String)>,
}

impl Launch {
    /// Spawns containerd with stdout and stderr appended to `log`.
    fn spawn(&self, log: &Path) -> Result<tokio::process::Child, Error> {
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err("open containerd.log"))?;
        Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["--log-level", "debug"])
            .env("PATH", &self.path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io_err("dup log fd"))?)
            .stderr(log_file)
            .spawn()
            .map_err(io_err(format!("spawn {}", self.bin.display())))
    }
}

fn teardown(
    pid: Option<u32>,
    ctr: &Path,
    address: &Path,
    dir: tempfile::TempDir,
) -> Result<(), Error> {
    let mut problems = Vec::new();
    // 1. Kill what containerd still runs, through containerd, so shims clean up their runc containers.
    let ctr_cmd = |ns: &str, args: &[&str]| {
        let mut c = std::process::Command::new(ctr);
        c.arg("--address")
            .arg(address)
            .arg("--namespace")
            .arg(ns)
            .args(args);
        run_bounded(&mut c, Duration::from_secs(15))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let mut namespaces = String::new();
    if pid.is_some() && address.exists() {
        namespaces = ctr_cmd("default", &["namespaces", "ls", "-q"]).unwrap_or_default();
        for ns in namespaces.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let tasks = ctr_cmd(ns, &["tasks", "ls", "-q"]).unwrap_or_default();
            for t in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = ctr_cmd(ns, &["tasks", "kill", "--all", "--signal", "SIGKILL", t]);
                let _ = ctr_cmd(ns, &["tasks", "delete", "--force", t]);
            }
            let containers = ctr_cmd(ns, &["containers", "ls", "-q"]).unwrap_or_default();
            for c in containers.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let _ = ctr_cmd(ns, &["containers", "delete", c]);
            }
        }
    }
    // 2. containerd itself: SIGTERM, then SIGKILL after a grace period.
    if let Some(pid) = pid {
        let pid = Pid::from_raw(pid as i32);
        if kill(pid, Signal::SIGTERM).is_ok() {
            let start = Instant::now();
            loop {
                match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive)
                        if start.elapsed() < Duration::from_secs(10) =>
                    {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                        problems.push("containerd ignored SIGTERM for 10 s".to_string());
                        let _ = kill(pid, Signal::SIGKILL);
                        let _ = nix::sys::wait::waitpid(pid, None);
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
    // 3. Shims that outlived it (they carry `-address <our socket>` on their command line). A shim whose
    //    last task was just deleted exits by itself shortly: give it a few seconds before SIGKILL.
    let start = Instant::now();
    while !processes_with_arg(address).is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for shim in processes_with_arg(address) {
        problems.push(format!("killed leftover shim pid {shim}"));
        let _ = kill(Pid::from_raw(shim), Signal::SIGKILL);
    }
    // 4. Mounts under our dir (rootfs overlays, netns, shm), deepest first.
    let mut mounts = mounts_under(dir.path());
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in mounts {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            problems.push(format!("umount {}: {e}", m.display()));
        }
    }
    // 5. cgroups containerd/runc created and never remove: `/<namespace>` (ctr) and the pods' parents.
    let ns_cgroups = namespaces
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|ns| format!("/{ns}"));
    for cg in ns_cgroups.chain(std::iter::once(POD_CGROUP_ROOT.to_string())) {
        if let Err(e) = remove_cgroup(&cg) {
            problems.push(format!("cgroup {cg}: {e}"));
        }
    }
    let path = dir.path().to_path_buf();
    if let Err(e) = dir.close() {
        problems.push(format!("remove {}: {e}", path.display()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Leftovers(problems.join("; ")))
    }
}

/// Mount points of the cgroup hierarchies (v1 controllers and the v2/unified one).
fn cgroup_roots() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            let mount_point = pre.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2")
                .then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
}

/// Removes cgroup `rel` (e.g. `/k8s.io`) and everything below it in every hierarchy, deepest first. Only empty
/// cgroups can go: a cgroup with processes left is an error (EBUSY). Already gone is success.
pub fn remove_cgroup(rel: &str) -> std::io::Result<()> {
    fn remove_tree(dir: &Path) -> std::io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            r => r?,
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
        match fs::remove_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(|e| {
                std::io::Error::new(e.kind(), format!("rmdir {}: {e}", dir.display()))
            }),
        }
    }
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() || rel.contains("..") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad cgroup path {rel:?}"),
        ));
    }
    cgroup_roots()
        .iter()
        .try_for_each(|root| remove_tree(&root.join(rel)))
}

/// Pids whose command line contains `arg` as one argument.
pub(crate) fn processes_with_arg(arg: &Path) -> Vec<i32> {
    let want = arg.as_os_str().as_encoded_bytes();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == want))
        })
        .collect()
}

/// Mount points at or below `dir` (from /proc/self/mountinfo; octal escapes decoded).
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    fn params(handlers: &[(String, Option<PathBuf>)]) -> ConfigParams<'_> {
        ConfigParams {
            root: Path::new("/r"),
            state: Path::new("/s"),
            grpc: Path::new("/g.sock"),
            ttrpc: Path::new("/t.sock"),
            opt: Path::new("/o"),
            cni_conf_dir: Path::new("/cni"),
            shoji_handlers: handlers,
        }
    }

    #[test]
    fn configs_register_runc_and_shoji_handlers() {
        let handlers = vec![
            (
                "shoji".to_string(),
                Some(PathBuf::from("/etc/shoji/a.toml")),
            ),
            ("shoji-qemu".into(), None),
        ];
        let p = params(&handlers);
        let get = |t: &Table, keys: &[&str]| {
            keys.iter()
                .try_fold(&Value::Table(t.clone()), |v, k| v.get(*k))
                .cloned()
        };
        // Through text, as containerd reads it.
        let v2: Table = toml::to_string(&generated(2, &p)).unwrap().parse().unwrap();
        let cri = ["plugins", "io.containerd.grpc.v1.cri"];
        let runtimes = [&cri[..], &["containerd", "runtimes"]].concat();
        assert_eq!(get(&v2, &["version"]), Some(Value::Integer(2)));
        assert_eq!(
            get(
                &v2,
                &[&runtimes[..], &["shoji", "options", "ConfigPath"]].concat()
            ),
            Some("/etc/shoji/a.toml".into())
        );
        assert_eq!(
            get(&v2, &[&runtimes[..], &["runc", "runtime_type"]].concat()),
            Some("io.containerd.runc.v2".into())
        );
        assert_eq!(
            get(&v2, &[&cri[..], &["restrict_oom_score_adj"]].concat()),
            Some(true.into())
        );
        let v3 = generated(3, &p);
        let rt = [
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ];
        assert_eq!(
            get(&v3, &[&rt[..], &["shoji-qemu", "runtime_type"]].concat()),
            Some(SHOJI_RUNTIME.into())
        );
        assert_eq!(
            get(&v3, &[&rt[..], &["shoji-qemu", "options"]].concat()),
            None
        );
    }

    #[test]
    fn an_operator_config_is_isolated_and_keeps_its_settings() {
        let p = params(&[]);
        let kubeadm = "version = 2\nimports = [\"/etc/containerd/conf.d/x.toml\"]\n\
            [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.example.com/pause:3.9\"\n\
            [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = true\n";
        let t = operator(kubeadm, &p).unwrap();
        let cri = &t["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("registry.example.com/pause:3.9")
        );
        assert_eq!(cri["cni"]["conf_dir"].as_str(), Some("/cni"));
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(false)
        );
        assert_eq!(t["grpc"]["address"].as_str(), Some("/g.sock"));
        assert_eq!(t["imports"].as_array().map(Vec::len), Some(1));
        assert!(operator("version = 2\nimports = [\"conf.d/*.toml\"]\n", &p)
            .unwrap_err()
            .contains("relative"));
    }
}
