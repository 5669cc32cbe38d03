//! The containers and processes of one pod, with containerd's semantics: the container and
//! process table, the answers of the Task API, exits and the order of events. The VM is
//! behind [`PodVm`]; everything the pod asks of the host goes through it.
//!
//! The first container of the shim (CRI's pause container, or a plain `ctr run` container
//! that is its own pod) boots the VM; CRI containers of the same pod join it. Each process
//! has one waiter task that turns the guest's exit into the process's exit and a TaskExit
//! event (after its output was copied out); a VM that ends ends every process.
mod container;
mod create;
mod error;
pub mod event;
mod monitor;
pub mod process;
pub mod vm;

#[cfg(test)]
mod fake_vm;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use oci_spec::runtime::{LinuxResources, Process as OciProcess};
use shoji_agent_api::types::ContainerStatsResponse;
use slog::{info, warn, Logger};

use self::container::{Container, Kind};
pub use self::{
    error::{PodError, Result},
    event::{Event, EventSender},
    process::{Exit, Process, ProcessRef, Status},
    vm::{PodVm, VmLauncher},
};
use crate::{
    sandbox::{ExecRequest, Mount},
    stdio::{ProcessIo, StdioPaths},
};

/// Exit status reported for processes that were running when their VM went away.
pub const VM_GONE_STATUS: u32 = 255;
/// File in a VM owner's bundle naming the sandbox directory, for
/// `containerd-shim-shoji-v2 delete` after a crash (the run directory may come from a
/// ConfigPath that `delete` is not given). Written before the VM boots.
pub const SANDBOX_DIR_FILE: &str = "shoji-sandbox-dir";

/// What containerd asks for in Create.
pub struct CreateRequest {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioPaths,
    /// The runtime's `ConfigPath` option, when containerd passed one.
    pub config_path: Option<PathBuf>,
}

/// State and status of one process, for containerd's State call.
pub struct ProcessState {
    pub bundle: PathBuf,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub exit: Option<Exit>,
}

/// The pod's VM, from containerd's point of view.
enum VmSlot {
    None,
    /// A Create is booting it: a second one fails instead of booting another VM.
    Booting,
    Running(Arc<dyn PodVm>),
}

pub struct Pod {
    log: Logger,
    events: EventSender,
    launcher: Arc<dyn VmLauncher>,
    vm: Mutex<VmSlot>,
    started: Instant,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// When each container's last OOM event went out.
    last_oom: Mutex<HashMap<String, Instant>>,
}

impl Pod {
    /// `started`: when the shim process started (for the start-up timings it logs).
    pub fn new(
        launcher: Arc<dyn VmLauncher>,
        events: EventSender,
        log: Logger,
        started: Instant,
    ) -> Arc<Pod> {
        Arc::new(Pod {
            log,
            events,
            launcher,
            vm: Mutex::new(VmSlot::None),
            started,
            containers: Mutex::new(HashMap::new()),
            last_oom: Mutex::new(HashMap::new()),
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| PodError::ContainerNotFound(id.into()))
    }

    fn vm(&self) -> Result<Arc<dyn PodVm>> {
        match &*self.vm.lock().unwrap() {
            VmSlot::Running(vm) => Ok(vm.clone()),
            _ => Err(PodError::FailedPrecondition(
                "the pod's VM is not running".into(),
            )),
        }
    }

    /// Host pid containerd sees for every task of the pod: the VMM's (0 before it runs).
    pub fn vmm_pid(&self) -> u32 {
        match &*self.vm.lock().unwrap() {
            VmSlot::Running(vm) => vm.pid(),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.containers.lock().unwrap().is_empty()
    }

    fn emit(&self, event: Event) {
        // The forwarder lives as long as the shim.
        let _ = self.events.send(event);
    }

    async fn attach_io(
        &self,
        vm: &dyn PodVm,
        container_id: &str,
        exec_id: &str,
        stdio: &StdioPaths,
    ) -> Result<ProcessIo> {
        let streams = vm
            .attach_stdio(container_id, exec_id, &stdio.stream_kinds())
            .await?;
        Ok(ProcessIo::start(stdio, streams, &self.log).await?)
    }

    /// Start: runs the container's init (or an exec).
    pub async fn start(self: &Arc<Self>, container_id: &str, which: &ProcessRef) -> Result<u32> {
        let container = self.container(container_id)?;
        let process = container.process(which)?;
        let vm = self.vm()?;
        if !process.begin_start() {
            return Err(PodError::FailedPrecondition(format!(
                "process {container_id}/{which} was already started"
            )));
        }
        let pid = vm.pid();
        if container.kind == Kind::Guest {
            let began = Instant::now();
            if let Err(e) = vm.start_process(container_id, which.wire_id()).await {
                process.finish_start(false);
                return Err(e.into());
            }
            info!(self.log, "process started"; "container" => container_id, "exec" => which.wire_id(),
                "start_ms" => began.elapsed().as_millis() as u64,
                "since_shim_start_ms" => self.started.elapsed().as_millis() as u64);
        }
        // Published before finish_start lets a waiting exit through.
        self.emit(match which {
            ProcessRef::Init => Event::Start {
                container_id: container_id.into(),
                pid,
            },
            ProcessRef::Exec(exec_id) => Event::ExecStarted {
                container_id: container_id.into(),
                exec_id: exec_id.clone(),
                pid,
            },
        });
        process.finish_start(true);
        // An init's waiter runs from its create.
        if let ProcessRef::Exec(_) = which {
            tokio::spawn(self.clone().wait_process(vm, process));
        }
        Ok(pid)
    }

    /// Exec: adds a process to a running container; Start runs it.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        process_json: Vec<u8>,
    ) -> Result<()> {
        let container = self.container(container_id)?;
        if container.kind != Kind::Guest {
            return Err(PodError::FailedPrecondition(format!(
                "container {container_id} is a pod sandbox: it has no processes to exec into"
            )));
        }
        if !container.init.is_running() {
            return Err(PodError::FailedPrecondition(format!(
                "container {container_id} is not running"
            )));
        }
        let oci: OciProcess = serde_json::from_slice(&process_json)
            .map_err(|e| PodError::InvalidArgument(format!("exec process spec: {e}")))?;
        let terminal = oci.terminal().unwrap_or(false);
        let stdio = StdioPaths { terminal, ..stdio };
        if exec_id.is_empty() {
            return Err(PodError::InvalidArgument(format!(
                "an exec into container {container_id} needs an exec id"
            )));
        }
        let process = Process::new(container_id, ProcessRef::from_task(exec_id), stdio.clone());
        container.add_exec(process.clone())?;
        let created = async {
            let vm = self.vm()?;
            vm.exec_process(ExecRequest {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
                process_json,
                terminal,
                stdin: stdio.has_stdin(),
            })
            .await?;
            process.set_io(
                self.attach_io(vm.as_ref(), container_id, exec_id, &stdio)
                    .await?,
            );
            Ok::<_, PodError>(())
        }
        .await;
        if let Err(e) = created {
            container.remove_exec(exec_id);
            return Err(e);
        }
        self.emit(Event::ExecAdded {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        });
        Ok(())
    }

    pub fn state(&self, container_id: &str, which: &ProcessRef) -> Result<ProcessState> {
        let container = self.container(container_id)?;
        let process = container.process(which)?;
        Ok(ProcessState {
            bundle: container.bundle.clone(),
            pid: self.vmm_pid(),
            status: process.status(container.is_paused()),
            stdio: process.stdio.clone(),
            exit: process.exit(),
        })
    }

    pub async fn wait(&self, container_id: &str, which: &ProcessRef) -> Result<Exit> {
        let process = self.container(container_id)?.process(which)?;
        Ok(process.wait().await)
    }

    /// Kill: signals a process (or, with `all`, every process of the container).
    pub async fn kill(
        self: &Arc<Self>,
        container_id: &str,
        which: &ProcessRef,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let container = self.container(container_id)?;
        let process = container.process(which)?;
        let not_found = || PodError::ProcessNotFound {
            container_id: container_id.into(),
            exec_id: which.wire_id().into(),
        };
        // A kill of all after the init's exit still reaches what the init left in the
        // container (containerd sends one before Delete; runc's shim passes it on too).
        let leftovers = all && *which == ProcessRef::Init && container.kind == Kind::Guest;
        if process.exit().is_some() && !leftovers {
            return Err(not_found());
        }
        let _answering = process.signalling();
        if container.kind == Kind::PodSandbox {
            // The pause container stands for the pod: any terminating signal ends it (the
            // exit is recorded once this call has answered).
            let pod = self.clone();
            let pid = self.vmm_pid();
            tokio::spawn(async move {
                pod.report_exit(&process, Exit::now(128 + signal), pid)
                    .await
            });
            return Ok(());
        }
        match self
            .vm()?
            .signal_process(container_id, which.wire_id(), signal, all)
            .await
        {
            Err(e) if e.is_not_found() => Err(not_found()),
            r => Ok(r?),
        }
    }

    /// Delete: removes an exited (or never started) process. For an init: the container in
    /// the guest and its mounts; for the VM's owner, the whole VM instead (nothing in a VM
    /// that is about to go is cleaned up piece by piece).
    pub async fn delete(&self, container_id: &str, which: &ProcessRef) -> Result<Exit> {
        let container = self.container(container_id)?;
        let process = container.process(which)?;
        if process.is_running() {
            return Err(PodError::FailedPrecondition(format!(
                "process {container_id}/{which} is still running"
            )));
        }
        // A never-started process ends here: its waiter must not report an exit later.
        process.set_exited(Exit::now(0)).await;
        let exit = process.exit().expect("set above");
        let pid = self.vmm_pid();
        // Releases a stdin FIFO whose writer never came (its open would block forever).
        let released = match which {
            ProcessRef::Init => container.all_processes(),
            ProcessRef::Exec(_) => vec![process.clone()],
        };
        for p in released {
            if let Some(io) = p.io() {
                io.close_stdin();
            }
        }
        if let ProcessRef::Exec(exec_id) = which {
            container.remove_exec(exec_id);
            return Ok(exit);
        }
        if container.owns_vm {
            self.stop_vm().await;
        } else if container.kind == Kind::Guest {
            if let Ok(vm) = self.vm() {
                if let Err(e) = vm.remove_container(container_id).await {
                    warn!(self.log, "removing the container failed"; "container" => container_id, "error" => %e);
                }
            }
        }
        self.containers.lock().unwrap().remove(container_id);
        self.last_oom.lock().unwrap().remove(container_id);
        self.emit(Event::Delete {
            container_id: container_id.into(),
            pid,
            exit: exit.clone(),
        });
        Ok(exit)
    }

    /// Stops the VM and releases its host resources. Idempotent.
    pub async fn stop_vm(&self) {
        let vm = match &*self.vm.lock().unwrap() {
            VmSlot::Running(vm) => vm.clone(),
            _ => return,
        };
        if let Err(e) = vm.stop().await {
            warn!(self.log, "stopping the pod's VM failed"; "error" => %e);
        }
    }

    pub async fn pause(&self, container_id: &str) -> Result<()> {
        self.set_paused(container_id, true).await
    }

    pub async fn resume(&self, container_id: &str) -> Result<()> {
        self.set_paused(container_id, false).await
    }

    async fn set_paused(&self, container_id: &str, paused: bool) -> Result<()> {
        let container = self.container(container_id)?;
        if container.kind == Kind::Guest {
            self.vm()?.set_paused(container_id, paused).await?;
        }
        container.set_paused(paused);
        let container_id = container_id.to_string();
        self.emit(if paused {
            Event::Paused { container_id }
        } else {
            Event::Resumed { container_id }
        });
        Ok(())
    }

    /// Guest pids of the container's processes.
    pub async fn pids(&self, container_id: &str) -> Result<Vec<u32>> {
        let container = self.container(container_id)?;
        if container.kind != Kind::Guest {
            return Ok(Vec::new());
        }
        Ok(self.vm()?.list_processes(container_id).await?)
    }

    pub async fn resize_pty(
        &self,
        container_id: &str,
        which: &ProcessRef,
        width: u32,
        height: u32,
    ) -> Result<()> {
        self.container(container_id)?.process(which)?;
        Ok(self
            .vm()?
            .resize_tty(container_id, which.wire_id(), width, height)
            .await?)
    }

    pub fn close_io(&self, container_id: &str, which: &ProcessRef) -> Result<()> {
        let process = self.container(container_id)?.process(which)?;
        if let Some(io) = process.io() {
            io.close_stdin();
        }
        Ok(())
    }

    /// Update: new cgroup limits (LinuxResources JSON) for a container.
    pub async fn update(&self, container_id: &str, resources_json: &[u8]) -> Result<()> {
        let container = self.container(container_id)?;
        serde_json::from_slice::<LinuxResources>(resources_json)
            .map_err(|e| PodError::InvalidArgument(format!("resources: {e}")))?;
        if container.kind != Kind::Guest {
            return Ok(());
        }
        Ok(self
            .vm()?
            .update_container(container_id, resources_json.to_vec())
            .await?)
    }

    /// The container's cgroup figures in the guest; `None` for the pod sandbox.
    pub async fn stats(&self, container_id: &str) -> Result<Option<ContainerStatsResponse>> {
        let container = self.container(container_id)?;
        if container.kind != Kind::Guest {
            return Ok(None);
        }
        Ok(Some(self.vm()?.container_stats(container_id).await?))
    }
}
