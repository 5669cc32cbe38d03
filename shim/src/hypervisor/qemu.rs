//! QEMU driver: `-M microvm`, virtio-mmio devices, vhost-user back-ends.
//!
//! Per VM: `vhost-device-vsock` (the hybrid-vsock back-end; launched first), virtiofsd
//! (when the spec has a share), then QEMU with guest RAM in a shared memfd (vhost-user
//! needs it), a QMP socket for status and shutdown, and the serial console in a file.
//! Accelerator: KVM when [`crate::kvm::probe`] shows it runs an ordinary guest, else TCG with
//! a bounded translation cache. Nets: a tap opened inside the pod's network namespace and
//! handed to QEMU as an inherited fd.
use std::{
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use async_trait::async_trait;
use serde_json::{json, Value};
use slog::{info, warn, Logger};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::{
    tap, Accel, Capabilities, Hypervisor, HypervisorError, HypervisorKind, Result, VmExit, VmSpec,
};
use crate::{
    config::{AccelChoice, Config},
    process::Daemon,
    sharefs::{last_line, Virtiofsd},
};

/// Bound on one QMP exchange.
const QMP_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Qemu {
    log: Logger,
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    tb_size_mib: u32,
    start_timeout: Duration,
    accel: Accel,
    /// Why `accel` was chosen (logged at start).
    accel_reason: String,
    spec: Option<VmSpec>,
    vsock: Option<Daemon>,
    virtiofsd: Option<Virtiofsd>,
    /// Tap fds, inherited by QEMU; closed here once QEMU has them.
    taps: Vec<OwnedFd>,
    vmm: Option<Daemon>,
    stopped: bool,
}

impl Qemu {
    pub fn new(config: &Config, log: Logger) -> Qemu {
        let (accel, accel_reason) = match config.qemu.accel {
            AccelChoice::Kvm => (Accel::Kvm, "configured (qemu.accel = \"kvm\")".to_string()),
            AccelChoice::Tcg => (Accel::Tcg, "configured (qemu.accel = \"tcg\")".to_string()),
            AccelChoice::Auto => {
                let probe = crate::kvm::probe();
                (
                    if probe.usable { Accel::Kvm } else { Accel::Tcg },
                    probe.reason.clone(),
                )
            }
        };
        Qemu {
            accel_reason,
            log,
            qemu: config.qemu.path.clone(),
            vhost_vsock: config.vhost_device_vsock.path.clone(),
            tb_size_mib: config.qemu.tcg_tb_size_mib,
            start_timeout: config.timeouts.vm_start,
            accel,
            spec: None,
            vsock: None,
            virtiofsd: None,
            taps: Vec::new(),
            vmm: None,
            stopped: false,
        }
    }

    fn spec(&self) -> &VmSpec {
        self.spec.as_ref().expect("prepare() comes first")
    }

    fn qmp_socket(&self) -> PathBuf {
        self.spec().dir.join("qemu.qmp")
    }

    fn vhost_vsock_socket(&self) -> PathBuf {
        self.spec().dir.join("vhost-vsock.sock")
    }

    fn vmm_log(&self) -> PathBuf {
        self.spec().dir.join("qemu.log")
    }

    /// The QEMU command line for the prepared spec.
    fn command(&self) -> Command {
        let spec = self.spec();
        let mut cmd = Command::new(&self.qemu);
        cmd.arg("-name").arg(format!("shoji-{}", spec.id));
        match self.accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => cmd.args(["-accel", &format!("tcg,tb-size={}", self.tb_size_mib)]),
        };
        cmd.args(["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on"])
            .args([
                "-smp",
                &spec.vcpus.to_string(),
                "-m",
                &format!("{}M", spec.memory_mib),
            ])
            .args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    spec.memory_mib
                ),
            ])
            .args(["-machine", "memory-backend=mem"])
            .args([
                "-display",
                "none",
                "-no-reboot",
                "-nodefaults",
                "-no-user-config",
            ])
            .arg("-serial")
            .arg(format!("file:{}", spec.console_log.display()))
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args(["-append", &self.cmdline()])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.qmp_socket().display()
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=vsock,path={}",
                self.vhost_vsock_socket().display()
            ))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            .args([
                "-object",
                "rng-random,id=rng,filename=/dev/urandom",
                "-device",
                "virtio-rng-device,rng=rng",
            ]);
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

    /// The guest kernel command line (REFERENCE §1): serial console, power-off instead of
    /// reboot, and a TSC taken from the host so a busy host cannot stall calibration.
    fn cmdline(&self) -> String {
        let mut args = vec!["console=ttyS0", "panic=-1", "reboot=t", "quiet"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        if let Some(khz) = host_tsc_khz() {
            args.push(format!("tsc_early_khz={khz}"));
        }
        args.extend(["tsc=reliable", "no_timer_check"].map(String::from));
        args.extend(self.spec().kernel_args.iter().cloned());
        args.join(" ")
    }

    /// Launches vhost-device-vsock; [`Self::vsock_backend_ready`] waits for its socket, so
    /// virtiofsd can start in between.
    fn spawn_vsock_backend(&mut self) -> Result<()> {
        let spec = self.spec();
        let socket = self.vhost_vsock_socket();
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&spec.vsock.socket);
        let mut cmd = Command::new(&self.vhost_vsock);
        cmd.arg("--vm").arg(format!(
            "guest-cid={},socket={},uds-path={}",
            spec.vsock.cid,
            socket.display(),
            spec.vsock.socket.display()
        ));
        let log = spec.dir.join("vhost-device-vsock.log");
        let daemon = Daemon::spawn("vhost-device-vsock", cmd, &log).map_err(|source| {
            HypervisorError::Spawn {
                what: "vhost-device-vsock",
                source,
            }
        })?;
        self.vsock = Some(daemon);
        Ok(())
    }

    async fn vsock_backend_ready(&self) -> Result<()> {
        let daemon = self.vsock.as_ref().expect("vhost-device-vsock launched");
        let log = self.spec().dir.join("vhost-device-vsock.log");
        wait_for_socket(daemon, &self.vhost_vsock_socket(), &log, self.start_timeout).await
    }

    async fn teardown(&mut self, grace: Duration) {
        if let Some(vmm) = &self.vmm {
            if vmm.exited().is_none() {
                if let Err(e) = qmp(&self.qmp_socket(), "quit").await {
                    info!(self.log, "QMP quit failed, signalling QEMU"; "error" => %e);
                }
                if tokio::time::timeout(grace, vmm.wait()).await.is_err() {
                    warn!(self.log, "QEMU did not exit in time, killing it"; "grace_ms" => grace.as_millis() as u64);
                    vmm.kill().await;
                }
            }
        }
        // virtiofsd and vhost-device-vsock normally exit when QEMU disconnects.
        if let Some(fs) = self.virtiofsd.take() {
            fs.stop(Duration::from_secs(1)).await;
        }
        if let Some(vsock) = self.vsock.take() {
            vsock.stop(Duration::from_secs(1)).await;
        }
        self.taps.clear();
        if let Some(spec) = &self.spec {
            let mut sockets = vec![
                self.qmp_socket(),
                self.vhost_vsock_socket(),
                spec.vsock.socket.clone(),
            ];
            sockets.extend(spec.share.as_ref().map(|s| s.socket.clone()));
            for s in sockets {
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
            accel: self.accel,
            cpu_hotplug: false,
            memory_hotplug: false,
            fs_sharing: true,
        }
    }

    async fn prepare(&mut self, spec: &VmSpec) -> Result<()> {
        for (what, path) in [
            ("guest kernel", &spec.kernel),
            ("guest initramfs", &spec.initrd),
        ] {
            if !path.is_file() {
                return Err(HypervisorError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        for (what, path) in [
            ("QEMU", &self.qemu),
            ("vhost-device-vsock", &self.vhost_vsock),
        ] {
            if !path.is_file() {
                return Err(HypervisorError::Missing {
                    what,
                    path: path.clone(),
                });
            }
        }
        self.spec = Some(spec.clone());
        info!(self.log, "QEMU accelerator chosen"; "accel" => ?self.accel, "why" => &self.accel_reason);
        let prepared = async {
            self.taps = tap::open_taps(&spec.nets).await?;
            // Both back-ends start concurrently: virtiofsd while vhost-device-vsock comes up.
            self.spawn_vsock_backend()?;
            if let Some(share) = &spec.share {
                let log = spec.dir.join("virtiofsd.log");
                self.virtiofsd = Some(Virtiofsd::start(share, &log, self.start_timeout).await?);
            }
            self.vsock_backend_ready().await
        }
        .await;
        if prepared.is_err() {
            self.teardown(Duration::ZERO).await;
        }
        prepared
    }

    async fn start(&mut self) -> Result<()> {
        let log = self.vmm_log();
        let qmp_socket = self.qmp_socket();
        let _ = std::fs::remove_file(&qmp_socket);
        let cmd = self.command();
        info!(self.log, "launching QEMU"; "args" => format!("{:?}", cmd.get_args().collect::<Vec<_>>()));
        let vmm = Daemon::spawn("qemu", cmd, &log).map_err(|source| HypervisorError::Spawn {
            what: "QEMU",
            source,
        });
        // QEMU holds its own copies of the tap fds now.
        self.taps.clear();
        let vmm = match vmm {
            Ok(v) => self.vmm.insert(v),
            Err(e) => {
                self.teardown(Duration::ZERO).await;
                return Err(e);
            }
        };
        let running = async {
            wait_for_socket(vmm, &qmp_socket, &log, self.start_timeout).await?;
            let status = qmp(&qmp_socket, "query-status").await?;
            match status.get("status").and_then(Value::as_str) {
                Some("running") => Ok(()),
                other => Err(HypervisorError::Died {
                    what: "QEMU",
                    status: None,
                    detail: format!("VM status {other:?} after start"),
                }),
            }
        };
        let started = match tokio::time::timeout(self.start_timeout, running).await {
            Ok(r) => r,
            Err(_) => Err(HypervisorError::Timeout {
                what: "QEMU".into(),
                timeout: self.start_timeout,
                detail: Some(last_line(&log)),
            }),
        };
        if started.is_err() {
            self.teardown(Duration::ZERO).await;
        }
        started
    }

    async fn wait_exit(&self) -> VmExit {
        let Some(vmm) = &self.vmm else {
            return VmExit {
                status: None,
                reason: "QEMU was never started".into(),
            };
        };
        let status = vmm.wait().await;
        let reason = if self.stopped {
            "stopped".into()
        } else if status == Some(0) {
            "the guest powered off".into()
        } else {
            last_line(&self.vmm_log())
        };
        VmExit { status, reason }
    }

    async fn stop(&mut self, grace: Duration) -> Result<()> {
        if self.spec.is_none() {
            return Ok(());
        }
        self.stopped = true;
        self.teardown(grace).await;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.vmm
            .as_ref()
            .filter(|d| d.exited().is_none())
            .map(Daemon::pid)
    }

    fn pids(&self) -> Vec<u32> {
        let daemons = [
            self.vmm.as_ref(),
            self.vsock.as_ref(),
            self.virtiofsd.as_ref().map(Virtiofsd::daemon),
        ];
        daemons
            .into_iter()
            .flatten()
            .filter(|d| d.exited().is_none())
            .map(Daemon::pid)
            .collect()
    }

    async fn resize(&mut self, _vcpus: Option<u32>, _memory_mib: Option<u64>) -> Result<()> {
        Err(HypervisorError::Unsupported(
            "CPU and memory hot-plug with QEMU microvm",
        ))
    }
}

/// Waits until `daemon` listens on `socket`, or fails with its last log line if it exits.
async fn wait_for_socket(
    daemon: &Daemon,
    socket: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let ready = async {
        loop {
            if let Some(status) = daemon.exited() {
                return Err(HypervisorError::Died {
                    what: daemon.name(),
                    status,
                    detail: last_line(log),
                });
            }
            if UnixStream::connect(socket).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    match tokio::time::timeout(timeout, ready).await {
        Ok(r) => r,
        Err(_) => Err(HypervisorError::Timeout {
            what: format!("{} socket {}", daemon.name(), socket.display()),
            timeout,
            detail: Some(last_line(log)),
        }),
    }
}

/// One QMP command on a fresh connection (greeting, capabilities, command); returns the
/// `return` value.
async fn qmp(socket: &Path, command: &str) -> Result<Value> {
    let io_err = |context: String| move |source| HypervisorError::Io { context, source };
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(io_err(format!("connect {}", socket.display())))?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        lines
            .next_line()
            .await
            .map_err(io_err("QMP greeting".into()))?;
        let mut result = Value::Null;
        for cmd in ["qmp_capabilities", command] {
            w.write_all(format!("{}\n", json!({ "execute": cmd })).as_bytes())
                .await
                .map_err(io_err(format!("QMP {cmd}")))?;
            result = loop {
                let line = lines
                    .next_line()
                    .await
                    .map_err(io_err(format!("QMP {cmd}")))?;
                // `quit` may close the connection before answering.
                let Some(line) = line else { break Value::Null };
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if let Some(ret) = v.get("return") {
                    break ret.clone();
                }
                if let Some(err) = v.get("error") {
                    return Err(HypervisorError::Api {
                        call: format!("QMP {cmd}"),
                        status: 0,
                        body: err.to_string(),
                    });
                }
                // Anything else is an asynchronous event: skip it.
            };
        }
        Ok(result)
    };
    tokio::time::timeout(QMP_TIMEOUT, exchange)
        .await
        .map_err(|_| HypervisorError::Timeout {
            what: format!("QMP {command}"),
            timeout: QMP_TIMEOUT,
            detail: None,
        })?
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
