//! The one path of a container in the guest, shared by the pod layer, `shoji vm run` and
//! the tests: mount its rootfs and volumes under the shared directory → CreateContainer →
//! attach stdio → start → wait → remove (in the guest, then the host mounts).
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use shoji_agent_api::{
    stream::StreamKind,
    types::{CreateContainerRequest, ExecProcessRequest, Rootfs, WaitProcessResponse},
    GUEST_SHARE_DIR,
};
use slog::warn;
use tokio::net::UnixStream;

use super::{validate_id, Result, Sandbox, SandboxError};
use crate::{oci, sharefs::BindMode};

/// A containerd-style mount: how one layer of a container's rootfs is mounted on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// `bind` (also `rbind`) or a filesystem type such as `overlay`.
    pub kind: String,
    pub source: String,
    /// mount(8) options (`ro`, `lowerdir=...`).
    pub options: Vec<String>,
}

impl Mount {
    /// A plain host directory as a rootfs.
    pub fn host_dir(dir: &Path, read_only: bool) -> Mount {
        let mut options = vec!["rbind".to_string()];
        if read_only {
            options.push("ro".into());
        }
        Mount {
            kind: "bind".into(),
            source: dir.display().to_string(),
            options,
        }
    }
}

/// A container to create in the guest.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub id: String,
    /// How its rootfs is mounted on the host, in order on the same target (containerd gives
    /// one overlay or bind mount).
    pub rootfs: Vec<Mount>,
    /// Its OCI spec. Host bind mounts (volumes, /etc/hosts, ...) are shared with the guest
    /// and rewritten to their guest paths.
    pub spec: Spec,
    /// Whether the init will get a stdin stream.
    pub stdin: bool,
    /// `false`: the rootfs is the container's own writable layer (containerd's snapshot), and
    /// its writes go through to the host's disk, as with runc. `true`: the rootfs is a shared
    /// source the container must not change; its writes go to a layer in guest memory.
    pub guest_overlay: bool,
}

/// A process to add to a running container.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    /// An OCI Process, as JSON.
    pub process_json: Vec<u8>,
    pub terminal: bool,
    pub stdin: bool,
}

impl Sandbox {
    /// Mounts the container's rootfs and volumes on the host, then creates it in the guest
    /// (its init exists, not yet running). The guest sees the mounts only once they are
    /// made. On error nothing of it is left, in the guest or on the host.
    pub async fn create_container(&self, mut req: ContainerRequest) -> Result<()> {
        validate_id("container id", &req.id)?;
        let terminal = req
            .spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        self.ledger.note(|s| {
            if !s.containers.contains(&req.id) {
                s.containers.push(req.id.clone());
            }
        });
        let created = async {
            let rootfs = self.mount_rootfs(&req.id, &req.rootfs)?;
            let submounts = self.share_volumes(&req.id, &mut req.spec)?;
            let spec_json = serde_json::to_vec(&req.spec)
                .map_err(|e| SandboxError::Invalid(format!("OCI spec: {e}")))?;
            self.agent
                .create_container(CreateContainerRequest {
                    container_id: req.id.clone(),
                    spec_json,
                    rootfs: Some(Rootfs {
                        source: rootfs,
                        guest_overlay: req.guest_overlay,
                        ..Default::default()
                    })
                    .into(),
                    terminal,
                    stdin: req.stdin,
                    submounts,
                    ..Default::default()
                })
                .await?;
            let resources = req
                .spec
                .linux()
                .as_ref()
                .and_then(|l| l.resources().as_ref());
            self.sizing.track(&req.id, resources);
            let adj = req.spec.process().as_ref().and_then(|p| p.oom_score_adj());
            if let Some(adj) = self.oom.track(&req.id, adj) {
                self.set_oom_score_adj(adj);
            }
            Ok(())
        }
        .await;
        if created.is_err() {
            let _ = self.remove_container(&req.id).await;
        }
        created
    }

    /// Adds a process to a running container; [`Sandbox::start_process`] runs it.
    pub async fn exec_process(&self, req: ExecRequest) -> Result<()> {
        Ok(self
            .agent
            .exec_process(ExecProcessRequest {
                container_id: req.container_id,
                exec_id: req.exec_id,
                process_json: req.process_json,
                terminal: req.terminal,
                stdin: req.stdin,
                ..Default::default()
            })
            .await?)
    }

    /// Opens the stdio streams of a created process; do it before the start so no output
    /// is missed.
    pub async fn attach_stdio(
        &self,
        container_id: &str,
        exec_id: &str,
        kinds: &[StreamKind],
    ) -> Result<Vec<(StreamKind, UnixStream)>> {
        // Each stream is a vsock connection with its own handshake: open them side by side.
        let streams = kinds.iter().map(|kind| async move {
            let s = self.agent.open_stream(*kind, container_id, exec_id).await?;
            Ok::<_, SandboxError>((*kind, s))
        });
        futures_util::future::try_join_all(streams).await
    }

    /// Runs a created process; returns its guest pid.
    pub async fn start_process(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        Ok(self.agent.start_process(container_id, exec_id).await?)
    }

    /// Waits until the process has exited and its output is drained.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse> {
        Ok(self.agent.wait_process(container_id, exec_id).await?)
    }

    /// Removes the container in the guest (what still runs is killed), then its mounts on
    /// the host. Both are attempted; an unknown container succeeds.
    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        validate_id("container id", container_id)?;
        let removed = self.agent.remove_container(container_id).await;
        self.sizing.forget(container_id);
        if let Some(adj) = self.oom.forget(container_id) {
            self.set_oom_score_adj(adj);
        }
        let unmounted = self.shared.remove(Path::new(container_id));
        if removed.is_ok() && unmounted.is_ok() {
            self.ledger
                .note(|s| s.containers.retain(|c| c != container_id));
        }
        unmounted?;
        Ok(removed?)
    }

    /// Gives the VMM and its daemons the pod's OOM priority (see `oom.rs`).
    fn set_oom_score_adj(&self, adj: i32) {
        for (pid, e) in super::oom::apply(&self.ledger.snapshot().pids, adj) {
            warn!(self.log, "setting oom_score_adj failed"; "pid" => pid, "value" => adj, "error" => %e);
        }
    }

    /// Mounts a container's rootfs under the shared directory; returns its guest path.
    fn mount_rootfs(&self, container_id: &str, mounts: &[Mount]) -> Result<String> {
        if mounts.is_empty() {
            return Err(SandboxError::BadRootfs {
                rootfs: container_id.into(),
                why: "no mounts given".into(),
            });
        }
        let rel = Path::new(container_id).join("rootfs");
        for m in mounts {
            match m.kind.as_str() {
                "bind" | "rbind" => {
                    let src = Path::new(&m.source);
                    if !src.is_dir() {
                        return Err(SandboxError::BadRootfs {
                            rootfs: m.source.clone(),
                            why: "not a directory".into(),
                        });
                    }
                    self.shared
                        .bind(src, &rel, BindMode::from_options(&m.options))?;
                }
                fstype => {
                    self.shared.mount_fs(fstype, &m.source, &rel, &m.options)?;
                }
            }
        }
        Ok(guest_path(&rel))
    }

    /// Shares the spec's host bind mounts with the guest (each at
    /// `<container>/volumes/m<i>`, read-only enforced on the host) and rewrites their
    /// sources to the guest paths. Returns the guest paths of the mounts nested in them.
    fn share_volumes(&self, container_id: &str, spec: &mut Spec) -> Result<Vec<String>> {
        let Some(mounts) = spec.mounts().clone() else {
            return Ok(Vec::new());
        };
        let mut submounts = Vec::new();
        let mut rewritten = Vec::with_capacity(mounts.len());
        for (i, mut m) in mounts.into_iter().enumerate() {
            if oci::is_host_bind(&m) {
                let source = m.source().clone().ok_or_else(|| {
                    SandboxError::Invalid(format!(
                        "bind mount {} has no source",
                        m.destination().display()
                    ))
                })?;
                if !source.exists() {
                    return Err(SandboxError::Invalid(format!(
                        "source {} of the mount at {} does not exist",
                        source.display(),
                        m.destination().display()
                    )));
                }
                let rel = Path::new(container_id)
                    .join("volumes")
                    .join(format!("m{i}"));
                let options = m.options().clone().unwrap_or_default();
                if options.iter().any(|o| o == "rshared" || o == "shared") {
                    return Err(SandboxError::Invalid(format!(
                        "the mount of {} at {} asks for bidirectional mount propagation \
                         (rshared): a mount made inside the pod's VM cannot reach the host; use \
                         HostToContainer (rslave) propagation",
                        source.display(),
                        m.destination().display()
                    )));
                }
                let mode = BindMode::from_options(&options);
                self.shared.bind(&source, &rel, mode)?;
                // Only a recursive bind brings mounts along (and only those need a look-up).
                if mode.recursive {
                    submounts.extend(
                        self.shared
                            .nested_mounts(&rel)?
                            .iter()
                            .map(|p| guest_path(p)),
                    );
                }
                m.set_source(Some(PathBuf::from(guest_path(&rel))));
            }
            rewritten.push(m);
        }
        spec.set_mounts(Some(rewritten));
        Ok(submounts)
    }
}

fn guest_path(rel: &Path) -> String {
    format!("{GUEST_SHARE_DIR}/{}", rel.display())
}
