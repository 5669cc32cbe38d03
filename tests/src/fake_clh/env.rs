//! One driver test's world against the fake Cloud Hypervisor: a temp dir holding the sandbox
//! dir, the shared dir, a stand-in kernel and initramfs (the fake only opens them), the
//! fake's wrapper script, a real virtiofsd serving the shared dir (the sandbox's job outside
//! these tests), and optionally real taps in a network namespace of the test's own. Used by
//! tests/clh_driver.rs and tests/clh_faults.rs.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use shoji::{
    config::{Config, HypervisorChoice},
    daemon::NoLedger,
    hypervisor::{
        clh::{Clh, ClhOptions},
        vmm_dir, ShareDevice, VmSpec, VsockDevice,
    },
    jail::Identity,
    network::NetDevice,
    sharefs::{MountNamespace, Virtiofsd, VirtiofsdOptions},
};

use super::{FakeClh, Record};

/// One test's world: a temp dir holding the sandbox dir, the shared dir, a stand-in kernel
/// and initramfs (the fake only opens them), the fake's wrapper script, and a real
/// virtiofsd serving the shared dir (the sandbox's job outside these tests).
pub struct DriverEnv {
    pub dir: tempfile::TempDir,
    pub fake: FakeClh,
    pub jail: Option<Identity>,
    pub netns: Option<Netns>,
    virtiofsd: std::sync::Mutex<Option<Virtiofsd>>,
}

impl DriverEnv {
    /// `fake`: the `fake-cloud-hypervisor` binary; `fake_flags`: its `--fake-*` flags.
    pub async fn new(fake: &Path, fake_flags: &[&str]) -> DriverEnv {
        DriverEnv::make(fake, fake_flags, None).await
    }

    /// A world whose VMM runs jailed as `identity` (the fake, without flags, records into the
    /// VMM directory, the one place it may write).
    pub async fn jailed(fake: &Path, identity: Identity) -> DriverEnv {
        DriverEnv::make(fake, &[], Some(identity)).await
    }

    async fn make(fake: &Path, fake_flags: &[&str], jail: Option<Identity>) -> DriverEnv {
        let dir = tempfile::Builder::new()
            .prefix("shoji-clh-")
            .tempdir()
            .unwrap();
        for d in ["sandbox", "sandbox/vmm", "shared"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        for f in ["vmlinux", "initramfs.img"] {
            std::fs::write(dir.path().join(f), b"stand-in").unwrap();
        }
        let fake = match jail {
            Some(_) => {
                let record = vmm_dir(&dir.path().join("sandbox")).join(super::JAILED_RECORD);
                FakeClh::install_jailed(fake, dir.path(), &record).unwrap()
            }
            None => FakeClh::install(fake, dir.path(), fake_flags).unwrap(),
        };
        let virtiofsd = Virtiofsd::spawn(
            &VirtiofsdOptions {
                binary: virtiofsd(),
                cache: "never".into(),
                shared_dir: dir.path().join("shared"),
                socket: dir.path().join("sandbox/virtiofsd.sock"),
                log: dir.path().join("virtiofsd.log"),
            },
            &MountNamespace::create().unwrap(),
            &NoLedger,
        )
        .unwrap();
        virtiofsd.ready(Duration::from_secs(10)).await.unwrap();
        DriverEnv {
            dir,
            fake,
            jail,
            netns: None,
            virtiofsd: std::sync::Mutex::new(Some(virtiofsd)),
        }
    }

    pub async fn stop_virtiofsd(&self) {
        let v = self.virtiofsd.lock().unwrap().take();
        if let Some(v) = v {
            v.stop(Duration::from_secs(1)).await;
        }
    }

    pub fn with_taps(mut self, taps: &[&str]) -> DriverEnv {
        self.netns = Some(Netns::new(taps));
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn spec(&self) -> VmSpec {
        let sb = self.path("sandbox");
        let nets = match &self.netns {
            Some(ns) => ns
                .taps
                .iter()
                .enumerate()
                .map(|(i, tap)| NetDevice {
                    tap: tap.clone(),
                    mac: format!("02:00:00:00:00:0{i}"),
                    mtu: 1400,
                    netns: Some(ns.path.clone()),
                })
                .collect(),
            None => Vec::new(),
        };
        VmSpec {
            id: "clh-test".into(),
            dir: sb.clone(),
            kernel: self.path("vmlinux"),
            initrd: self.path("initramfs.img"),
            kernel_args: vec!["shoji.share=shoji".into()],
            vcpus: 1,
            max_vcpus: 2,
            memory_mib: 256,
            free_page_reporting: true,
            share: Some(ShareDevice {
                tag: "shoji".into(),
                socket: sb.join("virtiofsd.sock"),
                backend: self
                    .virtiofsd
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(|v| v.exit_watch())
                    .unwrap_or_else(|| tokio::sync::watch::channel(None).1),
            }),
            vsock: VsockDevice {
                cid: 3,
                socket: vmm_dir(&sb).join("vsock.sock"),
            },
            nets,
            console_log: sb.join("console.log"),
            jail: self.jail,
        }
    }

    pub fn options(&self) -> ClhOptions {
        ClhOptions {
            api_timeout: Duration::from_secs(2),
            boot_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(10),
            ..ClhOptions::new(self.fake.binary.clone())
        }
    }

    /// A driver for the fake with [`DriverEnv::options`].
    pub fn driver(&self) -> Clh {
        self.driver_with(self.options())
    }

    pub fn driver_with(&self, options: ClhOptions) -> Clh {
        Clh::new(
            options,
            std::sync::Arc::new(NoLedger),
            &slog::Logger::root(slog::Discard, slog::o!()),
        )
    }

    /// Every request so far as `(call, body, fd count, tap names, status)`.
    pub fn requests(&self) -> Vec<Req> {
        self.fake
            .records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Request {
                    call,
                    body,
                    fds,
                    taps,
                    status,
                    ..
                } => Some((call, body, fds, taps, status)),
                _ => None,
            })
            .collect()
    }

    /// Nothing the test started is left: no process mentions the test dir, no socket remains.
    pub async fn assert_nothing_left(&self) {
        self.stop_virtiofsd().await;
        self.assert_no_process_left().await;
        let sb = self.path("sandbox");
        for sock in ["vmm/clh-api.sock", "vmm/vsock.sock"] {
            assert!(!sb.join(sock).exists(), "{sock} left behind");
        }
    }

    /// Within 3 s, no process mentions the test dir (the fake VMM, virtiofsd).
    pub async fn assert_no_process_left(&self) {
        let marker = self.dir.path().to_string_lossy().into_owned();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let left = processes_mentioning(&marker);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes left behind: {left:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A runtime configuration whose sandboxes run on the fake, in `<dir>/run`. The sandbox
    /// runs a virtiofsd of its own: call [`DriverEnv::stop_virtiofsd`] first.
    pub fn sandbox_config(&self) -> Config {
        let mut config = Config {
            hypervisor: HypervisorChoice::Clh,
            kernel: self.path("vmlinux"),
            initrd: self.path("initramfs.img"),
            run_dir: self.path("run"),
            log_retention: 0,
            ..Config::default()
        };
        config.clh.path = self.fake.binary.clone();
        config.virtiofsd.path = virtiofsd();
        // The fake behind its wrapper script needs more than a jail shows (tests/clh_jail.rs
        // checks the jail on its own).
        config.jail.enabled = self.jail.is_some();
        config
    }

    /// The entries left in the sandboxes' run dir.
    pub fn run_dir_entries(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.path("run"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

/// Every request as `(call, body, fd count, tap names, status)`.
pub type Req = (String, String, usize, Vec<String>, Option<u16>);

/// The real virtiofsd (`cargo install virtiofsd`, as hack/setup.sh does).
pub fn virtiofsd() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    let p = home.join(".cargo/bin/virtiofsd");
    assert!(
        p.exists(),
        "these tests need a real virtiofsd at {}",
        p.display()
    );
    p
}

/// `pid: cmdline` of every process whose command line contains `marker`.
pub fn processes_mentioning(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
                && e.file_name() != *me
        })
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(marker)
                .then(|| format!("{}: {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// A network namespace with tap devices, removed on drop.
pub struct Netns {
    name: String,
    pub path: PathBuf,
    pub taps: Vec<String>,
}

impl Netns {
    fn new(taps: &[&str]) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "shoji-clh-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        for tap in taps {
            ip(&["-n", &name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        }
        Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
            taps: taps.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// `net:[inode]`, as /proc/<pid>/ns/net reads.
    pub fn id(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        format!("net:[{}]", std::fs::metadata(&self.path).unwrap().ino())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
