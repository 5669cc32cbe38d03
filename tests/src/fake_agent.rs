//! A stand-in for shoji-agent, served by a test on a Unix socket that the fake Cloud
//! Hypervisor's guest relays the agent's vsock port to (`--fake-agent SOCKET`, see
//! `fake_clh/guest.rs`). It answers Health (the sandbox's link check) and records
//! UpdateContainer; every other call gets the generated "not supported" (NOT_FOUND).
//! Enough for a real `Sandbox` on the fake VMM to boot and take resource updates.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use serde_json::Value;
use shoji_agent_api::{
    ttrpc_api::{create_agent, Agent},
    types::{Empty, HealthResponse, UpdateContainerRequest},
};
use ttrpc::r#async::{Server, TtrpcContext};

/// A running fake agent; its server stops when this is dropped with the test's runtime.
pub struct FakeAgent {
    pub socket: PathBuf,
    updates: Arc<Mutex<Vec<(String, Value)>>>,
    _server: Server,
}

impl FakeAgent {
    /// Serves on `socket` (which must not exist).
    pub async fn start(socket: &Path) -> FakeAgent {
        let updates = Arc::default();
        let service = Arc::new(Service {
            updates: Arc::clone(&updates),
        });
        let mut server = Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .expect("bind the fake agent's socket")
            .register_service(create_agent(service));
        server.start().await.expect("start the fake agent");
        FakeAgent {
            socket: socket.to_path_buf(),
            updates,
            _server: server,
        }
    }

    /// Every UpdateContainer so far: container id and its LinuxResources JSON.
    pub fn updates(&self) -> Vec<(String, Value)> {
        self.updates.lock().unwrap().clone()
    }
}

struct Service {
    updates: Arc<Mutex<Vec<(String, Value)>>>,
}

#[async_trait]
impl Agent for Service {
    async fn health(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<HealthResponse> {
        Ok(HealthResponse {
            version: "fake-agent".into(),
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let resources = serde_json::from_slice(&req.resources_json).map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("resources: {e}"),
            ))
        })?;
        self.updates
            .lock()
            .unwrap()
            .push((req.container_id, resources));
        Ok(Empty::new())
    }
}
