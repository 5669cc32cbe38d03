//! containerd's Task service (task API v2): each request is checked, translated into one
//! [`Pod`] call, and the answer (or error, as a ttrpc status) translated back.
use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use containerd_shim::{asynchronous::ExitSignal, util::convert_to_any, TtrpcResult};
use containerd_shim_protos::{
    api::{self, Empty},
    protobuf::MessageField,
    shim_async::Task,
    ttrpc::{self, r#async::TtrpcContext, Code, Status},
    types::task::{ProcessInfo, Status as TaskStatus},
};
use slog::{debug, info, warn, Logger};

use super::{events::timestamp, options, stats};
use crate::{
    pod::{CreateRequest, Pod, PodError, ProcessRef, Status as ProcessStatus},
    sandbox::{Mount, SandboxError},
    stdio::StdioPaths,
};

pub struct TaskService {
    pod: Arc<Pod>,
    exit: Arc<ExitSignal>,
    log: Logger,
}

impl TaskService {
    pub fn new(pod: Arc<Pod>, exit: Arc<ExitSignal>, log: Logger) -> TaskService {
        TaskService { pod, exit, log }
    }

    /// Logs a failed request and turns it into the ttrpc status containerd understands.
    fn fail(&self, call: &'static str, id: &str, e: PodError) -> ttrpc::Error {
        let code = match &e {
            PodError::ContainerNotFound(_) | PodError::ProcessNotFound { .. } => Code::NOT_FOUND,
            PodError::ContainerExists(_) | PodError::ExecExists { .. } => Code::ALREADY_EXISTS,
            PodError::InvalidArgument(_)
            | PodError::Spec { .. }
            | PodError::Config(_)
            | PodError::Stdio(_)
            | PodError::Sandbox(SandboxError::Invalid(_) | SandboxError::InvalidId(_)) => {
                Code::INVALID_ARGUMENT
            }
            PodError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            PodError::Sandbox(SandboxError::Agent(a)) => a.code().unwrap_or(Code::INTERNAL),
            PodError::Sandbox(_) => Code::INTERNAL,
        };
        self.status(call, id, code, e.to_string())
    }

    /// A refusal that is not the pod's business (an unsupported request).
    fn unsupported(&self, call: &'static str, id: &str, what: &str) -> ttrpc::Error {
        self.status(
            call,
            id,
            Code::UNIMPLEMENTED,
            format!("{what} is not supported by shoji"),
        )
    }

    fn status(&self, call: &'static str, id: &str, code: Code, e: String) -> ttrpc::Error {
        if code == Code::NOT_FOUND {
            debug!(self.log, "request failed"; "call" => call, "id" => id, "error" => %e);
        } else {
            warn!(self.log, "request failed"; "call" => call, "id" => id, "error" => %e);
        }
        let mut status = Status::new();
        status.set_code(code);
        status.set_message(format!("{call} {id}: {e}"));
        ttrpc::Error::RpcStatus(status)
    }
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!(self.log, "create"; "id" => &req.id, "bundle" => &req.bundle);
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(self.unsupported("create", &req.id, "restoring from a checkpoint"));
        }
        let config_path = match req.options.as_ref() {
            Some(o) => options::config_path(&o.type_url, &o.value)
                .map_err(|e| self.fail("create", &req.id, PodError::InvalidArgument(e)))?,
            None => None,
        };
        let create = CreateRequest {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| Mount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            config_path,
        };
        let pid = self
            .pod
            .create(create)
            .await
            .map_err(|e| self.fail("create", &req.id, e))?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        info!(self.log, "start"; "id" => &req.id, "exec" => &req.exec_id);
        let pid = self
            .pod
            .start(&req.id, &ProcessRef::from_task(&req.exec_id))
            .await
            .map_err(|e| self.fail("start", &req.id, e))?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        info!(self.log, "delete"; "id" => &req.id, "exec" => &req.exec_id);
        let exit = self
            .pod
            .delete(&req.id, &ProcessRef::from_task(&req.exec_id))
            .await
            .map_err(|e| self.fail("delete", &req.id, e))?;
        Ok(api::DeleteResponse {
            pid: self.pod.vmm_pid(),
            exit_status: exit.status,
            exited_at: timestamp(&exit),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        info!(self.log, "exec"; "id" => &req.id, "exec" => &req.exec_id);
        let process_json = req
            .spec
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default();
        let stdio = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        self.pod
            .exec(&req.id, &req.exec_id, stdio, process_json)
            .await
            .map_err(|e| self.fail("exec", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let s = self
            .pod
            .state(&req.id, &ProcessRef::from_task(&req.exec_id))
            .map_err(|e| self.fail("state", &req.id, e))?;
        let status = match s.status {
            ProcessStatus::Created => TaskStatus::CREATED,
            ProcessStatus::Running => TaskStatus::RUNNING,
            ProcessStatus::Paused => TaskStatus::PAUSED,
            ProcessStatus::Stopped => TaskStatus::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id,
            exec_id: req.exec_id,
            bundle: s.bundle.display().to_string(),
            pid: s.pid,
            status: status.into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            exit_status: s.exit.as_ref().map(|e| e.status).unwrap_or_default(),
            exited_at: s.exit.as_ref().map(timestamp).unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let exit = self
            .pod
            .wait(&req.id, &ProcessRef::from_task(&req.exec_id))
            .await
            .map_err(|e| self.fail("wait", &req.id, e))?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(&exit),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        info!(self.log, "kill"; "id" => &req.id, "exec" => &req.exec_id, "signal" => req.signal, "all" => req.all);
        self.pod
            .kill(
                &req.id,
                &ProcessRef::from_task(&req.exec_id),
                req.signal,
                req.all,
            )
            .await
            .map_err(|e| self.fail("kill", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = self
            .pod
            .pids(&req.id)
            .await
            .map_err(|e| self.fail("pids", &req.id, e))?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.pod
            .pause(&req.id)
            .await
            .map_err(|e| self.fail("pause", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.pod
            .resume(&req.id)
            .await
            .map_err(|e| self.fail("resume", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(self.unsupported(
            "checkpoint",
            &req.id,
            "checkpointing a VM-isolated container",
        ))
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        self.pod
            .resize_pty(
                &req.id,
                &ProcessRef::from_task(&req.exec_id),
                req.width,
                req.height,
            )
            .await
            .map_err(|e| self.fail("resize_pty", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        self.pod
            .close_io(&req.id, &ProcessRef::from_task(&req.exec_id))
            .map_err(|e| self.fail("close_io", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|r| r.value.clone())
            .unwrap_or_default();
        self.pod
            .update(&req.id, &resources)
            .await
            .map_err(|e| self.fail("update", &req.id, e))?;
        Ok(Empty::new())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let guest = self
            .pod
            .stats(&req.id)
            .await
            .map_err(|e| self.fail("stats", &req.id, e))?;
        let metrics = guest.as_ref().map(stats::metrics).unwrap_or_default();
        let stats =
            convert_to_any(Box::new(metrics)).map_err(|e| ttrpc::Error::Others(e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.vmm_pid(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<Empty> {
        // containerd calls Shutdown after each Delete; the shim stays while its pod has containers.
        if !self.pod.is_empty() {
            return Ok(Empty::new());
        }
        info!(self.log, "shutdown: no containers left");
        self.pod.stop_vm().await;
        self.exit.signal();
        Ok(Empty::new())
    }
}
