//! An in-process stand-in for a pod VM: containers and processes are entries in a table,
//! exits, OOM reports and the VM's death happen when a test says so.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use shoji_agent_api::{stream::StreamKind, types::ContainerStatsResponse};
use tokio::{
    net::UnixStream,
    sync::{mpsc, watch},
};
use ttrpc::Code;

use super::{
    process::Exit,
    vm::{PodVm, VmLauncher},
};
use crate::{
    agent_client::AgentError,
    hypervisor::VmExit,
    sandbox::{ContainerRequest, ExecRequest, Result, SandboxConfig},
};

type Key = (String, String);

pub struct FakeVm {
    /// (container, exec) → exit status once exited.
    processes: Mutex<HashMap<Key, watch::Sender<Option<u32>>>>,
    /// Processes that exit the moment they are started, with this status.
    exit_on_start: Mutex<HashMap<Key, u32>>,
    removed: Mutex<Vec<String>>,
    /// Every signal_process: container, exec, signal, all.
    pub signals: Mutex<Vec<(String, String, u32, bool)>>,
    /// Every update_container: container id and its resources JSON.
    pub updates: Mutex<Vec<(String, Vec<u8>)>>,
    stops: AtomicUsize,
    end: watch::Sender<Option<VmExit>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

fn not_found(what: &str) -> crate::sandbox::SandboxError {
    AgentError::Rpc {
        call: "fake",
        code: Code::NOT_FOUND,
        message: format!("{what} not found"),
    }
    .into()
}

fn key(c: &str, e: &str) -> Key {
    (c.to_string(), e.to_string())
}

impl FakeVm {
    pub fn new() -> Arc<FakeVm> {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Arc::new(FakeVm {
            processes: Mutex::new(HashMap::new()),
            exit_on_start: Mutex::new(HashMap::new()),
            removed: Mutex::new(Vec::new()),
            signals: Mutex::new(Vec::new()),
            updates: Mutex::new(Vec::new()),
            stops: AtomicUsize::new(0),
            end: watch::channel(None).0,
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
        })
    }

    /// The guest process exits with `status`.
    pub fn exit(&self, container_id: &str, exec_id: &str, status: u32) {
        if let Some(p) = self
            .processes
            .lock()
            .unwrap()
            .get(&key(container_id, exec_id))
        {
            p.send_replace(Some(status));
        }
    }

    /// The process will exit with `status` as soon as it is started (before Start returns).
    pub fn exit_when_started(&self, container_id: &str, exec_id: &str, status: u32) {
        self.exit_on_start
            .lock()
            .unwrap()
            .insert(key(container_id, exec_id), status);
    }

    /// The VM ends (VMM crash, a daemon's death).
    pub fn die(&self, reason: &str) {
        self.end.send_replace(Some(VmExit {
            status: Some(137),
            reason: reason.into(),
        }));
    }

    /// The guest reports an OOM kill in `container_id`.
    pub fn oom(&self, container_id: &str) {
        let _ = self.oom_tx.send(container_id.into());
    }

    pub fn removed(&self) -> Vec<String> {
        self.removed.lock().unwrap().clone()
    }

    pub fn stops(&self) -> usize {
        self.stops.load(Ordering::SeqCst)
    }

    fn add(&self, c: &str, e: &str) {
        self.processes
            .lock()
            .unwrap()
            .insert(key(c, e), watch::channel(None).0);
    }

    fn exists(&self, c: &str, e: &str) -> bool {
        self.processes.lock().unwrap().contains_key(&key(c, e))
    }
}

#[async_trait]
impl PodVm for FakeVm {
    fn pid(&self) -> u32 {
        4242
    }

    async fn create_container(&self, req: ContainerRequest) -> Result<()> {
        self.add(&req.id, "");
        Ok(())
    }

    async fn exec_process(&self, req: ExecRequest) -> Result<()> {
        if !self.exists(&req.container_id, "") {
            return Err(not_found("container"));
        }
        self.add(&req.container_id, &req.exec_id);
        Ok(())
    }

    async fn attach_stdio(
        &self,
        _: &str,
        _: &str,
        _: &[StreamKind],
    ) -> Result<Vec<(StreamKind, UnixStream)>> {
        Ok(Vec::new())
    }

    async fn start_process(&self, c: &str, e: &str) -> Result<u32> {
        if !self.exists(c, e) {
            return Err(not_found("process"));
        }
        let status = self.exit_on_start.lock().unwrap().remove(&key(c, e));
        if let Some(status) = status {
            self.exit(c, e, status);
            // Let the waiter see the exit before Start returns.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(100)
    }

    async fn wait_process(&self, c: &str, e: &str) -> Result<Exit> {
        let mut rx = self
            .processes
            .lock()
            .unwrap()
            .get(&key(c, e))
            .ok_or_else(|| not_found("process"))?
            .subscribe();
        let mut end = self.end.subscribe();
        tokio::select! {
            status = rx.wait_for(Option::is_some) => Ok(Exit::now(status.unwrap().unwrap())),
            _ = end.wait_for(Option::is_some) => Err(AgentError::Timeout { call: "WaitProcess", timeout: Duration::ZERO }.into()),
        }
    }

    async fn signal_process(&self, c: &str, e: &str, signal: u32, all: bool) -> Result<()> {
        self.signals
            .lock()
            .unwrap()
            .push((c.into(), e.into(), signal, all));
        let exec = if all { "" } else { e };
        if !self.exists(c, exec) {
            return Err(not_found("process"));
        }
        self.exit(c, exec, 128 + signal);
        Ok(())
    }

    async fn resize_tty(&self, _: &str, _: &str, _: u32, _: u32) -> Result<()> {
        Ok(())
    }

    async fn remove_container(&self, c: &str) -> Result<()> {
        self.removed.lock().unwrap().push(c.into());
        self.processes.lock().unwrap().retain(|(pc, _), _| pc != c);
        Ok(())
    }

    async fn set_paused(&self, _: &str, _: bool) -> Result<()> {
        Ok(())
    }

    async fn update_container(&self, c: &str, resources_json: Vec<u8>) -> Result<()> {
        self.updates
            .lock()
            .unwrap()
            .push((c.into(), resources_json));
        Ok(())
    }

    async fn list_processes(&self, _: &str) -> Result<Vec<u32>> {
        Ok(vec![100])
    }

    async fn container_stats(&self, _: &str) -> Result<ContainerStatsResponse> {
        Ok(ContainerStatsResponse::default())
    }

    async fn next_oom(&self) -> Result<String> {
        let id = self.oom_rx.lock().await.recv().await;
        id.ok_or_else(|| not_found("OOM stream"))
    }

    async fn wait_exit(&self) -> VmExit {
        crate::hypervisor::wait_exit(self.end.subscribe()).await
    }

    async fn stop(&self) -> Result<()> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        self.end.send_if_modified(|e| {
            let first = e.is_none();
            e.get_or_insert(VmExit {
                status: None,
                reason: "stopped".into(),
            });
            first
        });
        Ok(())
    }
}

/// Boots the one [`FakeVm`] (after `delay`), counting boots.
pub struct FakeLauncher {
    pub vm: Arc<FakeVm>,
    pub boots: AtomicUsize,
    pub delay: Duration,
}

#[async_trait]
impl VmLauncher for FakeLauncher {
    async fn boot(&self, _: SandboxConfig) -> Result<Arc<dyn PodVm>> {
        self.boots.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        Ok(self.vm.clone())
    }
}
