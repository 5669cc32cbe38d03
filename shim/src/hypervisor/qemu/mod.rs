//! QEMU driver: `-M microvm`, virtio-mmio devices, vhost-user back-ends.
//!
//! Per VM: `vhost-device-vsock` (the hybrid-vsock back-end, launched in `prepare`), then
//! QEMU with guest RAM in a shared memfd (vhost-user needs it), a QMP socket for status
//! and shutdown, and the serial console in a file. Either process exiting ends the VM.
//! Nets: a tap opened inside the pod's network namespace and handed to QEMU as an
//! inherited fd.
mod boot_images;
mod qmp;

use std::{
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use serde_json::Value;
use slog::{debug, info, warn, Logger};
use tokio::sync::watch;

use super::{
    describe_status, vmm_dir, Accel, Capabilities, Hypervisor, HypervisorError, HypervisorKind,
    Result, VmEnd, VmExit, VmSpec,
};
use crate::{
    daemon::{Daemon, PidLedger},
    jail,
    logtail::last_line,
};

/// How the driver runs QEMU.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub binary: PathBuf,
    pub vhost_vsock: PathBuf,
    pub accel: Accel,
    /// Why `accel` was chosen (logged at every VM start).
    pub accel_reason: String,
    /// TCG translation cache size (bounds QEMU's RSS under emulation).
    pub tcg_tb_size_mib: u32,
    /// Launch until the QMP socket answers; also the vsock back-end until its socket.
    pub start_timeout: Duration,
}

pub struct Qemu {
    opts: QemuOptions,
    ledger: Arc<dyn PidLedger>,
    log: Logger,
    spec: Option<VmSpec>,
    vsock: Option<Daemon>,
    /// Tap fds, inherited by QEMU; closed here once QEMU has them.
    taps: Vec<OwnedFd>,
    vmm: Option<Daemon>,
    end: VmEnd,
}

impl Qemu {
    pub fn new(opts: QemuOptions, ledger: Arc<dyn PidLedger>, log: &Logger) -> Qemu {
        Qemu {
            opts,
            ledger,
            log: log.new(slog::o!("hypervisor" => "qemu")),
            spec: None,
            vsock: None,
            taps: Vec::new(),
            vmm: None,
            end: VmEnd::new(),
        }
    }

    fn spec(&self) -> &VmSpec {
        self.spec.as_ref().expect("prepare() comes first")
    }

    /// A file of the shim's in the sandbox directory (QEMU's output).
    fn path(&self, name: &str) -> PathBuf {
        self.spec().dir.join(name)
    }

    /// A socket QEMU or the vsock back-end creates (the VMM directory).
    fn socket(&self, name: &str) -> PathBuf {
        vmm_dir(&self.spec().dir).join(name)
    }

    /// The QEMU command line for the prepared spec.
    fn command(&self) -> Command {
        let spec = self.spec();
        let mut cmd = Command::new(&self.opts.binary);
        cmd.arg("-name").arg(format!("shoji-{}", spec.id));
        match self.opts.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args([
                "-accel",
                &format!("tcg,tb-size={}", self.opts.tcg_tb_size_mib),
            ]),
        };
        let memory = format!("{}M", spec.memory_mib);
        // QEMU's seccomp filter: no obsolete system calls, no set*id, no spawning, no
        // scheduler or resource changes.
        cmd.args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        cmd.args(["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on"])
            .args(["-smp", &spec.vcpus.to_string(), "-m", &memory])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
            ])
            .args(["-machine", "memory-backend=mem"])
            .args([
                "-display",
                "none",
                "-no-reboot",
                "-nodefaults",
                "-no-user-config",
            ])
            // Appending, so that the sandbox can start the file over when it is full.
            .arg("-chardev")
            .arg(format!(
                "file,id=console,path={},append=on",
                spec.console_log.display()
            ))
            .args(["-serial", "chardev:console"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args(["-append", &self.cmdline()])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.socket("qemu.qmp").display()
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=vsock,path={}",
                self.socket("vhost-vsock.sock").display()
            ))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            .args([
                "-object",
                "rng-random,id=rng,filename=/dev/urandom",
                "-device",
                "virtio-rng-device,rng=rng",
            ]);
        if spec.free_page_reporting {
            // A balloon that never inflates: only its free page reporting queue is used.
            cmd.args(["-device", "virtio-balloon-device,free-page-reporting=on"]);
        }
        if let Some(share) = &spec.share {
            cmd.arg("-chardev")
                .arg(format!("socket,id=fs,path={}", share.socket.display()))
                .args([
                    "-device",
                    &format!("vhost-user-fs-device,chardev=fs,tag={}", share.tag),
                ]);
        }
        for (i, (net, tap)) in spec.nets.iter().zip(&self.taps).enumerate() {
            cmd.args([
                "-netdev",
                &format!("tap,id=net{i},fd={},vhost=off", tap.as_raw_fd()),
            ])
            .args([
                "-device",
                &format!(
                    "virtio-net-device,netdev=net{i},mac={},host_mtu={}",
                    net.mac, net.mtu
                ),
            ]);
        }
        let inherited: Vec<RawFd> = self.taps.iter().map(|t| t.as_raw_fd()).collect();
        if !inherited.is_empty() {
            use std::os::unix::process::CommandExt;
            // SAFETY: fcntl(2) only, which is async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &inherited {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// The guest kernel command line: serial console, power-off instead of reboot, and a
    /// TSC taken from the host so a busy host cannot stall calibration under TCG.
    fn cmdline(&self) -> String {
        let mut args: Vec<String> = ["console=ttyS0", "panic=-1", "reboot=t", "quiet"]
            .map(String::from)
            .into();
        if let Some(khz) = host_tsc_khz() {
            args.push(format!("tsc_early_khz={khz}"));
        }
        // QEMU's local APIC timer counts at 1 GHz (TCG's and KVM's alike): the guest kernel
        // (guest-kernel/patches) then skips its 100 ms calibration of it. noreplace-smp: a
        // 1-vCPU kernel would otherwise rewrite each of its lock prefixes at boot through
        // text_poke, whose address-space switches TCG pays for with a full TLB flush.
        args.extend(
            [
                "tsc=reliable",
                "no_timer_check",
                "lapic_bus_hz=1000000000",
                "noreplace-smp",
            ]
            .map(String::from),
        );
        args.extend(self.spec().kernel_args.iter().cloned());
        args.join(" ")
    }

    /// Launches vhost-device-vsock and waits for its vhost-user socket.
    async fn start_vsock_backend(&mut self) -> Result<()> {
        let spec = self.spec();
        let socket = self.socket("vhost-vsock.sock");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&spec.vsock.socket);
        let mut cmd = Command::new(&self.opts.vhost_vsock);
        cmd.arg("--vm").arg(format!(
            "guest-cid={},socket={},uds-path={}",
            spec.vsock.cid,
            socket.display(),
            spec.vsock.socket.display()
        ));
        if let Some(jail) = spec.jail(&self.opts.vhost_vsock) {
            jail.seccomp(jail::seccomp::vsock_backend()?)
                .apply(&mut cmd)?;
        }
        let log = self.path("vhost-device-vsock.log");
        let daemon = Daemon::spawn("vhost-device-vsock", cmd, &log, self.ledger.as_ref())?;
        let daemon = self.vsock.insert(daemon);
        let pid = daemon.pid();
        daemon
            .wait_ready("vhost-user socket", self.opts.start_timeout, || {
                crate::procfs::unix_listening(pid, &socket)
            })
            .await?;
        self.end.watch_backend(daemon.exit_watch(), move |status| {
            format!(
                "vhost-device-vsock exited ({}): {}",
                describe_status(status),
                last_line(&log)
            )
        });
        Ok(())
    }

    async fn launch(&mut self) -> Result<()> {
        let log = self.path("qemu.log");
        let qmp_socket = self.socket("qemu.qmp");
        let _ = std::fs::remove_file(&qmp_socket);
        let mut cmd = self.command();
        let kvm = self.opts.accel == Accel::Kvm;
        if let Some(jail) = self.spec().vmm_jail(&self.opts.binary, kvm)? {
            jail.apply(&mut cmd)?;
        }
        info!(self.log, "launching QEMU"; "accel" => ?self.opts.accel, "why" => &self.opts.accel_reason,
            "args" => format!("{:?}", cmd.get_args().collect::<Vec<_>>()));
        let vmm = Daemon::spawn("qemu", cmd, &log, self.ledger.as_ref());
        // QEMU holds its own copies of the tap fds now.
        self.taps.clear();
        let vmm = self.vmm.insert(vmm?);
        let reason_log = log.clone();
        self.end
            .watch_vmm(vmm.exit_watch(), move |status| match status {
                Some(0) => "the guest powered off".into(),
                _ => format!(
                    "QEMU exited ({}): {}",
                    describe_status(status),
                    last_line(&reason_log)
                ),
            });
        // Not probed by connecting: the QMP server takes one client at a time, and a probe's
        // hang-up can reset the next connection.
        let socket = qmp_socket.clone();
        vmm.wait_ready("QMP socket", self.opts.start_timeout, move || {
            socket.exists()
        })
        .await?;
        let status = loop {
            match qmp::command(&qmp_socket, "query-status").await {
                // Bound but not yet listening.
                Err(HypervisorError::Io { .. }) if vmm.exited().is_none() => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                // QEMU's own end says more than the refused connection.
                Err(e) => return Err(vmm.died().map_or(e, HypervisorError::from)),
                Ok(status) => break status,
            }
        };
        match status.get("status").and_then(Value::as_str) {
            Some("running") => Ok(()),
            other => Err(HypervisorError::Api {
                call: "QMP query-status".into(),
                status: 0,
                body: format!("VM status {other:?} after start, expected running"),
            }),
        }
    }

    async fn teardown(&mut self, grace: Duration) {
        if let Some(vmm) = &self.vmm {
            if vmm.exited().is_none() {
                if let Err(e) = qmp::command(&self.socket("qemu.qmp"), "quit").await {
                    info!(self.log, "QMP quit failed, signalling QEMU"; "error" => %e);
                }
                if tokio::time::timeout(grace, vmm.wait()).await.is_err() {
                    warn!(self.log, "QEMU did not exit in time, killing it"; "grace_ms" => grace.as_millis() as u64);
                    vmm.kill().await;
                }
            }
        }
        // vhost-device-vsock normally exits when QEMU disconnects.
        if let Some(vsock) = self.vsock.take() {
            vsock.stop(Duration::from_secs(1)).await;
        }
        self.taps.clear();
        if let Some(spec) = &self.spec {
            for s in [
                self.socket("qemu.qmp"),
                self.socket("vhost-vsock.sock"),
                spec.vsock.socket.clone(),
            ] {
                let _ = std::fs::remove_file(s);
            }
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            accel: self.opts.accel,
            cpu_hotplug: false,
            memory_hotplug_block_mib: None,
        }
    }

    fn guest_ready(&self) {
        let (Some(pid), Some(spec)) = (self.pid(), &self.spec) else {
            return;
        };
        let files: Vec<PathBuf> = [&spec.kernel, &spec.initrd]
            .into_iter()
            .filter_map(|f| std::fs::canonicalize(f).ok())
            .collect();
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || match boot_images::page_out(pid, &files) {
            Ok(bytes) => debug!(log, "boot images paged out of QEMU"; "kib" => bytes >> 10),
            Err(e) => info!(log, "boot images stay resident in QEMU"; "error" => %e),
        });
    }

    async fn prepare(&mut self, spec: &VmSpec) -> Result<()> {
        if self.spec.is_some() {
            return Err(HypervisorError::Invalid {
                call: "prepare",
                why: "this driver already ran a VM".into(),
            });
        }
        for (what, path) in [
            ("guest kernel", &spec.kernel),
            ("guest initramfs", &spec.initrd),
            ("QEMU", &self.opts.binary),
            ("vhost-device-vsock", &self.opts.vhost_vsock),
        ] {
            if !path.is_file() {
                return Err(HypervisorError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        self.spec = Some(spec.clone());
        let prepared = async {
            self.taps = crate::network::open_taps(&spec.nets).await?;
            self.start_vsock_backend().await
        }
        .await;
        if prepared.is_err() {
            self.teardown(Duration::ZERO).await;
        }
        prepared
    }

    async fn start(&mut self) -> Result<()> {
        let started = tokio::time::timeout(self.opts.start_timeout, self.launch()).await;
        let started = started.unwrap_or_else(|_| {
            Err(HypervisorError::Timeout {
                what: "QEMU start".into(),
                timeout: self.opts.start_timeout,
                detail: Some(last_line(&self.path("qemu.log"))),
            })
        });
        if started.is_err() {
            self.end.plan("start failed");
            self.teardown(Duration::ZERO).await;
        }
        started
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.end.subscribe()
    }

    async fn stop(&mut self, grace: Duration) -> Result<()> {
        self.end.plan("stopped");
        if self.spec.is_some() {
            self.teardown(grace).await;
        }
        self.end.settle("stopped").await;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.vmm
            .as_ref()
            .filter(|d| d.exited().is_none())
            .map(Daemon::pid)
    }

    async fn resize(&mut self, _vcpus: Option<u32>, _memory_mib: Option<u64>) -> Result<()> {
        Err(HypervisorError::Unsupported(
            "CPU and memory hot-plug with QEMU microvm",
        ))
    }
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo (under TCG the guest TSC is the host's).
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_frequency_is_read_from_cpuinfo() {
        let khz = host_tsc_khz().expect("cpu MHz in /proc/cpuinfo");
        assert!(khz > 100_000, "{khz} kHz");
    }
}
