//! The launch phase of a boot: virtiofsd, the driver's back-ends and VMM (jailed as the
//! sandbox's uid), until the VMM runs; the VM's end and the bounds on its logs.
use std::path::Path;

use tokio::sync::watch;

use super::{Boot, HostSide};
use crate::{
    agent_client::ReadyListener,
    config::Config,
    hypervisor::{
        self, clh::ClhOptions, describe_status, qemu::QemuOptions, Accel, DriverOptions,
        HypervisorKind, ShareDevice, VmEnd, VmExit, VmSpec, VsockDevice,
    },
    jail::{Identity, Jail},
    logtail,
    sandbox::{console, logs::DAEMON_LOGS, BootTimes, Result, SandboxConfig, SHARE_TAG},
    sharefs::{Virtiofsd, VirtiofsdOptions},
};

/// The guest CID. Each VM has its own vsock back-end, so every VM can use the same one.
const GUEST_CID: u32 = 3;
/// A launched VM, until its agent is connected.
pub(super) struct Launched {
    /// Until the agent announced itself (its socket file goes with it).
    pub(super) ready: Option<ReadyListener>,
    pub(super) vsock: std::path::PathBuf,
    pub(super) console_log: std::path::PathBuf,
    pub(super) vm_end: VmEnd,
    pub(super) end: watch::Receiver<Option<VmExit>>,
    pub(super) daemons_ready: std::time::Duration,
    pub(super) vmm_running: std::time::Duration,
    pub(super) agent_ready: std::time::Duration,
}

impl Launched {
    pub(super) fn times(&self) -> BootTimes {
        BootTimes {
            daemons_ready: self.daemons_ready,
            vmm_running: self.vmm_running,
            agent_ready: self.agent_ready,
        }
    }
}

impl Boot {
    /// The processes: virtiofsd, then the driver's back-ends and VMM, until the VMM runs.
    /// The readiness listener is bound first, so the agent's announcement is never missed.
    pub(super) async fn launch(
        &mut self,
        cfg: &SandboxConfig,
        kind: HypervisorKind,
        dir: &Path,
        host: &HostSide,
        started: tokio::time::Instant,
    ) -> Result<Launched> {
        let c = &cfg.config;
        let vsock = crate::sandbox::agent_socket(dir);
        let ready = ReadyListener::bind(&vsock)?;
        if let Some(id) = host.identity {
            // The vsock back-end (or CH) connects to it for the guest's announcement.
            Jail::grant(id, ready.path())?;
        }
        let shared = self.shared.as_ref().expect("host_resources made it");
        let virtiofsd = self.virtiofsd.insert(Virtiofsd::spawn(
            &VirtiofsdOptions {
                binary: c.virtiofsd.path.clone(),
                cache: c.virtiofsd.cache.clone(),
                shared_dir: shared.export().to_path_buf(),
                socket: dir.join("virtiofsd.sock"),
                log: dir.join("virtiofsd.log"),
            },
            shared.namespace(),
            self.ledger.as_ref(),
        )?);
        let driver = self.driver.insert(hypervisor::new(
            driver_options(c, kind).await,
            self.ledger.clone(),
            &self.log,
        ));
        let accel = driver.capabilities().accel;
        let jail = host.identity.map(|id| Identity {
            kvm_gid: (accel == Accel::Kvm).then(kvm_group).flatten(),
            ..id
        });
        self.ledger.note(|s| {
            if let Some(info) = &mut s.info {
                info.accel = Some(accel);
            }
        });
        // Room for the vCPUs a resize may add, where the backend hot-plugs them.
        let max_vcpus = match driver.capabilities().cpu_hotplug {
            true => c.max_vcpus.max(cfg.vcpus),
            false => cfg.vcpus,
        };
        let spec = VmSpec {
            id: cfg.id.clone(),
            dir: dir.to_path_buf(),
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            kernel_args: cfg.guest_kernel_args(),
            vcpus: cfg.vcpus,
            max_vcpus,
            memory_mib: cfg.memory_mib,
            free_page_reporting: c.free_page_reporting,
            share: Some(ShareDevice {
                tag: SHARE_TAG.into(),
                socket: dir.join("virtiofsd.sock"),
                backend: virtiofsd.exit_watch(),
            }),
            vsock: VsockDevice {
                cid: GUEST_CID,
                socket: vsock.clone(),
            },
            nets: host
                .network
                .as_ref()
                .map(|n| n.devices.clone())
                .unwrap_or_default(),
            console_log: dir.join("console.log"),
            jail,
        };
        // virtiofsd comes up while the driver prepares its own back-ends.
        driver.prepare(&spec).await?;
        virtiofsd.ready(c.timeouts.vm_start).await?;
        let daemons_ready = started.elapsed();
        driver.start().await?;
        let vmm_running = started.elapsed();
        // The VM's end as the sandbox sees it: the driver's (VMM or its back-ends),
        // virtiofsd's, or the agent link's, whichever comes first.
        let vm_end = VmEnd::new();
        vm_end.follow(driver.exit_watch());
        let virtiofsd_log = dir.join("virtiofsd.log");
        vm_end.watch_backend(virtiofsd.exit_watch(), move |status| {
            format!(
                "virtiofsd exited ({}): {}",
                describe_status(status),
                logtail::last_line(&virtiofsd_log)
            )
        });
        let end = vm_end.subscribe();
        console::bound(spec.console_log.clone(), end.clone());
        console::bound_daemon_logs(
            DAEMON_LOGS.iter().map(|f| dir.join(f)).collect(),
            end.clone(),
        );
        Ok(Launched {
            ready: Some(ready),
            vsock,
            console_log: spec.console_log,
            vm_end,
            end,
            daemons_ready,
            vmm_running,
            agent_ready: std::time::Duration::ZERO,
        })
    }
}

/// The driver for the chosen hypervisor, and how it runs its VMM.
async fn driver_options(c: &Config, kind: HypervisorKind) -> DriverOptions {
    match kind {
        HypervisorKind::Qemu => {
            let (accel, accel_reason) = crate::kvm::qemu_accel(c.qemu.accel).await;
            DriverOptions::Qemu(QemuOptions {
                binary: c.qemu.path.clone(),
                vhost_vsock: c.vhost_device_vsock.path.clone(),
                accel,
                accel_reason,
                tcg_tb_size_mib: c.qemu.tcg_tb_size_mib,
                start_timeout: c.timeouts.vm_start,
            })
        }
        HypervisorKind::Clh => DriverOptions::Clh(ClhOptions {
            start_timeout: c.timeouts.vm_start,
            ..ClhOptions::new(c.clh.path.clone())
        }),
    }
}

/// The group that owns /dev/kvm: a jailed VMM opens it as a member.
fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
}
