//! The containerd-shim `Shim` implementation: how containerd starts, finds and cleans up
//! the shim process of a pod.
//!
//! * `start`: containers are grouped by their pod's sandbox id, so every container of a pod
//!   reaches the one shim process that owns the pod's VM (the socket address is a hash of
//!   the group).
//! * the daemon: serves the Task service until Shutdown finds no container left.
//! * `delete`: containerd's clean-up call after the shim died: removes what the dead shim
//!   left of the VM (processes, mounts, sockets, directory).
use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use containerd_shim::{
    asynchronous::{spawn, ExitSignal, Shim},
    publisher::RemotePublisher,
    Config as ShimConfig, Error, Flags, StartOpts,
};
use containerd_shim_protos::api::DeleteResponse;
use oci_spec::runtime::Spec;
use slog::{info, warn, Logger};

use super::{events, task::TaskService};
use crate::{
    config::Config,
    containerd::pod_vm::SandboxLauncher,
    logging, oci,
    pod::{Pod, SANDBOX_DIR_FILE},
    sandbox,
};

pub struct ShojiShim {
    started: std::time::Instant,
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
    log: Logger,
}

/// The framework settings: the shim sets up its own (JSON) logging.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_setup_logger: true,
        ..Default::default()
    }
}

fn logger(flags: &Flags) -> Logger {
    let level = logging::level(&Config::load().map(|c| c.log_level).unwrap_or_default());
    let level = if flags.debug {
        slog::Level::Debug
    } else {
        level
    };
    // The daemon logs into the `log` FIFO containerd reads (in the bundle, our working
    // directory); `start` and `delete` log to stderr, which containerd reports on failure.
    let log = match flags.action.as_str() {
        "" => match std::fs::OpenOptions::new().write(true).open("log") {
            Ok(fifo) => logging::json(fifo, level, "shim"),
            Err(_) => logging::json(std::io::stderr(), level, "shim"),
        },
        _ => logging::json(std::io::stderr(), level, "shim"),
    };
    let log = log.new(slog::o!("id" => flags.id.clone(), "namespace" => flags.namespace.clone()));
    logging::capture_log_facade(&log);
    log
}

fn read_spec() -> Result<Spec, Error> {
    Spec::load("config.json")
        .map_err(|e| Error::InvalidArgument(format!("cannot read the bundle's config.json: {e}")))
}

#[async_trait]
impl Shim for ShojiShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, flags: &Flags, _config: &mut ShimConfig) -> Self {
        ShojiShim {
            started: std::time::Instant::now(),
            namespace: flags.namespace.clone(),
            id: flags.id.clone(),
            exit: Arc::new(ExitSignal::default()),
            log: logger(flags),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = oci::grouping(&read_spec()?, &opts.id);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reads the shim's address from the bundle (containerd-shim 0.11 does not write it).
        std::fs::write("address", &address)
            .map_err(|e| Error::Other(format!("write address file: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let owns_vm = match read_spec() {
            Ok(spec) => !matches!(oci::role(&spec), oci::Role::PodMember { .. }),
            Err(_) => true,
        };
        if owns_vm {
            let recorded = std::fs::read_to_string(SANDBOX_DIR_FILE)
                .ok()
                .map(PathBuf::from);
            let split = |d: &PathBuf| {
                Some((
                    d.parent()?.to_path_buf(),
                    d.file_name()?.to_str()?.to_string(),
                ))
            };
            let (run_dir, sandbox_id) = recorded.as_ref().and_then(split).unwrap_or_else(|| {
                let run_dir = Config::load()
                    .map(|c| c.run_dir)
                    .unwrap_or_else(|_| PathBuf::from(crate::config::DEFAULT_RUN_DIR));
                (run_dir, self.id.clone())
            });
            info!(self.log, "cleaning up after a dead shim"; "sandbox" => &sandbox_id, "run_dir" => %run_dir.display());
            if let Err(e) = sandbox::cleanup(&run_dir, &sandbox_id, &self.log).await {
                warn!(self.log, "cleanup incomplete"; "error" => %e);
                return Err(Error::Other(format!(
                    "cleanup of sandbox {sandbox_id}: {e}"
                )));
            }
            let _ = std::fs::remove_file(SANDBOX_DIR_FILE);
        }
        let exit = crate::pod::Exit::now(128 + libc::SIGKILL as u32);
        Ok(DeleteResponse {
            exit_status: exit.status,
            exited_at: events::timestamp(&exit),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let events = events::forward(publisher, self.namespace.clone(), self.log.clone());
        let launcher = Arc::new(SandboxLauncher {
            log: self.log.clone(),
        });
        let pod = Pod::new(launcher, events, self.log.clone(), self.started);
        TaskService::new(pod, self.exit.clone(), self.log.clone())
    }
}
