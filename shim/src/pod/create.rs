//! Create: the first container of the pod boots the VM (the pause container gets nothing in
//! the guest); the others are created in it, their init's stdio attached before it starts.
use std::{sync::Arc, time::Instant};

use oci_spec::runtime::Spec;
use slog::info;

use super::{
    container::{Container, Kind},
    CreateRequest, Event, Pod, PodError, PodVm, Process, ProcessRef, Result, VmSlot,
    SANDBOX_DIR_FILE,
};
use crate::{
    config::Config,
    oci::{self, Role},
    sandbox::{ContainerRequest, Mount, SandboxConfig},
};

impl Pod {
    /// Create: boots the VM for the first container of the pod, then creates the container
    /// in it (the pause container gets nothing in the guest). Returns the task's pid.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<u32> {
        let began = Instant::now();
        let spec_path = req.bundle.join("config.json");
        let spec = Spec::load(&spec_path).map_err(|e| PodError::Spec {
            path: spec_path.clone(),
            why: e.to_string(),
        })?;
        if self.containers.lock().unwrap().contains_key(&req.id) {
            return Err(PodError::ContainerExists(req.id));
        }
        let role = oci::role(&spec);
        let kind = match role {
            Role::PodSandbox => Kind::PodSandbox,
            Role::PodMember { .. } | Role::Standalone => Kind::Guest,
        };
        let owns_vm = !matches!(role, Role::PodMember { .. });
        if owns_vm {
            self.boot(&req, &spec).await?;
        }
        let vm = match (&role, self.vm()) {
            (Role::PodMember { sandbox_id }, Err(_)) => {
                return Err(PodError::FailedPrecondition(format!(
                    "pod sandbox {sandbox_id} is not running in this shim"
                )))
            }
            (_, vm) => vm?,
        };
        let init = Process::new(&req.id, ProcessRef::Init, req.stdio.clone());
        let container = Arc::new(Container::new(
            &req.id,
            req.bundle.clone(),
            kind,
            owns_vm,
            init.clone(),
        ));
        if kind == Kind::Guest {
            if let Err(e) = self.create_in_guest(vm.as_ref(), &req, spec, &init).await {
                if owns_vm {
                    self.stop_vm().await;
                } else {
                    let _ = vm.remove_container(&req.id).await;
                }
                return Err(e);
            }
            // From here a kill of the never-started init still ends in an exit.
            tokio::spawn(self.clone().wait_process(vm.clone(), init.clone()));
        }
        self.containers
            .lock()
            .unwrap()
            .insert(req.id.clone(), container);
        let pid = vm.pid();
        self.emit(Event::Create {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            stdio: req.stdio.clone(),
            pid,
        });
        // Phase timings, read by hack/bench-ctr.sh for the start-up breakdown.
        info!(self.log, "container created"; "container" => &req.id,
            "create_ms" => began.elapsed().as_millis() as u64,
            "since_shim_start_ms" => self.started.elapsed().as_millis() as u64);
        Ok(pid)
    }

    /// Boots the pod's VM. Only one Create can: the slot is claimed before the boot.
    async fn boot(self: &Arc<Self>, req: &CreateRequest, spec: &Spec) -> Result<()> {
        {
            let mut slot = self.vm.lock().unwrap();
            if !matches!(*slot, VmSlot::None) {
                return Err(PodError::FailedPrecondition(format!(
                    "container {} would start a second VM in this shim's pod",
                    req.id
                )));
            }
            *slot = VmSlot::Booting;
        }
        let booted = async {
            let config = Config::load_from(req.config_path.as_deref())?;
            let cfg = SandboxConfig::from_spec(spec, &req.id, config)
                .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
            // Lets `containerd-shim-shoji-v2 delete` find the VM if this shim dies from here on.
            std::fs::write(
                req.bundle.join(SANDBOX_DIR_FILE),
                cfg.dir().as_os_str().as_encoded_bytes(),
            )
            .map_err(|e| {
                PodError::InvalidArgument(format!(
                    "cannot write {SANDBOX_DIR_FILE} into the bundle {}: {e}",
                    req.bundle.display()
                ))
            })?;
            info!(self.log, "booting the pod's VM"; "sandbox" => &cfg.id, "vcpus" => cfg.vcpus,
                "memory_mib" => cfg.memory_mib, "netns" => ?cfg.netns);
            Ok::<_, PodError>(self.launcher.boot(cfg).await?)
        }
        .await;
        let mut slot = self.vm.lock().unwrap();
        match booted {
            Ok(vm) => {
                *slot = VmSlot::Running(vm.clone());
                tokio::spawn(self.clone().watch_vm(vm.clone()));
                tokio::spawn(self.clone().forward_ooms(vm));
                Ok(())
            }
            Err(e) => {
                *slot = VmSlot::None;
                Err(e)
            }
        }
    }

    /// Creates the container in the guest and attaches its init's stdio (before it starts,
    /// so no output is missed).
    async fn create_in_guest(
        &self,
        vm: &dyn PodVm,
        req: &CreateRequest,
        spec: Spec,
        init: &Process,
    ) -> Result<()> {
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if terminal != req.stdio.terminal {
            return Err(PodError::InvalidArgument(format!(
                "terminal mismatch: the spec says {terminal}, the request {}",
                req.stdio.terminal
            )));
        }
        let rootfs = if req.rootfs.is_empty() {
            // containerd mounted the rootfs into the bundle itself.
            vec![Mount::host_dir(&req.bundle.join("rootfs"), false)]
        } else {
            req.rootfs.clone()
        };
        vm.create_container(ContainerRequest {
            id: req.id.clone(),
            rootfs,
            spec,
            stdin: req.stdio.has_stdin(),
            // containerd's snapshot is this container's own layer: written on the host's disk,
            // where kubelet accounts ephemeral storage, and not limited by the VM's memory.
            guest_overlay: false,
        })
        .await?;
        init.set_io(self.attach_io(vm, &req.id, "", &req.stdio).await?);
        Ok(())
    }
}
