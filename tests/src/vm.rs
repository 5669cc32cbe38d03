//! VM test harness: a per-test run directory, TCG-sized configuration on the backend under
//! test ([`crate::backend`]), a machine-wide bound on concurrent VMs, the busybox rootfs
//! fixture, a container runner and leak checks.
//!
//! Under TCG every booting VM keeps a host core busy, so tests take one of [`VM_SLOTS`]
//! slots (a `flock`ed file: works across nextest's test processes and cargo's test threads)
//! before booting.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use shoji::{
    config::Config,
    sandbox::{ContainerRequest, Mount, Sandbox, SandboxConfig, SandboxError},
};
use shoji_agent_api::stream::{self, StreamKind};
use slog::{o, Drain, Logger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::leaks::{Scope, Snapshot};

/// VMs that may boot at once on this machine (2 cores).
pub const VM_SLOTS: usize = 2;
/// How long teardown may take to show (processes exit asynchronously).
pub const LEAK_WAIT: Duration = Duration::from_secs(10);

/// Holds one VM slot until dropped.
pub struct VmSlot(#[allow(dead_code)] File);

/// Takes a VM slot, waiting for one to free up.
pub async fn vm_slot() -> VmSlot {
    let dir = std::env::temp_dir();
    loop {
        for i in 0..VM_SLOTS {
            let f = File::create(dir.join(format!("shoji-test-vm-slot-{i}"))).expect("slot file");
            // SAFETY: flock(2) on a file we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return VmSlot(f);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One test's world: its own run directory (so leak checks see only its VMs), the runtime
/// configuration pointing there, a logger, a VM slot and a leak snapshot taken at creation.
pub struct TestEnv {
    pub name: String,
    pub run_dir: PathBuf,
    pub config: Config,
    pub log: Logger,
    before: Snapshot,
    _slot: VmSlot,
}

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        // First: on a host where the backend under test cannot run, this says why.
        let hypervisor = crate::backend::choice();
        let slot = vm_slot().await;
        let run_dir = PathBuf::from(format!("/run/shoji-test/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).expect("create the test run dir");
        let mut config = Config::load().expect("shoji configuration");
        config.hypervisor = hypervisor;
        config.run_dir = run_dir.clone();
        // Torn-down sandboxes keep no logs in the node's log_dir (tests that check it set one).
        config.log_retention = 0;
        // TCG under load: generous but bounded.
        config.timeouts.agent_ready = Duration::from_secs(60);
        config.timeouts.agent_call = Duration::from_secs(30);
        let before = Snapshot::take(&scope(&run_dir));
        TestEnv {
            name: name.into(),
            run_dir,
            config,
            log: test_logger(name),
            before,
            _slot: slot,
        }
    }

    pub fn sandbox_config(&self, id: &str) -> SandboxConfig {
        SandboxConfig::new(id, self.config.clone())
    }

    /// Boots a sandbox with the default configuration.
    pub async fn start(&self, id: &str) -> Sandbox {
        Sandbox::start(self.sandbox_config(id), self.log.clone())
            .await
            .expect("sandbox start")
    }

    /// Asserts that nothing of this test's VMs is left: no process whose command line names
    /// the run dir, no mount below it, no entry in it. Then removes the run dir.
    pub async fn assert_no_leak(&self) {
        let scope = scope(&self.run_dir);
        if let Err(leaks) = self.before.assert_clean(&scope, LEAK_WAIT).await {
            panic!("{}: {leaks}", self.name);
        }
        std::fs::remove_dir(&self.run_dir).expect("run dir empty and removable");
    }
}

fn scope(run_dir: &Path) -> Scope {
    Scope {
        cmdline_markers: vec![run_dir.display().to_string()],
        mount_dirs: vec![run_dir.to_path_buf()],
        run_dirs: vec![run_dir.to_path_buf()],
        // These VMs have no network: host-wide devices are other tests' business.
        link_prefixes: Vec::new(),
        netns_prefixes: Vec::new(),
    }
}

/// JSON logs to stderr (captured by the test runner, shown on failure).
pub fn test_logger(name: &str) -> Logger {
    let drain = slog_json::Json::default(std::io::stderr()).fuse();
    Logger::root(
        std::sync::Mutex::new(drain).fuse(),
        o!("test" => name.to_string()),
    )
}

/// The busybox rootfs fixture (built once, cached; mounted read-only with a guest overlay).
pub fn busybox_rootfs() -> PathBuf {
    shoji::cli::rootfs::default_rootfs().expect("busybox rootfs (needs busybox-static)")
}

/// An initramfs whose /init is busybox sleeping forever: a guest that boots but never
/// announces an agent. Built once into the system temp dir.
pub fn silent_initrd() -> PathBuf {
    busybox_initrd(
        "silent",
        "/bin/busybox echo 'not an agent'\nexec /bin/busybox sleep 100000",
    )
}

/// An initramfs whose /init writes to the console as fast as it can and never announces an
/// agent: a guest flooding its console.
pub fn flood_initrd() -> PathBuf {
    busybox_initrd(
        "flood",
        "exec /bin/busybox yes 'flood flood flood flood flood flood flood flood flood flood'",
    )
}

/// An initramfs with busybox and `/init` running `script` (busybox sh). Built once per name.
fn busybox_initrd(name: &str, script: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("shoji-test-{name}-initrd.img"));
    if out.exists() {
        return out;
    }
    let dir = std::env::temp_dir().join(format!("shoji-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(shoji::cli::rootfs::BUSYBOX, dir.join("bin/busybox")).unwrap();
    std::fs::write(dir.join("init"), format!("#!/bin/busybox sh\n{script}\n")).unwrap();
    std::process::Command::new("chmod")
        .args(["755"])
        .arg(dir.join("init"))
        .status()
        .unwrap();
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet | gzip > {}",
            dir.display(),
            tmp.display()
        ))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "building the {name} initramfs (needs cpio and gzip)"
    );
    std::fs::rename(&tmp, &out).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    out
}

/// What a container process produced.
#[derive(Debug, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: i32,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Creates the container `container_id` running `args` on the busybox rootfs (not started).
pub async fn create_container(
    sandbox: &Sandbox,
    container_id: &str,
    args: &[&str],
    tty: bool,
) -> Result<(), SandboxError> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    sandbox
        .create_container(ContainerRequest {
            id: container_id.into(),
            rootfs: vec![Mount::host_dir(&busybox_rootfs(), true)],
            spec: shoji::cli::run_spec::container_spec(&args, tty, container_id),
            stdin: true,
            guest_overlay: true,
        })
        .await
}

/// Attaches stdio to a created process, feeds `stdin` (then EOF), starts it, and collects
/// its output and exit status.
pub async fn run_process(
    sandbox: &Sandbox,
    container_id: &str,
    exec_id: &str,
    stdin: &[u8],
    tty: bool,
) -> Output {
    async fn read_all<R: tokio::io::AsyncRead + Unpin>(mut s: R) -> Vec<u8> {
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v).await;
        v
    }
    let kinds: &[StreamKind] = if tty {
        &[StreamKind::Tty]
    } else {
        &[StreamKind::Stdout, StreamKind::Stderr, StreamKind::Stdin]
    };
    let (mut out, mut err, mut inp) = (None, None, None);
    for (kind, conn) in sandbox
        .attach_stdio(container_id, exec_id, kinds)
        .await
        .expect("attach stdio")
    {
        match kind {
            StreamKind::Tty => {
                let (r, w) = conn.into_split();
                out = Some(tokio::spawn(read_all(r)));
                inp = Some(Box::new(w) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>);
            }
            StreamKind::Stdout => out = Some(tokio::spawn(read_all(conn))),
            StreamKind::Stderr => err = Some(tokio::spawn(read_all(conn))),
            StreamKind::Stdin => inp = Some(Box::new(conn)),
        }
    }
    let (out, inp) = (
        out.expect("an output stream"),
        inp.expect("an input stream"),
    );
    let input = stdin.to_vec();
    let feeder = tokio::spawn(async move {
        let mut w = inp;
        if !input.is_empty() {
            stream::write_frame(&mut w, &input)
                .await
                .expect("stdin frame");
        }
        stream::write_frame(&mut w, b"").await.expect("stdin EOF");
        w.flush().await.unwrap();
        // Keep the connection open until the process is done.
        std::future::pending::<()>().await;
    });
    sandbox
        .start_process(container_id, exec_id)
        .await
        .expect("start process");
    let exit = sandbox
        .wait_process(container_id, exec_id)
        .await
        .expect("wait process");
    let stdout = tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .expect("stdout drained")
        .unwrap();
    let stderr = match err {
        Some(e) => tokio::time::timeout(Duration::from_secs(10), e)
            .await
            .expect("stderr drained")
            .unwrap(),
        None => Vec::new(),
    };
    feeder.abort();
    Output {
        stdout,
        stderr,
        status: exit.exit_status,
    }
}

/// Creates, runs and removes one container in `sandbox`.
pub async fn run_container(
    sandbox: &Sandbox,
    container_id: &str,
    args: &[&str],
    stdin: &[u8],
    tty: bool,
) -> Output {
    create_container(sandbox, container_id, args, tty)
        .await
        .expect("create container");
    let out = run_process(sandbox, container_id, "", stdin, tty).await;
    remove_container(sandbox, container_id).await;
    out
}

/// Removes a container in the guest, then its mounts on the host.
pub async fn remove_container(sandbox: &Sandbox, container_id: &str) {
    sandbox
        .remove_container(container_id)
        .await
        .expect("remove container");
}
