//! End-to-end scenarios against a private containerd, parameterised by runtime: proven with runc
//! (`harness_runc.rs`), run unchanged with shoji once its shim exists.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cni::{self, Network};
use crate::containerd::{Containerd, Options, Version, SHOJI_RUNTIME};
use crate::cri::{self, api, Cri};
use crate::image;
use crate::leaks::{Scope, Snapshot};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Which runtime a scenario drives.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// `ctr run --runtime` value.
    pub runtime_type: String,
    /// CRI runtime handler.
    pub cri_handler: String,
    /// Runtime config file (`ConfigPath`, `ctr run --runtime-config-path`).
    pub config_path: Option<PathBuf>,
    /// Directory holding the shim binary, put on containerd's PATH.
    pub shim_dir: Option<PathBuf>,
    /// Extra environment for containerd and its shims.
    pub env: Vec<(String, String)>,
    /// Dirs whose entries must not outlive a scenario (e.g. the shim's run dir).
    pub run_dirs: Vec<PathBuf>,
    /// Bound for one CRI call (VM boots under TCG need seconds).
    pub call_timeout: Duration,
}

impl Runtime {
    /// The runtime's config file as a command-line argument (shoji runtimes have one).
    pub fn config_arg(&self) -> String {
        let path = self
            .config_path
            .as_ref()
            .expect("a runtime with a config file");
        path.display().to_string()
    }

    pub fn runc() -> Runtime {
        Runtime {
            runtime_type: "io.containerd.runc.v2".into(),
            cri_handler: "runc".into(),
            config_path: None,
            shim_dir: None,
            env: Vec::new(),
            run_dirs: Vec::new(),
            call_timeout: Duration::from_secs(30),
        }
    }

    /// shoji through `containerd-shim-shoji-v2` in `shim_dir`, handler `shoji`, configured by `config_path`.
    pub fn shoji(shim_dir: PathBuf, config_path: Option<PathBuf>, run_dir: PathBuf) -> Runtime {
        Runtime {
            runtime_type: SHOJI_RUNTIME.into(),
            cri_handler: "shoji".into(),
            config_path,
            shim_dir: Some(shim_dir),
            env: vec![("SHOJI_RUN_DIR".into(), run_dir.display().to_string())],
            run_dirs: vec![run_dir],
            call_timeout: Duration::from_secs(120),
        }
    }
}

/// shoji with a run directory and config file of its own (`extra` TOML lines appended to
/// `hypervisor = "<the backend under test>"`, see [`crate::backend`]); both are removed when
/// this is dropped.
pub struct ShojiRuntime {
    pub runtime: Runtime,
    _dir: tempfile::TempDir,
}

impl ShojiRuntime {
    pub fn new(extra_config: &str) -> ShojiRuntime {
        // Short: sandbox socket paths live under it and Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("shj")
            .tempdir_in("/tmp")
            .expect("temp dir in /tmp");
        let run_dir = dir.path().join("run");
        let config = dir.path().join("config.toml");
        // Torn-down sandboxes' logs stay in this runtime's own directory, not the node's.
        let logs = match extra_config.contains("log_dir") {
            true => String::new(),
            false => format!("log_dir = \"{}\"\n", dir.path().join("logs").display()),
        };
        std::fs::write(
            &config,
            format!(
                "hypervisor = \"{}\"\n{logs}{extra_config}\n",
                crate::backend::hypervisor()
            ),
        )
        .expect("write config");
        let shim_dir = crate::bins::binary("containerd-shim-shoji-v2")
            .parent()
            .expect("bin dir")
            .to_path_buf();
        ShojiRuntime {
            runtime: Runtime::shoji(shim_dir, Some(config), run_dir),
            _dir: dir,
        }
    }
}

/// A private containerd with the busybox image imported, optionally a pod network, and a leak baseline.
pub struct Env {
    pub ctrd: Containerd,
    pub net: Option<Network>,
    pub runtime: Runtime,
    scope: Scope,
    baseline: Snapshot,
}

/// Namespace for `ctr` scenarios; CRI uses `k8s.io`.
pub const CTR_NAMESPACE: &str = "shoji-test";
pub const CRI_NAMESPACE: &str = "k8s.io";

impl Env {
    /// `network`: the 10.233.<n>.0/24 test network number, for CRI scenarios.
    pub async fn start(version: Version, runtime: &Runtime, network: Option<u8>) -> Result<Env> {
        Env::start_on(version, runtime, network.map(Network::new).transpose()?).await
    }

    /// [`Env::start`] on a network the caller made (e.g. dual stack).
    pub async fn start_on(
        version: Version,
        runtime: &Runtime,
        net: Option<Network>,
    ) -> Result<Env> {
        Env::start_with(version, runtime, net, |_| ()).await
    }

    /// [`Env::start_on`] with containerd's [`Options`] changed by `adjust` (e.g. an
    /// operator's configuration).
    pub async fn start_with(
        version: Version,
        runtime: &Runtime,
        net: Option<Network>,
        adjust: impl FnOnce(&mut Options),
    ) -> Result<Env> {
        let handlers =
            ["shoji", "shoji-qemu"].map(|h| (h.to_string(), runtime.config_path.clone()));
        let mut opts = Options {
            shim_dir: runtime.shim_dir.clone(),
            shoji_handlers: handlers.into(),
            cni_conf_dir: net.as_ref().map(Network::conf_dir),
            env: runtime.env.clone(),
            ..Options::default()
        };
        adjust(&mut opts);
        let ctrd = Containerd::start(version, opts).await?;
        image::import(&ctrd, CTR_NAMESPACE).await?;
        if net.is_some() {
            image::import(&ctrd, CRI_NAMESPACE).await?;
        }
        let scope = Scope {
            cmdline_markers: std::iter::once(ctrd.dir().display().to_string())
                .chain(runtime.run_dirs.iter().map(|d| d.display().to_string()))
                .collect(),
            mount_dirs: vec![ctrd.dir().to_path_buf(), PathBuf::from("/run/netns")],
            run_dirs: runtime.run_dirs.clone(),
            link_prefixes: Scope::cni_prefixes().0,
            netns_prefixes: Scope::cni_prefixes().1,
        };
        let baseline = Snapshot::take(&scope);
        Ok(Env {
            ctrd,
            net,
            runtime: runtime.clone(),
            scope,
            baseline,
        })
    }

    pub async fn cri(&self) -> Result<Cri> {
        Ok(Cri::connect(self.ctrd.address(), self.runtime.call_timeout).await?)
    }

    /// What the runtime left on the host since `Env::start` (after waiting up to 10 s for
    /// processes to exit), while everything keeps running.
    pub async fn leaks(&self) -> crate::leaks::Leaks {
        match self
            .baseline
            .assert_clean(&self.scope, Duration::from_secs(10))
            .await
        {
            Ok(()) => crate::leaks::Leaks::default(),
            Err(e) => e.leaks,
        }
    }

    /// Leak checks while containerd still runs (what the runtime itself cleaned up), then teardown.
    pub async fn finish(self) -> Result<()> {
        let checked = async {
            self.ctrd.assert_no_leftovers().await?;
            self.baseline
                .assert_clean(&self.scope, Duration::from_secs(10))
                .await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        let Env { ctrd, net, .. } = self;
        let stopped = ctrd.stop().await;
        let net_down = net.map(Network::teardown).transpose();
        checked?;
        stopped?;
        net_down?;
        Ok(())
    }

    /// Ends a test: `scenario`'s error (if any) with containerd's log tail attached, else `finish`'s; the leak
    /// check and teardown run either way.
    pub async fn conclude(self, scenario: Result<()>) -> Result<()> {
        let log = self.ctrd.log_tail();
        let finished = self.finish().await;
        scenario.map_err(|e| format!("{e}\n--- containerd log tail ---\n{log}"))?;
        finished
    }
}

/// Runs a test body with an upper bound, so a hang fails instead of stalling CI; panics with
/// the body's error.
pub async fn within(limit: Duration, body: impl std::future::Future<Output = Result<()>>) {
    match tokio::time::timeout(limit, body).await {
        Ok(r) => r.unwrap_or_else(|e| panic!("{e}")),
        Err(_) => panic!("test exceeded {limit:?}"),
    }
}

/// One test within `limit`: a fresh containerd of `version` with `runtime` and pod network
/// `net` (a test network number), `scenario` on it, then [`Env::conclude`].
pub async fn in_env(
    limit: Duration,
    version: Version,
    runtime: &Runtime,
    net: Option<u8>,
    scenario: impl AsyncFnOnce(&Env) -> Result<()>,
) {
    let net = || net.map(Network::new).transpose();
    in_env_on(limit, version, runtime, net, scenario).await
}

/// [`in_env`] on the network `net` makes (e.g. dual stack).
pub async fn in_env_on(
    limit: Duration,
    version: Version,
    runtime: &Runtime,
    net: impl FnOnce() -> std::result::Result<Option<Network>, cni::Error>,
    scenario: impl AsyncFnOnce(&Env) -> Result<()>,
) {
    within(limit, async {
        let env = Env::start_on(version, runtime, net()?).await?;
        let r = scenario(&env).await;
        env.conclude(r).await
    })
    .await
}

/// The pid of the shim serving sandboxes under `run_dir` (its environment names the run dir).
pub fn find_shim(run_dir: &std::path::Path) -> Option<i32> {
    let marker = format!("SHOJI_RUN_DIR={}", run_dir.display());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let exe = std::fs::read_link(e.path().join("exe")).ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let is_shim = exe.file_name()? == "containerd-shim-shoji-v2";
        let ours = env.split(|b| *b == 0).any(|v| v == marker.as_bytes());
        (is_shim && ours).then_some(pid)
    })
}

/// Ok when `cond` holds, else the error `what` describes.
pub fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// Arguments of `ctr run --rm <image> <id> <command>` with this runtime (`config`: `config_arg(env)`).
/// `ctr run <mode>` arguments; `mode` is `--rm` or `-d`.
fn ctr_run_args<'a>(
    env: &'a Env,
    config: &'a Option<String>,
    mode: &'a str,
    id: &'a str,
    command: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["run", mode, "--runtime", &env.runtime.runtime_type];
    if let Some(c) = config {
        args.extend(["--runtime-config-path", c]);
    }
    args.extend([image::BUSYBOX, id]);
    args.extend(command);
    args
}

fn config_arg(env: &Env) -> Option<String> {
    env.runtime
        .config_path
        .as_ref()
        .map(|p| p.display().to_string())
}

/// `ctr run --rm <image> <id> <command>` with this runtime, stdin closed.
pub async fn ctr_run(
    env: &Env,
    id: &str,
    command: &[&str],
) -> Result<crate::containerd::CtrOutput> {
    let config = config_arg(env);
    let args = ctr_run_args(env, &config, "--rm", id, command);
    Ok(env
        .ctrd
        .ctr(CTR_NAMESPACE, &args, env.runtime.call_timeout)
        .await?)
}

/// `ctr run -d <image> <id> <command>`: returns once the task was started.
pub async fn ctr_run_detached(
    env: &Env,
    id: &str,
    command: &[&str],
) -> Result<crate::containerd::CtrOutput> {
    let config = config_arg(env);
    let args = ctr_run_args(env, &config, "-d", id, command);
    Ok(env
        .ctrd
        .ctr(CTR_NAMESPACE, &args, env.runtime.call_timeout)
        .await?)
}

/// `ctr run --rm`: stdout, stderr and the exit code come back; nothing remains.
pub async fn ctr_run_exit_code(env: &Env) -> Result<()> {
    let out = ctr_run(
        env,
        "ctr-run-1",
        &["sh", "-c", "echo hi; echo oops >&2; exit 3"],
    )
    .await?;
    check(
        out.code() == 3 && out.stdout == "hi\n" && out.stderr.contains("oops"),
        || format!("ctr run: want exit 3, stdout \"hi\\n\", stderr with oops; got {out:?}"),
    )
}

/// Stdin through `ctr run --rm`: (1) `cat` echoes a line while stdin is still open (live forwarding), then
/// ends with 0 once stdin closes (EOF propagated); (2) `wc -c` gets all input and its EOF before it writes
/// anything. ctr arms its CloseIO-on-EOF only once the task exists, so stdin is closed after the task runs.
pub async fn ctr_run_stdin_eof(env: &Env) -> Result<()> {
    let config = config_arg(env);
    let args = ctr_run_args(env, &config, "--rm", "ctr-run-wc", &["wc", "-c"]);
    let input = b"0123456789\n".repeat(1000);
    let out = env
        .ctrd
        .ctr_with_input(CTR_NAMESPACE, &args, Some(&input), env.runtime.call_timeout)
        .await?;
    check(out.code() == 0 && out.stdout.trim() == "11000", || {
        format!("ctr run wc -c: want 11000 bytes counted after EOF; got {out:?}")
    })?;
    ctr_run_cat_live(env).await
}

async fn ctr_run_cat_live(env: &Env) -> Result<()> {
    use std::process::Stdio;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = config_arg(env);
    let args = ctr_run_args(env, &config, "--rm", "ctr-run-stdin", &["cat"]);
    let mut cmd = env.ctrd.ctr_command(CTR_NAMESPACE, &args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().ok_or("ctr stdin")?;
    let mut stdout = child.stdout.take().ok_or("ctr stdout")?;
    let session = async {
        stdin.write_all(b"line one\n").await?;
        let mut seen = Vec::new();
        while !seen.ends_with(b"line one\n") {
            let mut buf = [0u8; 256];
            let n = stdout.read(&mut buf).await?;
            check(n > 0, || {
                format!(
                    "stdout ended before the echo: {:?}",
                    String::from_utf8_lossy(&seen)
                )
            })?;
            seen.extend_from_slice(&buf[..n]);
        }
        stdin.write_all(b"line two\n").await?;
        drop(stdin);
        stdout.read_to_end(&mut seen).await?;
        let out = child.wait_with_output().await?;
        check(
            out.status.success() && seen == b"line one\nline two\n",
            || {
                let stdout = String::from_utf8_lossy(&seen);
                format!("ctr run cat: want both lines and exit 0 after EOF; got {out:?}, stdout {stdout:?}")
            },
        )
    };
    let limit = env.runtime.call_timeout;
    tokio::time::timeout(limit, session)
        .await
        .map_err(|_| format!("ctr run cat: no exit within {limit:?} (stdin EOF not propagated?)"))?
}

/// The pod scenario: RunPodSandbox on the test network, an httpd container answering the host at the pod IP,
/// ExecSync exit codes and output, container log, status, stats, stop and removal.
pub async fn cri_pod_lifecycle(env: &Env) -> Result<()> {
    let net = env
        .net
        .as_ref()
        .ok_or("cri_pod_lifecycle needs Env::start with a network")?;
    let cri = env.cri().await?;
    let logs = tempfile::Builder::new()
        .prefix("shoji-podlogs-")
        .tempdir()?;
    let pod_config = cri::pod_config("web-pod", "shoji-test", logs.path());
    let pod = cri.run_pod(&pod_config, &env.runtime.cri_handler).await?;
    let result = pod_steps(&cri, net, &pod, &pod_config, logs.path()).await;
    // Always remove the pod, also when a step failed; the first error wins.
    let stop = cri.stop_pod(&pod).await;
    let remove = cri.remove_pod(&pod).await;
    result?;
    stop?;
    remove?;
    let pods = cri.list_pods().await?;
    check(pods.is_empty(), || {
        format!("pods left after RemovePodSandbox: {pods:?}")
    })
}

async fn pod_steps(
    cri: &Cri,
    net: &Network,
    pod: &str,
    pod_config: &api::PodSandboxConfig,
    log_dir: &std::path::Path,
) -> Result<()> {
    let ip: Ipv4Addr = cri.pod_ip(pod).await?.parse()?;
    check(net.contains(ip), || {
        format!("pod IP {ip} outside the test network {}", net.subnet())
    })?;

    let web = cri::container_config(
        "web",
        image::BUSYBOX,
        &[
            "sh",
            "-c",
            "echo web-started; exec httpd -f -p 8080 -h /www",
        ],
    );
    let id = cri.create_container(pod, &web, pod_config).await?;
    cri.start_container(&id).await?;

    let resp = cni::http_get(net, ip, 8080, "/index.html", Duration::from_secs(20)).await?;
    check(
        resp.starts_with("HTTP/1.") && resp.contains("shoji busybox httpd"),
        || format!("httpd answered {resp:?}"),
    )?;

    let out = cri
        .exec_sync(
            &id,
            &["sh", "-c", "echo out; echo err >&2; exit 7"],
            Duration::from_secs(10),
        )
        .await?;
    check(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()) == (7, "out\n", "err\n"),
        || format!("ExecSync: want (7, out, err), got {out:?}"),
    )?;
    let out = cri
        .exec_sync(
            &id,
            &["sh", "-c", "hostname; cat /etc/resolv.conf"],
            Duration::from_secs(10),
        )
        .await?;
    check(
        out.exit_code == 0
            && out.stdout.starts_with("web-pod\n")
            && out.stdout.contains("nameserver 10.233.255.10"),
        || format!("hostname/DNS config not applied: {out:?}"),
    )?;

    // Streaming exec (kubectl exec): stdin in, stdout/stderr and the exit code back.
    let url = cri
        .exec_url(
            &id,
            &["sh", "-c", "read line; echo got-$line; echo e >&2; exit 5"],
            true,
            false,
        )
        .await?;
    let out = cri::exec_stream(&url, Some(b"ping\n"), Duration::from_secs(20)).await?;
    check(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()) == (5, "got-ping\n", "e\n"),
        || format!("streaming exec: want (5, got-ping, e), got {out:?}"),
    )?;

    // Some CPU time and memory for the stats to show.
    let burn =
        "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; head -c 4000000 /dev/zero > /tmp/fill";
    let out = cri
        .exec_sync(&id, &["sh", "-c", burn], Duration::from_secs(30))
        .await?;
    check(out.exit_code == 0, || format!("burn exec failed: {out:?}"))?;
    let stats = cri.container_stats(&id).await?;
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    let mem = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    check(cpu > 1_000_000 && mem > 100_000, || {
        format!("ContainerStats without real numbers: {stats:?}")
    })?;
    let pstats = cri.pod_stats(pod).await?;
    let linux = pstats
        .linux
        .as_ref()
        .ok_or("PodSandboxStats without linux stats")?;
    let pod_cpu = linux
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    check(
        pod_cpu >= cpu
            && linux
                .containers
                .iter()
                .any(|c| c.attributes.as_ref().is_some_and(|a| a.id == id)),
        || {
            format!("PodSandboxStats: pod cpu {pod_cpu} < container cpu {cpu} or container missing: {pstats:?}")
        },
    )?;

    let status = cri.container_status(&id).await?;
    check(
        status.state == api::ContainerState::ContainerRunning as i32,
        || format!("not running: {status:?}"),
    )?;
    let listed = cri.list_containers(Some(pod)).await?;
    check(listed.len() == 1 && listed[0].id == id, || {
        format!("ListContainers: {listed:?}")
    })?;

    let log = std::fs::read_to_string(log_dir.join("web.log")).unwrap_or_default();
    check(log.contains(" stdout F web-started"), || {
        format!("container log lacks the CRI line: {log:?}")
    })?;

    // httpd as PID 1 has no SIGTERM handler: StopContainer escalates to SIGKILL after the grace period.
    cri.stop_container(&id, Duration::from_secs(1)).await?;
    let status = cri.container_status(&id).await?;
    check(
        status.state == api::ContainerState::ContainerExited as i32,
        || format!("not exited: {status:?}"),
    )?;
    cri.remove_container(&id).await?;
    Ok(())
}
