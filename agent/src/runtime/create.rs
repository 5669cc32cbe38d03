//! CreateContainer: the container's rootfs assembled, its spec rewritten for the guest, the
//! pod's namespaces and sysctls joined, and its init made by a `create` helper; on any
//! error, everything of it is destroyed again.
use std::{
    collections::HashMap,
    fs,
    path::Path,
    sync::{Arc, Mutex},
};

use shoji_agent_api::types::CreateContainerRequest;
use slog::debug;

use super::{
    helper_err, internal,
    process::{Launch, Process},
    Container, Runtime, RuntimeError,
};
use crate::{
    cgroup,
    container::{self, guest_spec, rootfs, volumes},
    io::ProcessIo,
    logger::{log, ms_since},
};

impl Runtime {
    /// Creates a container (its init exists, not yet running). Runs to its end even if the
    /// caller stops waiting (a ttrpc deadline): a half-made container would leak.
    pub async fn create_container(
        self: &Arc<Self>,
        req: CreateContainerRequest,
    ) -> Result<(), RuntimeError> {
        let runtime = self.clone();
        tokio::spawn(async move {
            let id = req.container_id.clone();
            let guard = runtime.lock(&id).await;
            let created = runtime.create_locked(&req).await;
            runtime.unlock(&id, guard);
            created
        })
        .await
        .map_err(internal("the create task"))?
    }

    async fn create_locked(&self, req: &CreateContainerRequest) -> Result<(), RuntimeError> {
        let id = req.container_id.as_str();
        guest_spec::validate_id("container", id)?;
        let rootfs_req = req
            .rootfs
            .as_ref()
            .filter(|r| !r.source.is_empty())
            .ok_or_else(|| {
                RuntimeError::InvalidArgument("CreateContainer needs rootfs.source".into())
            })?;
        if self.table.lock().unwrap().containers.contains_key(id) {
            return Err(RuntimeError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        let began = std::time::Instant::now();
        let dir = self.container_dir(id);
        // A leftover of an earlier failed attempt must not leak into this one.
        self.os
            .remove_files(&dir)
            .map_err(internal("cleaning up an old container directory"))?;
        fs::create_dir_all(&dir).map_err(internal("creating the container directory"))?;
        match self
            .create_in(
                id,
                &dir,
                req,
                Path::new(&rootfs_req.source),
                rootfs_req.guest_overlay,
            )
            .await
        {
            Ok(c) => {
                self.oom.watch(id, &c.cgroup);
                self.table
                    .lock()
                    .unwrap()
                    .containers
                    .insert(id.to_string(), c);
                debug!(log(), "container created"; "container" => id,
                    "ms" => began.elapsed().as_millis() as u64);
                Ok(())
            }
            Err(e) => {
                self.destroy(id, &dir).await;
                Err(e)
            }
        }
    }

    async fn create_in(
        &self,
        id: &str,
        dir: &Path,
        req: &CreateContainerRequest,
        source: &Path,
        overlay: bool,
    ) -> Result<Arc<Container>, RuntimeError> {
        // Each phase's duration, for the `container prepared` debug line.
        let mut since = std::time::Instant::now();
        let mut lap = || {
            let ms = ms_since(since);
            since = std::time::Instant::now();
            ms
        };
        // Parsed and checked before anything is mounted: a bad spec fails fast.
        let mut guest =
            guest_spec::container_spec(&req.spec_json, id, &rootfs::path(dir), req.terminal)?;
        volumes::check(id, &req.submounts)
            .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?;
        let parse_ms = lap();
        if !guest.pod_namespaces.is_empty() {
            guest.join_pod(self.pod.pause(self.os.as_ref()).await?);
        }
        let pause_ms = lap();
        let rootfs = self
            .os
            .assemble_rootfs(source, overlay, dir)
            .map_err(|e| match e {
                rootfs::RootfsError::NoSource(_) => RuntimeError::InvalidArgument(e.to_string()),
                e => RuntimeError::Internal(e.to_string()),
            })?;
        let rootfs_ms = lap();
        let guest_spec::GuestSpec {
            spec, net_sysctls, ..
        } = guest;
        if !net_sysctls.is_empty() {
            self.os.set_sysctls(net_sysctls, None).await?;
        }
        guest_spec::check_executable(
            &rootfs,
            spec.process()
                .as_ref()
                .expect("container_spec checks the process"),
        )?;
        for (path, error) in volumes::reveal(&req.submounts) {
            debug!(log(), "a nested volume mount is gone"; "container" => id,
                "path" => path, "error" => %error);
        }
        spec.save(dir.join("config.json"))
            .map_err(internal("writing config.json"))?;

        let (pio, child) = if req.terminal {
            (ProcessIo::tty(), None)
        } else {
            let (pio, child) = ProcessIo::pipes(req.stdin).map_err(internal("stdio pipes"))?;
            (pio, Some(child))
        };
        let launch = Launch::new(child, &self.console_dir())?;
        let born = std::time::Instant::now();
        debug!(log(), "container prepared"; "container" => id, "parse_ms" => parse_ms,
            "pause_wait_ms" => pause_ms, "rootfs_ms" => rootfs_ms, "spec_ms" => lap());
        let pid = self
            .os
            .create(id, dir, launch.stdio())
            .await
            .map_err(helper_err(format!("creating container {id:?}")))?;
        let init = Arc::new(Process::new("", dir.to_path_buf(), pio, None));
        let leftovers = (!container::kill::init_ends_all(&spec)).then(|| cgroup::dir(id));
        init.set_pid(&self.os, pid, born, leftovers);
        launch.finish(&init.io).await?;
        Ok(Arc::new(Container {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            rootfs,
            cgroup: cgroup::dir(id),
            init,
            execs: Mutex::new(HashMap::new()),
        }))
    }
}
