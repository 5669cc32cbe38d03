//! `shoji vm run`: a throwaway VM running one container, its stdio on the terminal.
use std::{path::PathBuf, sync::Arc};

use shoji_agent_api::stream::StreamKind;
use slog::{warn, Logger};

use super::{
    rootfs, run_spec, sandbox_config,
    terminal::{attach_tty, copy_in, copy_out, forward_winch, interrupted},
    throwaway_id, CliError,
};
use crate::{
    config::Config,
    sandbox::{ContainerRequest, Mount, Sandbox},
};

/// The container's id inside a `vm run` VM.
const CONTAINER: &str = "main";

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
    if let Err(e) = sandbox.remove_container(CONTAINER).await {
        warn!(log, "removing the container failed"; "error" => %e);
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
    sandbox
        .create_container(ContainerRequest {
            id: CONTAINER.into(),
            rootfs: vec![Mount::host_dir(rootfs, true)],
            spec: run_spec::container_spec(&opts.args, opts.tty, "shoji"),
            stdin: true,
            // The rootfs directory is never modified.
            guest_overlay: true,
        })
        .await?;
    let kinds: &[StreamKind] = if opts.tty {
        &[StreamKind::Tty]
    } else {
        &[StreamKind::Stdout, StreamKind::Stderr, StreamKind::Stdin]
    };
    let mut pumps = Vec::new();
    let mut raw = None;
    for (kind, conn) in sandbox.attach_stdio(CONTAINER, "", kinds).await? {
        match kind {
            StreamKind::Tty => {
                let (output, terminal) = attach_tty(conn);
                pumps.push(output);
                raw = terminal;
            }
            StreamKind::Stdout => pumps.push(tokio::spawn(copy_out(conn, tokio::io::stdout()))),
            StreamKind::Stderr => pumps.push(tokio::spawn(copy_out(conn, tokio::io::stderr()))),
            StreamKind::Stdin => drop(tokio::spawn(copy_in(conn))),
        }
    }
    sandbox.start_process(CONTAINER, "").await?;
    if opts.tty {
        tokio::spawn(forward_winch(
            sandbox.agent().clone(),
            CONTAINER,
            String::new(),
        ));
    }
    let exit = sandbox.wait_process(CONTAINER, "").await?;
    let drained = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    let _ = tokio::time::timeout(super::terminal::DRAIN, drained).await;
    drop(raw);
    Ok(exit.exit_status)
}
