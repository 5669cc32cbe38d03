//! The `shoji` operator CLI's commands (the binary in `src/bin/shoji.rs` only parses
//! arguments): `vm run` boots a throwaway VM and runs one container in it, `vm bench`
//! measures boots.
pub mod rootfs;
pub mod spec;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use shoji_agent_api::{
    stream::{self, StreamKind},
    types::{CreateContainerRequest, Rootfs},
};
use slog::{warn, Logger};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    signal::unix::{signal, SignalKind},
};

use crate::{
    agent_client::AgentError,
    config::Config,
    sandbox::{Mount, Sandbox, SandboxConfig, SandboxError},
};

/// The container's id inside a `vm run` VM.
const CONTAINER: &str = "main";
/// How long output may keep flowing after the process exited (the agent closes the
/// streams once drained; this only bounds a broken guest).
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

/// What `shoji vm run` runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The container's root filesystem (a host directory, not modified); default busybox.
    pub rootfs: Option<PathBuf>,
    pub tty: bool,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub args: Vec<String>,
}

/// Unique sandbox ids for throwaway VMs.
fn throwaway_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:08x}", std::process::id())
}

fn sandbox_config(
    config: Config,
    id: &str,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
) -> SandboxConfig {
    let mut cfg = SandboxConfig::new(id, config);
    cfg.vcpus = vcpus.unwrap_or(cfg.vcpus);
    cfg.memory_mib = memory_mib.unwrap_or(cfg.memory_mib);
    cfg
}

/// Resolves on the first SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Boots a VM, runs the command in a container on `rootfs` (guest overlay, so the
/// directory is untouched), streams its stdio, tears everything down, and returns the
/// command's exit status. A SIGINT/SIGTERM tears down at once.
pub async fn run_vm(config: Config, opts: RunOptions, log: Logger) -> Result<i32, CliError> {
    let rootfs = match &opts.rootfs {
        Some(dir) => dir.clone(),
        None => rootfs::default_rootfs().map_err(|source| CliError::Io {
            context: "building the default busybox rootfs".into(),
            source,
        })?,
    };
    let id = throwaway_id("vm");
    let cfg = sandbox_config(config, &id, opts.vcpus, opts.memory_mib);
    // Started on its own task: dropping a half-done start would leak what it created.
    let mut start = tokio::spawn(Sandbox::start(cfg, log.clone()));
    let sandbox = tokio::select! {
        started = &mut start => Arc::new(started.expect("sandbox start panicked")?),
        sig = interrupted() => {
            if let Ok(Ok(sandbox)) = start.await {
                let _ = sandbox.stop().await;
            }
            return Err(CliError::Interrupted(sig));
        }
    };
    let result = tokio::select! {
        r = run_container(&sandbox, &rootfs, &opts) => r,
        sig = interrupted() => Err(CliError::Interrupted(sig)),
    };
    let _ = sandbox.agent().remove_container(CONTAINER).await;
    if let Err(e) = sandbox.unmount_container(CONTAINER) {
        warn!(log, "unmounting the rootfs failed"; "error" => %e);
    }
    let stopped = sandbox.stop().await;
    let status = result?;
    stopped?;
    Ok(status)
}

async fn run_container(
    sandbox: &Sandbox,
    rootfs: &std::path::Path,
    opts: &RunOptions,
) -> Result<i32, CliError> {
    let agent = sandbox.agent();
    let guest_root = sandbox.mount_rootfs(CONTAINER, &[Mount::host_dir(rootfs, true)])?;
    let spec = spec::container_spec(&opts.args, opts.tty, "shoji");
    agent
        .create_container(CreateContainerRequest {
            container_id: CONTAINER.into(),
            spec_json: serde_json::to_vec(&spec).expect("spec serializes"),
            rootfs: Some(Rootfs {
                source: guest_root,
                guest_overlay: true,
                ..Default::default()
            })
            .into(),
            terminal: opts.tty,
            stdin: true,
            ..Default::default()
        })
        .await?;

    let mut pumps = Vec::new();
    let _raw = if opts.tty {
        let tty = agent.open_stream(StreamKind::Tty, CONTAINER, "").await?;
        let (r, w) = tty.into_split();
        pumps.push(tokio::spawn(copy_out(r, tokio::io::stdout())));
        tokio::spawn(copy_in(w));
        RawTerminal::enter()
    } else {
        let out = agent.open_stream(StreamKind::Stdout, CONTAINER, "").await?;
        let err = agent.open_stream(StreamKind::Stderr, CONTAINER, "").await?;
        let inp = agent.open_stream(StreamKind::Stdin, CONTAINER, "").await?;
        pumps.push(tokio::spawn(copy_out(out, tokio::io::stdout())));
        pumps.push(tokio::spawn(copy_out(err, tokio::io::stderr())));
        tokio::spawn(copy_in(inp));
        None
    };
    agent.start_process(CONTAINER, "").await?;
    if opts.tty {
        tokio::spawn(forward_winch(agent.clone()));
    }
    let exit = agent.wait_process(CONTAINER, "").await?;
    let drained = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    let _ = tokio::time::timeout(DRAIN, drained).await;
    Ok(exit.exit_status)
}

/// Guest output → a local stream, raw, until the agent closes it.
async fn copy_out<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut from: R, mut to: W) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
}

/// Local stdin → the guest in frames, then the end-of-input frame.
async fn copy_in<W: AsyncWrite + Unpin>(mut to: W) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream::write_frame(&mut to, &buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream::write_frame(&mut to, b"").await;
    // Keep the write half open: closing it early could end the stream before the agent read EOF.
    std::future::pending::<()>().await;
}

/// Forwards the local terminal size to the container's tty, now and on every SIGWINCH.
async fn forward_winch(agent: crate::agent_client::AgentClient) {
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    loop {
        if let Some((cols, rows)) = terminal_size() {
            let _ = agent.resize_tty(CONTAINER, "", cols, rows).await;
        }
        if winch.recv().await.is_none() {
            return;
        }
    }
}

fn terminal_size() -> Option<(u32, u32)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills a winsize.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col as u32, ws.ws_row as u32))
}

/// The local terminal in raw mode while a tty container runs; restored on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

/// One boot measured by [`bench_once`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootSample {
    /// VMM launch (its device daemons already up) → the agent announced itself.
    pub vmm_to_ready_ms: f64,
    /// `Sandbox::start` called → the agent answered its first call (the host's whole cost).
    pub start_to_answer_ms: f64,
    /// CPU time the VMM had used when the agent answered: under TCG the boot's cost
    /// independent of how busy the host is (wall-clock times grow with the host's load).
    pub vmm_cpu_ms: f64,
    pub agent_rss_kib: u64,
    pub guest_used_kib: u64,
    pub guest_total_kib: u64,
    /// Host RSS of each process of the VM, by name.
    pub host_rss_kib: Vec<(String, u64)>,
}

/// Boots a VM, measures it, stops it.
pub async fn bench_once(config: Config, log: Logger) -> Result<BootSample, CliError> {
    let id = throwaway_id("bench");
    let started = Instant::now();
    let sandbox = Sandbox::start(sandbox_config(config, &id, None, None), log).await?;
    let measured = async {
        sandbox.agent().health().await?;
        let start_to_answer_ms = ms(started.elapsed());
        let vmm_cpu_ms = sandbox
            .vmm_pid()
            .await
            .and_then(cpu_time)
            .map(ms)
            .unwrap_or(0.0);
        let t = sandbox.boot_times();
        // Let the guest settle (lazy work after boot) before reading memory figures.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let details = sandbox.agent().guest_details().await?;
        let host_rss_kib = with_children(&sandbox.pids())
            .into_iter()
            .filter_map(process_rss)
            .collect();
        Ok::<_, CliError>(BootSample {
            vmm_to_ready_ms: ms(t.agent_ready - t.daemons_ready),
            start_to_answer_ms,
            vmm_cpu_ms,
            agent_rss_kib: details.agent_rss_bytes / 1024,
            guest_used_kib: details.mem_used_bytes / 1024,
            guest_total_kib: details.mem_total_bytes / 1024,
            host_rss_kib,
        })
    }
    .await;
    sandbox.stop().await?;
    measured
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `pids` and their direct children (virtiofsd serves from a sandboxed child process).
fn with_children(pids: &[u32]) -> Vec<u32> {
    let mut all = pids.to_vec();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid.is_some_and(|p| pids.contains(&p)) {
            all.push(pid);
        }
    }
    all
}

/// User + system CPU time of a host process.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (11 and 12 after the command name), in clock ticks.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// (name, VmRSS in KiB) of a host process.
fn process_rss(pid: u32) -> Option<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    let name = field("Name:")?;
    let rss = field("VmRSS:")?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((name, rss))
}

/// min / median / max of each figure over the samples, as a Markdown table.
pub fn bench_table(samples: &[BootSample]) -> String {
    fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }
    if samples.is_empty() {
        return String::new();
    }
    let mib = |k: u64| k as f64 / 1024.0;
    let mut rows: Vec<(String, &str, Vec<f64>)> = vec![
        (
            "VMM launch → agent ready".into(),
            "ms",
            samples.iter().map(|s| s.vmm_to_ready_ms).collect(),
        ),
        (
            "sandbox start → agent answers".into(),
            "ms",
            samples.iter().map(|s| s.start_to_answer_ms).collect(),
        ),
        (
            "VMM CPU time until ready".into(),
            "ms",
            samples.iter().map(|s| s.vmm_cpu_ms).collect(),
        ),
        (
            "agent RSS (guest)".into(),
            "MiB",
            samples.iter().map(|s| mib(s.agent_rss_kib)).collect(),
        ),
        (
            "guest used memory".into(),
            "MiB",
            samples.iter().map(|s| mib(s.guest_used_kib)).collect(),
        ),
    ];
    let mut names: Vec<&str> = samples
        .iter()
        .flat_map(|s| s.host_rss_kib.iter().map(|(n, _)| n.as_str()))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let values = samples
            .iter()
            .map(|s| {
                s.host_rss_kib
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, k)| mib(*k))
                    .sum()
            })
            .collect();
        rows.push((format!("host RSS: {name}"), "MiB", values));
    }
    let mut out = format!(
        "| figure ({} runs) | unit | min | median | max |\n|---|---|---|---|---|\n",
        samples.len()
    );
    for (name, unit, values) in rows {
        let (min, med, max) = stats(values);
        out += &format!("| {name} | {unit} | {min:.1} | {med:.1} | {max:.1} |\n");
    }
    out
}
