//! `shoji`: the operator CLI. `shoji check` tells whether this host can run sandboxes;
//! `shoji ps` lists the node's sandboxes, `shoji logs ID` shows one's logs, `shoji console
//! ID` opens a debug shell in its guest, `shoji metrics` serves Prometheus metrics;
//! `shoji vm run -- CMD` boots a throwaway microVM and runs CMD in it; `shoji vm bench`
//! measures boots; `shoji cleanup ID` removes what a dead sandbox left behind.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use shoji::{
    check,
    cli::{self, RunOptions},
    config::Config,
    sandbox,
};
use slog::{o, Drain, Logger};

/// Exit status for errors of shoji itself (as docker and podman use it), so they are not
/// mistaken for the container's own status.
const EXIT_RUNTIME_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "shoji",
    version,
    about = "shoji: VM-isolated containers (operator CLI)"
)]
struct Args {
    /// Log (slog JSON) to stderr at debug level.
    #[arg(long, global = true)]
    debug: bool,
    /// Log (slog JSON) to this file.
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Configuration file (default: $SHOJI_CONFIG or /etc/shoji/config.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check accelerator, VMM, daemons, guest kernel and initramfs, containerd's
    /// configuration, network tools, cgroups and CNI; print the fix for each gap.
    Check {
        /// containerd's configuration file.
        #[arg(long, value_name = "FILE", default_value = shoji::check::containerd::DEFAULT_CONFIG)]
        containerd_config: PathBuf,
        /// containerd's socket, asked whether its CRI plugin loaded and which handlers it
        /// knows (default: the configuration's [grpc] address, else
        /// /run/containerd/containerd.sock).
        #[arg(long, value_name = "SOCKET")]
        containerd_address: Option<PathBuf>,
    },
    /// Throwaway microVMs.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Remove what sandbox ID left behind (processes, mounts, its run directory).
    Cleanup { id: String },
    /// List every sandbox on this node: pod, VM, size, uptime, containers, host memory, state.
    Ps {
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
        /// Show whole sandbox ids (the table cuts them to 12 characters).
        #[arg(long)]
        no_trunc: bool,
    },
    /// Print a sandbox's guest console and daemon logs (kept for a while after it is gone).
    Logs {
        /// Sandbox id, or a unique prefix of it.
        sandbox: String,
        /// Only the last N lines of each file.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Then print what a running sandbox's files gain, until it is gone.
        #[arg(short, long)]
        follow: bool,
    },
    /// Serve every sandbox's metrics in the Prometheus text format on GET /metrics.
    Metrics {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9465")]
        listen: std::net::SocketAddr,
    },
    /// Open a shell in a running sandbox's guest, outside every container (needs
    /// debug_console = true when the sandbox was booted).
    Console {
        /// Sandbox id, or a unique prefix of it.
        sandbox: String,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot a VM, run CMD in a container, stream its stdio, exit with its status.
    Run {
        /// Root filesystem directory of the container (not modified; default: a busybox rootfs).
        #[arg(long, value_name = "DIR")]
        rootfs: Option<PathBuf>,
        /// Give the command a terminal.
        #[arg(long, short = 't')]
        tty: bool,
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        #[arg(long, value_name = "MiB")]
        memory: Option<u64>,
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Boot RUNS VMs one after another and report boot time and memory figures.
    Bench {
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// One JSON object per run instead of the table.
        #[arg(long)]
        json: bool,
    },
}

fn logger(args: &Args) -> Result<Logger, String> {
    let level = if args.debug {
        slog::Level::Debug
    } else {
        slog::Level::Info
    };
    let writer: Box<dyn std::io::Write + Send> = match (&args.log_file, args.debug) {
        (Some(path), _) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?,
        ),
        (None, true) => Box::new(std::io::stderr()),
        (None, false) => return Ok(Logger::root(slog::Discard, o!())),
    };
    let drain = slog_json::Json::default(writer).fuse();
    let drain = slog::LevelFilter::new(std::sync::Mutex::new(drain).fuse(), level).fuse();
    Ok(Logger::root(drain, o!("component" => "shoji")))
}

fn load_config(args: &Args) -> Result<Config, String> {
    // As the shim reads it: the file, then `$SHOJI_RUN_DIR` over its run_dir.
    Config::load_from(args.config.as_deref()).map_err(|e| e.to_string())
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("shoji: {message}");
    ExitCode::from(EXIT_RUNTIME_ERROR)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = runtime.block_on(run(args));
    // A blocking read of a terminal stdin (forwarded to the container) never ends by
    // itself: do not wait for it.
    runtime.shutdown_background();
    code
}

async fn run(args: Args) -> ExitCode {
    let (log, config) = match (logger(&args), load_config(&args)) {
        (Ok(l), Ok(c)) => (l, c),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    match args.command {
        Command::Check {
            containerd_config,
            containerd_address,
        } => {
            let checks =
                check::run(&config, &containerd_config, containerd_address.as_deref()).await;
            for c in &checks {
                println!("{c}");
            }
            if check::all_ok(&checks) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Ps { json, no_trunc } => {
            let views = shoji::node::sandboxes(&config.run_dir);
            if json {
                println!("{}", cli::ps::json(&views));
            } else {
                print!("{}", cli::ps::table(&views, no_trunc));
            }
            ExitCode::SUCCESS
        }
        Command::Logs {
            sandbox,
            tail,
            follow,
        } => {
            let (mut out, mut note) = (std::io::stdout(), std::io::stderr());
            let shown = cli::logs::logs(&config, &sandbox, tail, &mut out, &mut note);
            let followed = match shown {
                Ok(place) if follow => cli::logs::follow(&place, &mut out).await,
                r => r.map(drop),
            };
            match followed {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Metrics { listen } => {
            match shoji::metrics::http::Endpoint::bind(listen, config.run_dir.clone(), log).await {
                Ok(endpoint) => endpoint.serve().await,
                Err(e) => fail(e),
            }
        }
        Command::Console { sandbox } => {
            match cli::console::console(&config, &sandbox, &log).await {
                Ok(status) => ExitCode::from(status as u8),
                Err(e) => fail(e),
            }
        }
        Command::Cleanup { id } => match sandbox::cleanup(&config.run_dir, &id, &log).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Vm {
            command:
                VmCommand::Run {
                    rootfs,
                    tty,
                    cpus,
                    memory,
                    command,
                },
        } => {
            let opts = RunOptions {
                rootfs,
                tty,
                vcpus: cpus,
                memory_mib: memory,
                args: command,
            };
            match cli::run_vm(config, opts, log).await {
                // A status beyond a byte cannot come from a process; clamp rather than wrap.
                Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
                Err(e) => fail(e),
            }
        }
        Command::Vm {
            command: VmCommand::Bench { runs, json },
        } => bench(config, log, runs, json).await,
    }
}

async fn bench(config: Config, log: Logger, runs: u32, json: bool) -> ExitCode {
    let mut samples = Vec::new();
    for i in 0..runs {
        match cli::bench_once(config.clone(), log.clone()).await {
            Ok(s) => {
                if json {
                    println!("{}", serde_json::to_string(&s).expect("sample serializes"));
                } else {
                    let host: Vec<String> = s
                        .host_rss_kib
                        .iter()
                        .map(|(n, k)| format!("{n}={:.1}MiB", *k as f64 / 1024.0))
                        .collect();
                    eprintln!(
                        "run {:>2}: ready {:>6.0} ms, agent RSS {:.1} MiB, guest used {:.1} MiB, host {}",
                        i + 1,
                        s.vmm_to_ready_ms,
                        s.agent_rss_kib as f64 / 1024.0,
                        s.guest_used_kib as f64 / 1024.0,
                        host.join(" ")
                    );
                }
                samples.push(s);
            }
            Err(e) => return fail(format!("run {}: {e}", i + 1)),
        }
    }
    if !json {
        print!("{}", cli::bench_table(&samples));
    }
    ExitCode::SUCCESS
}
