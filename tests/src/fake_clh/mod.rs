//! A fake Cloud Hypervisor: the REST API of a real one (as recorded in
//! docs/cloud-hypervisor-api.md) without a VM behind it, so the driver can be tested
//! on a host whose KVM cannot run guests.
//!
//! It runs as the binary `fake-cloud-hypervisor` (src/bin), takes the real command-line
//! flags (`--api-socket path=…`, `--log-file …`, `--event-monitor path=…`) plus `--fake-*`
//! flags for tests, and mimics the real VMM where the driver can observe it:
//! - wire format: `Server: Cloud Hypervisor API`, `Connection: keep-alive`, JSON bodies,
//!   `204` without body, errors as a JSON array of strings (outer → inner);
//! - one VMM thread: requests are handled one at a time, so a blocked call blocks the API;
//! - state machine: no VM → `vm.create` → Created → `vm.boot` → Running ⇄ Paused;
//!   `vm.shutdown` → Created again (config kept), `vm.delete` → no VM;
//! - `vm.boot` validates the config (400), opens kernel and initramfs (500), connects to
//!   each virtio-fs socket, waiting `--fake-fs-wait-ms` (real: 60 s) when nobody listens,
//!   then binds the hybrid-vsock socket; the vhost-user connection is held until the VM
//!   ends (virtiofsd exits when it closes, as with the real VMM);
//! - `vm.add-net` takes tap fds by SCM_RIGHTS (they must match `num_queues` / 2);
//! - the event monitor gets pretty-printed JSON events, the log `… <thread> LEVEL:file:line -- msg`;
//! - `vmm.shutdown` answers 200 with an empty body, then the process exits.
//!
//! Error texts documented in cloud-hypervisor-api.md are reproduced exactly; the few
//! others (marked "approximation") follow CH's error chain style.
//!
//! Test flags: `--fake-record FILE` (JSON lines: start, every request with its body, fd
//! count and tap names, exit), `--fake-fs-wait-ms N`, `--fake-hang CALL` (never answer that
//! call, holding the API like a stuck VMM; repeatable), `--fake-die-after-boot-ms N` (the
//! vCPU fails N ms after boot: ERROR line, events, exit status 1), `--fake-crash CALL` (the
//! VMM panics on that call without answering: panic message on stderr, abort),
//! `--fake-die-after CALL` (answers that call, then is killed with SIGKILL, as by the OOM
//! killer), `--fake-reject CALL=STATUS` (answers that call with STATUS and an error chain in
//! CH's style, changing nothing), `--fake-boot-ms N` (vm.boot takes N ms, the API blocked
//! meanwhile), `--fake-console LINE` (the guest writes LINE on its serial port at boot;
//! repeatable), `--fake-console-flood` (the guest writes to its serial port at about 4 MB/s
//! until the VM ends), `--fake-agent SOCKET` (the booted guest runs an agent served by the
//! test on SOCKET: it announces itself and the hybrid vsock relays the agent's port to it,
//! see `guest.rs`).
mod env;
mod guest;
mod http;
mod vmm;

use std::{
    collections::{HashMap, HashSet},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use self::vmm::Fake;
pub use self::{
    env::{processes_mentioning, virtiofsd, DriverEnv, Req},
    http::{raw_request, RawResponse},
};

/// Where a fake started without `--fake-record` records: beside its API socket (in a
/// jail, the one directory it may write).
pub const JAILED_RECORD: &str = "fake-clh-record.jsonl";

/// One line of the `--fake-record` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The process started: its argv and network namespace (`net:[inode]`).
    Start {
        pid: u32,
        argv: Vec<String>,
        netns: String,
    },
    /// One API request. `status` is `None` for a request the fake was told to hang on.
    Request {
        method: String,
        /// Without the `/api/v1/` prefix, e.g. `vm.create`.
        call: String,
        body: String,
        /// How many fds arrived with it (SCM_RIGHTS), and the tap names among them.
        fds: usize,
        taps: Vec<String>,
        status: Option<u16>,
    },
    /// The process is about to exit on its own.
    Exit {
        code: i32,
        reason: String,
        unix_ms: u64,
    },
}

#[derive(Debug, Default)]
pub(crate) struct Args {
    pub(crate) api_socket: PathBuf,
    pub(crate) log_file: Option<PathBuf>,
    pub(crate) event_monitor: Option<PathBuf>,
    pub(crate) record: Option<PathBuf>,
    pub(crate) fs_wait: Duration,
    pub(crate) hang: HashSet<String>,
    pub(crate) die_after_boot: Option<Duration>,
    pub(crate) crash: HashSet<String>,
    pub(crate) die_after: HashSet<String>,
    pub(crate) reject: HashMap<String, u16>,
    pub(crate) boot_delay: Duration,
    pub(crate) console: Vec<String>,
    pub(crate) console_flood: bool,
    pub(crate) agent: Option<PathBuf>,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = Args {
        fs_wait: Duration::from_secs(60),
        ..Args::default()
    };
    let mut it = argv.iter().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        match flag {
            "-v" | "-vv" => continue,
            "--fake-console-flood" => {
                args.console_flood = true;
                continue;
            }
            _ => {}
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))?,
        };
        // CH's socket options are `path=<p>` (or a bare path).
        let path_opt = |v: &str| PathBuf::from(v.strip_prefix("path=").unwrap_or(v));
        let millis = |v: &str| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{flag}: {e}"))
        };
        match flag {
            "--api-socket" => args.api_socket = path_opt(&value),
            "--log-file" => args.log_file = Some(PathBuf::from(value)),
            "--event-monitor" => args.event_monitor = Some(path_opt(&value)),
            // CH's seccomp filter: true (its default), false or log. The fake has none.
            "--seccomp" if ["true", "false", "log"].contains(&value.as_str()) => {}
            "--fake-record" => args.record = Some(PathBuf::from(value)),
            "--fake-fs-wait-ms" => args.fs_wait = millis(&value)?,
            "--fake-hang" => {
                args.hang.insert(value);
            }
            "--fake-die-after-boot-ms" => args.die_after_boot = Some(millis(&value)?),
            "--fake-crash" => {
                args.crash.insert(value);
            }
            "--fake-die-after" => {
                args.die_after.insert(value);
            }
            "--fake-reject" => {
                let (call, status) = value
                    .split_once('=')
                    .and_then(|(c, s)| Some((c.to_string(), s.parse::<u16>().ok()?)))
                    .ok_or_else(|| format!("{flag}: expected CALL=STATUS, got {value:?}"))?;
                args.reject.insert(call, status);
            }
            "--fake-boot-ms" => args.boot_delay = millis(&value)?,
            "--fake-console" => args.console.push(value),
            "--fake-agent" => args.agent = Some(PathBuf::from(value)),
            _ => return Err(format!("unexpected argument '{flag}' found")),
        }
    }
    if args.api_socket.as_os_str().is_empty() {
        return Err("--api-socket is required by this fake".into());
    }
    if args.record.is_none() {
        args.record = args.api_socket.parent().map(|d| d.join(JAILED_RECORD));
    }
    Ok(args)
}

/// Entry point of the `fake-cloud-hypervisor` binary; returns the exit code.
pub fn main() -> i32 {
    let argv: Vec<String> = std::env::args().collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let fake = Arc::new(Fake::new(args));
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    fake.record(Record::Start {
        pid: std::process::id(),
        argv,
        netns,
    });
    fake.event("vmm", "starting");
    let listener = match UnixListener::bind(&fake.args.api_socket) {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("Error binding to UNIX socket: {e}");
            fake.log("vmm", "ERROR", "vmm/src/api/http/mod.rs:530", &msg);
            eprintln!("Error booting VMM: {msg}");
            return 1;
        }
    };
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let fake = fake.clone();
        std::thread::spawn(move || fake.serve(conn));
    }
    0
}

/// Now, in ms since the epoch (as the fake records its exit).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A `cloud-hypervisor` stand-in for the driver: a wrapper script that execs the fake with
/// the test's `--fake-*` flags and a record file (exec keeps the pid the driver watches).
pub struct FakeClh {
    pub binary: PathBuf,
    pub record: PathBuf,
}

impl FakeClh {
    /// `fake` is the `fake-cloud-hypervisor` binary (`env!("CARGO_BIN_EXE_fake-cloud-hypervisor")`).
    /// The fake as the VMM binary itself (a copy in `dir`, no flags), for a jail that sees
    /// only the VMM's binary: it records into `record`, beside its API socket.
    pub fn install_jailed(fake: &Path, dir: &Path, record: &Path) -> std::io::Result<FakeClh> {
        let binary = dir.join("cloud-hypervisor");
        std::fs::copy(fake, &binary)?;
        Ok(FakeClh {
            binary,
            record: record.to_path_buf(),
        })
    }

    pub fn install(fake: &Path, dir: &Path, flags: &[&str]) -> std::io::Result<FakeClh> {
        use std::os::unix::fs::PermissionsExt;
        let binary = dir.join("cloud-hypervisor");
        let record = dir.join("fake-clh-record.jsonl");
        let quoted: Vec<String> = flags.iter().map(|f| format!("'{f}'")).collect();
        std::fs::write(
            &binary,
            format!(
                "#!/bin/sh\nexec '{}' --fake-record '{}' {} \"$@\"\n",
                fake.display(),
                record.display(),
                quoted.join(" ")
            ),
        )?;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
        Ok(FakeClh { binary, record })
    }

    /// Every record so far, in order.
    pub fn records(&self) -> Vec<Record> {
        read_records(&self.record)
    }

    /// The requests so far as `(call, status)`.
    pub fn calls(&self) -> Vec<(String, Option<u16>)> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Request { call, status, .. } => Some((call, status)),
                _ => None,
            })
            .collect()
    }
}

pub fn read_records(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record line {l:?}: {e}")))
        .collect()
}
