//! A CRI client (k8s-cri `runtime.v1` over tonic on containerd's Unix socket), each call bounded by a timeout,
//! plus builders for the pod and container configs kubelet would send.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1 as api;

pub use crate::streaming::{exec_stream, port_forward, tty_session, Forwarded, Input};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CRI connect {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {call} timed out after {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    #[error("CRI {call}: {}: {}", .status.code(), .status.message())]
    Status {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("CRI {call}: answer without {field}")]
    Missing {
        call: &'static str,
        field: &'static str,
    },
    #[error("CRI stream {url}: {reason}")]
    Stream { url: String, reason: String },
}

/// Result of ExecSync.
#[derive(Debug)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A connected CRI runtime service client. Cheap to clone.
#[derive(Clone)]
pub struct Cri {
    rt: RuntimeServiceClient<Channel>,
    timeout: Duration,
}

impl Cri {
    /// Connects to the CRI socket; `timeout` bounds the connection and every later call.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Cri, Error> {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://[::]:0")
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| Error::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Cri {
            rt: RuntimeServiceClient::new(channel),
            timeout,
        })
    }

    async fn call<T>(
        &self,
        call: &'static str,
        limit: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(limit, fut).await {
            Err(_) => Err(Error::Timeout {
                call,
                timeout: limit,
            }),
            Ok(Err(status)) => Err(Error::Status { call, status }),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    pub async fn version(&self) -> Result<VersionResponse, Error> {
        let mut c = self.rt.clone();
        self.call(
            "Version",
            self.timeout,
            c.version(VersionRequest::default()),
        )
        .await
    }

    /// The runtime handlers containerd knows, with the features each advertises.
    pub async fn runtime_handlers(&self) -> Result<Vec<RuntimeHandler>, Error> {
        let mut c = self.rt.clone();
        Ok(self
            .call("Status", self.timeout, c.status(StatusRequest::default()))
            .await?
            .runtime_handlers)
    }

    /// RunPodSandbox with `runtime_handler` (e.g. `runc`, `shoji`); returns the sandbox id.
    pub async fn run_pod(
        &self,
        config: &PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, Error> {
        let mut c = self.rt.clone();
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime_handler.into(),
        };
        Ok(self
            .call("RunPodSandbox", self.timeout, c.run_pod_sandbox(req))
            .await?
            .pod_sandbox_id)
    }

    pub async fn pod_status(&self, pod_id: &str) -> Result<PodSandboxStatus, Error> {
        let mut c = self.rt.clone();
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        };
        self.call("PodSandboxStatus", self.timeout, c.pod_sandbox_status(req))
            .await?
            .status
            .ok_or(Error::Missing {
                call: "PodSandboxStatus",
                field: "status",
            })
    }

    /// The pod's primary IP (from its CNI result).
    pub async fn pod_ip(&self, pod_id: &str) -> Result<String, Error> {
        let status = self.pod_status(pod_id).await?;
        status
            .network
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or(Error::Missing {
                call: "PodSandboxStatus",
                field: "network.ip",
            })
    }

    pub async fn stop_pod(&self, pod_id: &str) -> Result<(), Error> {
        let mut c = self.rt.clone();
        let req = StopPodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.call("StopPodSandbox", self.timeout, c.stop_pod_sandbox(req))
            .await
            .map(drop)
    }

    pub async fn remove_pod(&self, pod_id: &str) -> Result<(), Error> {
        let mut c = self.rt.clone();
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.call("RemovePodSandbox", self.timeout, c.remove_pod_sandbox(req))
            .await
            .map(drop)
    }

    pub async fn list_pods(&self) -> Result<Vec<PodSandbox>, Error> {
        let mut c = self.rt.clone();
        let req = ListPodSandboxRequest::default();
        Ok(self
            .call("ListPodSandbox", self.timeout, c.list_pod_sandbox(req))
            .await?
            .items)
    }

    pub async fn pod_stats(&self, pod_id: &str) -> Result<PodSandboxStats, Error> {
        let mut c = self.rt.clone();
        let req = PodSandboxStatsRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.call("PodSandboxStats", self.timeout, c.pod_sandbox_stats(req))
            .await?
            .stats
            .ok_or(Error::Missing {
                call: "PodSandboxStats",
                field: "stats",
            })
    }

    /// CreateContainer in `pod_id` (whose config was `pod`); returns the container id.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        pod: &PodSandboxConfig,
    ) -> Result<String, Error> {
        let mut c = self.rt.clone();
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(pod.clone()),
        };
        Ok(self
            .call("CreateContainer", self.timeout, c.create_container(req))
            .await?
            .container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<(), Error> {
        let mut c = self.rt.clone();
        let req = StartContainerRequest {
            container_id: id.into(),
        };
        self.call("StartContainer", self.timeout, c.start_container(req))
            .await
            .map(drop)
    }

    /// StopContainer: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), Error> {
        let mut c = self.rt.clone();
        let req = StopContainerRequest {
            container_id: id.into(),
            timeout: grace.as_secs() as i64,
        };
        self.call("StopContainer", self.timeout + grace, c.stop_container(req))
            .await
            .map(drop)
    }

    /// UpdateContainerResources (what kubelet sends for an in-place resize).
    pub async fn update_container_resources(
        &self,
        id: &str,
        resources: LinuxContainerResources,
    ) -> Result<(), Error> {
        let mut c = self.rt.clone();
        let req = UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(resources),
            ..Default::default()
        };
        self.call(
            "UpdateContainerResources",
            self.timeout,
            c.update_container_resources(req),
        )
        .await
        .map(drop)
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), Error> {
        let mut c = self.rt.clone();
        let req = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call("RemoveContainer", self.timeout, c.remove_container(req))
            .await
            .map(drop)
    }

    pub async fn container_status(&self, id: &str) -> Result<ContainerStatus, Error> {
        let mut c = self.rt.clone();
        let req = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.call("ContainerStatus", self.timeout, c.container_status(req))
            .await?
            .status
            .ok_or(Error::Missing {
                call: "ContainerStatus",
                field: "status",
            })
    }

    /// The host pid containerd knows for container `id`'s task (ContainerStatus's verbose
    /// info): runc's container process, shoji's VMM.
    pub async fn container_pid(&self, id: &str) -> Result<u32, Error> {
        let mut c = self.rt.clone();
        let req = ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        };
        let info = self
            .call("ContainerStatus", self.timeout, c.container_status(req))
            .await?
            .info;
        info.get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .and_then(|i| i["pid"].as_u64())
            .map(|pid| pid as u32)
            .ok_or(Error::Missing {
                call: "ContainerStatus",
                field: "info.pid",
            })
    }

    /// Polls ContainerStatus until container `id` has exited (bounded by `limit`); returns that status.
    pub async fn wait_exited(&self, id: &str, limit: Duration) -> Result<ContainerStatus, Error> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self.container_status(id).await?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    call: "ContainerStatus (waiting for exit)",
                    timeout: limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats, Error> {
        let mut c = self.rt.clone();
        let req = ContainerStatsRequest {
            container_id: id.into(),
        };
        self.call("ContainerStats", self.timeout, c.container_stats(req))
            .await?
            .stats
            .ok_or(Error::Missing {
                call: "ContainerStats",
                field: "stats",
            })
    }

    /// Containers, of one pod when `pod_id` is given.
    pub async fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<Container>, Error> {
        let mut c = self.rt.clone();
        let filter = pod_id.map(|p| ContainerFilter {
            pod_sandbox_id: p.into(),
            ..Default::default()
        });
        let req = ListContainersRequest { filter };
        Ok(self
            .call("ListContainers", self.timeout, c.list_containers(req))
            .await?
            .containers)
    }

    /// ExecSync: runs `cmd` in container `id`; the runtime kills it after `limit`.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        limit: Duration,
    ) -> Result<ExecOutput, Error> {
        let mut c = self.rt.clone();
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: limit.as_secs().max(1) as i64,
        };
        let r = self
            .call("ExecSync", self.timeout + limit, c.exec_sync(req))
            .await?;
        Ok(ExecOutput {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// Exec: asks for a streaming URL (served by containerd's streaming server; run it with `exec_stream`).
    pub async fn exec_url(
        &self,
        id: &str,
        cmd: &[&str],
        stdin: bool,
        tty: bool,
    ) -> Result<String, Error> {
        let mut c = self.rt.clone();
        let req = ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        };
        Ok(self.call("Exec", self.timeout, c.exec(req)).await?.url)
    }

    /// Attach: asks for a streaming URL attached to container `id`'s init (run it with
    /// `tty_session` when the container has a tty).
    pub async fn attach_url(&self, id: &str, tty: bool) -> Result<String, Error> {
        let mut c = self.rt.clone();
        let req = AttachRequest {
            container_id: id.into(),
            stdin: true,
            tty,
            stdout: true,
            stderr: !tty,
        };
        Ok(self.call("Attach", self.timeout, c.attach(req)).await?.url)
    }

    /// CheckpointContainer to the archive `location`.
    pub async fn checkpoint(&self, id: &str, location: &Path) -> Result<(), Error> {
        let mut c = self.rt.clone();
        let req = CheckpointContainerRequest {
            container_id: id.into(),
            location: location.display().to_string(),
            timeout: 30,
        };
        self.call(
            "CheckpointContainer",
            self.timeout,
            c.checkpoint_container(req),
        )
        .await
        .map(drop)
    }

    /// PortForward: asks for a streaming URL forwarding `ports` of pod `pod_id` (single use;
    /// run it with `port_forward`).
    pub async fn port_forward_url(&self, pod_id: &str, ports: &[u16]) -> Result<String, Error> {
        let mut c = self.rt.clone();
        let req = PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: ports.iter().map(|p| i32::from(*p)).collect(),
        };
        Ok(self
            .call("PortForward", self.timeout, c.port_forward(req))
            .await?
            .url)
    }
}

/// What kubelet would send for a pod: metadata, hostname, DNS, log directory, cgroup parent (under
/// `containerd::POD_CGROUP_ROOT`, removed by `Containerd::stop`), Linux security context with
/// pod-level network/IPC namespaces and container-level PID namespaces. No port mappings.
pub fn pod_config(name: &str, namespace: &str, log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_directory.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.233.255.10".into()],
            searches: vec![format!("{namespace}.svc.cluster.local")],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: Vec::new(),
        labels: [("shoji-test".to_string(), name.to_string())].into(),
        linux: Some(LinuxPodSandboxConfig {
            // kubelet (cgroupfs driver) always gives one; without it containerd has no pod stats.
            cgroup_parent: format!(
                "{}/{name}-{}",
                crate::containerd::POD_CGROUP_ROOT,
                std::process::id()
            ),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container of `image` running `command`; its log goes to `<pod log dir>/<name>.log`.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        working_dir: "/".into(),
        envs: vec![KeyValue {
            key: "SHOJI_TEST".into(),
            value: name.into(),
        }],
        log_path: format!("{name}.log"),
        labels: [("shoji-test".to_string(), name.to_string())].into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A volume as kubelet passes it: host path `host` bind-mounted at `container_path` (emptyDir, hostPath,
/// configMap, the termination-log file).
pub fn host_mount(container_path: &str, host: &Path, readonly: bool) -> Mount {
    Mount {
        container_path: container_path.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}
