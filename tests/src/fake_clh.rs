//! A fake Cloud Hypervisor: the REST API of a real one (as recorded in
//! /work/shared/cloud-hypervisor-api.md) without a VM behind it, so the driver can be tested
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
//! VMM panics on that call without answering: panic message on stderr, abort).
use std::{
    collections::HashSet,
    fs::{File, OpenOptions},
    io::{IoSliceMut, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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
struct Args {
    api_socket: PathBuf,
    log_file: Option<PathBuf>,
    event_monitor: Option<PathBuf>,
    record: Option<PathBuf>,
    fs_wait: Duration,
    hang: HashSet<String>,
    die_after_boot: Option<Duration>,
    crash: HashSet<String>,
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
        if flag == "-v" || flag == "-vv" {
            continue;
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
            "--fake-record" => args.record = Some(PathBuf::from(value)),
            "--fake-fs-wait-ms" => args.fs_wait = millis(&value)?,
            "--fake-hang" => {
                args.hang.insert(value);
            }
            "--fake-die-after-boot-ms" => args.die_after_boot = Some(millis(&value)?),
            "--fake-crash" => {
                args.crash.insert(value);
            }
            _ => return Err(format!("unexpected argument '{flag}' found")),
        }
    }
    if args.api_socket.as_os_str().is_empty() {
        return Err("--api-socket is required by this fake".into());
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

/// What the VMM knows about its VM. `config == None` means no VM was created.
#[derive(Default)]
struct Vm {
    config: Option<Value>,
    state: State,
    /// Tap fds received with vm.add-net, kept like CH keeps them.
    taps: Vec<OwnedFd>,
    /// Open vhost-user (virtio-fs) connections and the hybrid-vsock listener of a booted VM.
    fs_conns: Vec<UnixStream>,
    vsock: Option<UnixListener>,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum State {
    #[default]
    Created,
    Running,
    Paused,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "Created",
            State::Running => "Running",
            State::Paused => "Paused",
        }
    }
}

struct Fake {
    args: Args,
    started: Instant,
    /// The VMM thread: held for the whole handling of a request.
    vm: Mutex<Vm>,
    record: Mutex<Option<File>>,
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

struct Response {
    status: u16,
    body: Option<String>,
    /// Exit the process once the response is written (vmm.shutdown).
    exit: bool,
}

fn ok() -> Response {
    Response {
        status: 204,
        body: None,
        exit: false,
    }
}

fn json_response(status: u16, v: Value) -> Response {
    Response {
        status,
        body: Some(v.to_string()),
        exit: false,
    }
}

fn error(status: u16, chain: &[&str]) -> Response {
    json_response(status, json!(chain))
}

const API_ERROR: &str = "Error from API";

impl Fake {
    fn new(args: Args) -> Fake {
        let record = args.record.as_ref().map(|p| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open the --fake-record file")
        });
        Fake {
            args,
            started: Instant::now(),
            vm: Mutex::new(Vm::default()),
            record: Mutex::new(record),
        }
    }

    fn record(&self, r: Record) {
        if let Some(f) = self.record.lock().unwrap().as_mut() {
            let _ = writeln!(f, "{}", serde_json::to_string(&r).unwrap());
        }
    }

    fn log(&self, thread: &str, level: &str, place: &str, msg: &str) {
        if let Some(path) = &self.args.log_file {
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
                let t = self.started.elapsed().as_secs_f64();
                let _ = writeln!(
                    f,
                    "cloud-hypervisor: {t:>10.6}s: <{thread}> {level}:{place} -- {msg}"
                );
            }
        }
    }

    fn event(&self, source: &str, event: &str) {
        if let Some(path) = &self.args.event_monitor {
            let t = self.started.elapsed();
            let ev = json!({
                "timestamp": {"secs": t.as_secs(), "nanos": t.subsec_nanos()},
                "source": source, "event": event, "properties": null,
            });
            if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{}", serde_json::to_string_pretty(&ev).unwrap());
            }
        }
    }

    fn exit(&self, code: i32, reason: &str) -> ! {
        self.record(Record::Exit {
            code,
            reason: reason.into(),
            unix_ms: unix_ms(),
        });
        std::process::exit(code)
    }

    /// One connection: requests in sequence (keep-alive) until the peer closes.
    fn serve(self: Arc<Self>, mut conn: UnixStream) {
        let mut buf = Vec::new();
        loop {
            let mut fds = Vec::new();
            let req = match read_request(&conn, &mut buf, &mut fds) {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => return,
            };
            let resp = self.handle(req, fds);
            let _ = conn.write_all(&encode(&resp));
            if resp.exit {
                let _ = conn.flush();
                self.exit(0, "vmm.shutdown");
            }
        }
    }

    fn handle(self: &Arc<Self>, req: Request, fds: Vec<OwnedFd>) -> Response {
        let call = req
            .path
            .strip_prefix("/api/v1/")
            .unwrap_or(&req.path)
            .to_string();
        let taps: Vec<String> = fds
            .iter()
            .filter_map(|fd| tap_name(fd.as_raw_fd()))
            .collect();
        let nfds = fds.len();
        let record = |status| Record::Request {
            method: req.method.clone(),
            call: call.clone(),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            fds: nfds,
            taps: taps.clone(),
            status,
        };
        let mut vm = self.vm.lock().unwrap();
        if self.args.hang.contains(&call) {
            self.record(record(None));
            // Stuck VMM thread: nothing else gets answered either.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if self.args.crash.contains(&call) {
            self.record(record(None));
            let msg = format!("fake crash while handling {call}");
            eprintln!(
                "thread 'vmm' panicked at vmm/src/lib.rs:1234:9:\n{msg}\n\
                 note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace"
            );
            self.record(Record::Exit {
                code: 128 + libc::SIGABRT,
                reason: msg,
                unix_ms: unix_ms(),
            });
            std::process::abort();
        }
        let resp = match (req.method.as_str(), call.as_str()) {
            ("GET", "vmm.ping") => json_response(
                200,
                json!({"build_version": "v53.0-246-gfake", "version": "54.0.0",
                       "pid": std::process::id(), "features": ["io_uring", "kvm"]}),
            ),
            ("GET", "vm.info") => match &vm.config {
                None => error(
                    404,
                    &[
                        API_ERROR,
                        "The VM info is not available",
                        "VM is not created",
                    ],
                ),
                Some(c) => {
                    let config = with_defaults(c);
                    let mem = &config["memory"];
                    let actual = mem["size"].as_i64().unwrap_or(0)
                        + mem["hotplugged_size"].as_i64().unwrap_or(0);
                    json_response(
                        200,
                        json!({"config": config, "state": vm.state.name(), "memory_actual_size": actual}),
                    )
                }
            },
            ("PUT", "vm.create") => match serde_json::from_slice::<Value>(&req.body) {
                Err(e) => error(400, &["Failed to deserialize JSON", &e.to_string()]),
                Ok(_) if vm.config.is_some() => error(
                    500,
                    &[
                        API_ERROR,
                        "The VM could not be created",
                        "VM is already created",
                    ],
                ),
                Ok(c) => {
                    vm.config = Some(c);
                    vm.state = State::Created;
                    ok()
                }
            },
            ("PUT", "vm.boot") => self.boot(&mut vm),
            ("PUT", "vm.shutdown") => match vm.state {
                State::Running | State::Paused if vm.config.is_some() => {
                    self.shutdown_vm(&mut vm);
                    ok()
                }
                _ => error(
                    500,
                    &[API_ERROR, "The VM could not shutdown", "VM is not running"],
                ),
            },
            ("PUT", "vm.delete") => {
                if vm.config.is_some() && vm.state != State::Created {
                    self.shutdown_vm(&mut vm);
                }
                if vm.config.take().is_some() {
                    vm.taps.clear();
                    self.event("vm", "deleted");
                }
                ok()
            }
            ("PUT", "vm.pause") => {
                self.transition(&mut vm, State::Running, State::Paused, "paused", "pausing")
            }
            ("PUT", "vm.resume") => self.transition(
                &mut vm,
                State::Paused,
                State::Running,
                "resumed",
                "resuming",
            ),
            ("GET", "vm.counters") => match (&vm.config, vm.state) {
                (Some(_), State::Running | State::Paused) => json_response(200, json!({})),
                _ => error(
                    500,
                    &[
                        API_ERROR,
                        "The VM info is not available",
                        "VM is not running",
                    ],
                ),
            },
            ("PUT", "vm.add-net") => self.add_device(&mut vm, "net", &req.body, fds),
            ("PUT", "vm.add-fs") => self.add_device(&mut vm, "fs", &req.body, fds),
            ("PUT", "vm.add-vsock") => self.add_device(&mut vm, "vsock", &req.body, fds),
            ("PUT", "vm.resize") => resize(&mut vm, &req.body),
            ("PUT", "vmm.shutdown") => {
                if vm.config.is_some() && vm.state != State::Created {
                    self.shutdown_vm(&mut vm);
                }
                self.event("vmm", "shutdown");
                Response {
                    status: 200,
                    body: Some(String::new()),
                    exit: true,
                }
            }
            _ => error(404, &["Not Found"]),
        };
        self.record(record(Some(resp.status)));
        resp
    }

    fn transition(&self, vm: &mut Vm, from: State, to: State, done: &str, doing: &str) -> Response {
        let verb = if to == State::Paused {
            "paused"
        } else {
            "resumed"
        };
        if vm.config.is_none() || vm.state != from {
            let why = if from == State::Running {
                "VM is not running"
            } else {
                "VM is not paused"
            };
            return error(
                500,
                &[API_ERROR, &format!("The VM could not be {verb}"), why],
            );
        }
        self.event("vm", doing);
        vm.state = to;
        self.event("vm", done);
        ok()
    }

    fn shutdown_vm(&self, vm: &mut Vm) {
        self.event("vm", "shutdown");
        vm.state = State::Created;
        vm.fs_conns.clear();
        vm.vsock = None;
    }

    fn boot(self: &Arc<Self>, vm: &mut Vm) -> Response {
        const BOOT: &str = "The VM could not boot";
        let Some(config) = vm.config.clone() else {
            return error(404, &[API_ERROR, BOOT, "VM config is missing"]);
        };
        if vm.state != State::Created {
            // Approximation.
            return error(500, &[API_ERROR, BOOT, "VM is already running"]);
        }
        if let Err(chain) = validate(&config) {
            let mut all = vec![API_ERROR, BOOT, "Failed to validate config"];
            all.extend(chain.iter().map(String::as_str));
            return error(400, &all);
        }
        let payload = &config["payload"];
        for (key, what) in [
            ("kernel", "Cannot open kernel file"),
            ("initramfs", "Cannot open initramfs file"),
        ] {
            if let Some(p) = payload[key].as_str() {
                if let Err(e) = File::open(p) {
                    return error(500, &[API_ERROR, BOOT, what, &e.to_string()]);
                }
            }
        }
        self.event("vm", "booting");
        let mut fs_conns = Vec::new();
        for fs in config["fs"].as_array().into_iter().flatten() {
            let socket = fs["socket"].as_str().unwrap_or_default();
            match connect_retrying(Path::new(socket), self.args.fs_wait) {
                Some(c) => fs_conns.push(c),
                None => {
                    let msg =
                        format!("Timed out waiting for vhost-user connection on socket {socket}");
                    self.log(
                        "vmm",
                        "ERROR",
                        "virtio-devices/src/vhost_user/vu_common_ctrl.rs:545",
                        &msg,
                    );
                    return error(
                        500,
                        &[
                            API_ERROR,
                            BOOT,
                            "Error from device manager",
                            "Cannot create virtio-fs device",
                            "Timed out waiting for vhost-user connection",
                        ],
                    );
                }
            }
        }
        if let Some(socket) = config["vsock"]["socket"].as_str() {
            match UnixListener::bind(socket) {
                Ok(l) => vm.vsock = Some(l),
                Err(e) => {
                    // Approximation.
                    return error(
                        500,
                        &[
                            API_ERROR,
                            BOOT,
                            "Error from device manager",
                            "Cannot create virtio-vsock device",
                            &e.to_string(),
                        ],
                    );
                }
            }
        }
        if let Some(file) = config["serial"]["file"]
            .as_str()
            .filter(|_| config["serial"]["mode"] == "File")
        {
            let _ = File::create(file);
        }
        vm.fs_conns = fs_conns;
        vm.state = State::Running;
        self.event("vm", "booted");
        if let Some(after) = self.args.die_after_boot {
            let fake = self.clone();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                let _vm = fake.vm.lock().unwrap();
                let msg = "VCPU generated error: VcpuRun(Failed to run vcpu: Invalid argument (os error 22))";
                fake.log("vcpu0", "ERROR", "vmm/src/cpu.rs:1180", msg);
                for (source, event) in [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]
                {
                    fake.event(source, event);
                }
                fake.exit(1, msg);
            });
        }
        ok()
    }

    /// vm.add-*: on a created VM only the config changes (204); on a running one the device
    /// is hot-plugged and CH answers with its PCI address (200).
    fn add_device(&self, vm: &mut Vm, key: &str, body: &[u8], fds: Vec<OwnedFd>) -> Response {
        let what = match key {
            "net" => "The network device could not be added to the VM",
            "fs" => "The fs device could not be added to the VM",
            _ => "The vsock device could not be added to the VM",
        };
        let mut dev: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return error(400, &["Failed to deserialize JSON", &e.to_string()]),
        };
        let Some(config) = vm.config.as_mut() else {
            // Approximation.
            return error(500, &[API_ERROR, what, "VM is not created"]);
        };
        if key == "net" && !fds.is_empty() {
            let queues = dev["num_queues"].as_u64().unwrap_or(2) as usize;
            if queues != fds.len() * 2 {
                return error(
                    400,
                    &[
                        API_ERROR,
                        what,
                        "Failed to validate config",
                        "Number of queues to virtio_net does not match the number of input FDs",
                    ],
                );
            }
        }
        let mut candidate = config.clone();
        let id = dev["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("_{key}{}", fds.len()));
        dev["id"] = json!(id);
        if key == "vsock" {
            candidate["vsock"] = dev;
        } else {
            match candidate[key].as_array_mut() {
                Some(list) => list.push(dev),
                None => candidate[key] = json!([dev]),
            }
        }
        if let Err(chain) = validate(&candidate) {
            let mut all = vec![API_ERROR, what, "Failed to validate config"];
            all.extend(chain.iter().map(String::as_str));
            return error(400, &all);
        }
        *config = candidate;
        vm.taps.extend(fds);
        if vm.state == State::Created {
            ok()
        } else {
            json_response(200, json!({"id": id, "bdf": "0000:00:06.0"}))
        }
    }
}

/// vm.resize: a created VM only has its config edited (validated at the next boot); a
/// running one is checked against its limits.
fn resize(vm: &mut Vm, body: &[u8]) -> Response {
    const RESIZE: &str = "The VM could not be resized";
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(400, &["Failed to deserialize JSON", &e.to_string()]),
    };
    let running = vm.state != State::Created;
    let Some(config) = vm.config.as_mut() else {
        // Approximation.
        return error(500, &[API_ERROR, RESIZE, "VM is not created"]);
    };
    let full = with_defaults(config);
    if let Some(n) = req["desired_vcpus"].as_u64() {
        let max = full["cpus"]["max_vcpus"].as_u64().unwrap_or(1);
        if running && n > max {
            // Approximation.
            return error(
                500,
                &[
                    API_ERROR,
                    RESIZE,
                    "Error resizing vCPUs",
                    &format!("Requested vCPUs ({n}) exceed the maximum ({max})"),
                ],
            );
        }
        config["cpus"] = full["cpus"].clone();
        config["cpus"]["boot_vcpus"] = json!(n);
    }
    if let Some(ram) = req["desired_ram"].as_i64() {
        let size = full["memory"]["size"].as_i64().unwrap_or(0);
        if running {
            let room = full["memory"]["hotplug_size"].as_i64().unwrap_or(0);
            if ram < size || ram > size + room {
                // Approximation.
                return error(
                    500,
                    &[
                        API_ERROR,
                        RESIZE,
                        "Cannot hotplug memory",
                        "Insufficient space for hotplug",
                    ],
                );
            }
            config["memory"] = full["memory"].clone();
            config["memory"]["hotplugged_size"] = json!(ram - size);
        } else {
            config["memory"] = full["memory"].clone();
            config["memory"]["size"] = json!(ram);
        }
    }
    ok()
}

/// CH's config validation, for the checks the driver can trip (texts as CH prints them).
fn validate(c: &Value) -> Result<(), Vec<String>> {
    let payload = &c["payload"];
    if payload["kernel"].is_null() && payload["firmware"].is_null() {
        return Err(vec![
            "Payload configuration is not bootable".into(),
            "No bootitem provided: neither firmware nor kernel".into(),
        ]);
    }
    let full = with_defaults(c);
    let (boot, max) = (
        full["cpus"]["boot_vcpus"].as_u64().unwrap_or(1),
        full["cpus"]["max_vcpus"].as_u64().unwrap_or(1),
    );
    if max < boot {
        return Err(vec![format!(
            "Max CPUs ({max}) lower than boot CPUs ({boot})"
        )]);
    }
    let vhost_user = c["fs"].as_array().is_some_and(|l| !l.is_empty());
    if vhost_user && full["memory"]["shared"] != true && full["memory"]["hugepages"] != true {
        return Err(vec![
            "Using vhost-user requires using shared memory or huge pages".into(),
        ]);
    }
    Ok(())
}

/// The config as `vm.info` shows it: CH's defaults filled in where the body left them out.
fn with_defaults(c: &Value) -> Value {
    let mut full = c.clone();
    let defaults = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "max_phys_bits": 46},
        "memory": {"size": 536870912, "mergeable": false, "hotplug_method": "Acpi", "shared": false,
                   "hugepages": false, "prefault": false, "thp": true},
        "payload": {},
        "serial": {"mode": "Null"},
        "console": {"mode": "Tty"},
        "rng": {"src": "/dev/urandom"},
        "iommu": false, "watchdog": false, "pvpanic": false,
    });
    for (key, default) in defaults.as_object().unwrap() {
        match (full.get_mut(key), default) {
            (None | Some(Value::Null), _) => full[key] = default.clone(),
            (Some(Value::Object(have)), Value::Object(def)) => {
                for (k, v) in def {
                    have.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            _ => {}
        }
    }
    full
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn connect_retrying(socket: &Path, wait: Duration) -> Option<UnixStream> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(c) = UnixStream::connect(socket) {
            return Some(c);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The interface name of a tap fd (TUNGETIFF), `None` for any other fd.
fn tap_name(fd: RawFd) -> Option<String> {
    // SAFETY: ifreq is plain data; TUNGETIFF fills it or fails.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
        return None;
    }
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&name).into_owned())
}

/// Reads one HTTP/1.1 request, collecting any fds that arrive with its bytes. `buf` keeps
/// bytes of a following request. `Ok(None)` when the peer closed the connection.
fn read_request(
    conn: &UnixStream,
    buf: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if recv_chunk(conn, buf, fds)? == 0 {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        if recv_chunk(conn, buf, fds)? == 0 {
            return Ok(None);
        }
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Ok(Some(Request { method, path, body }))
}

fn recv_chunk(
    conn: &UnixStream,
    buf: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 32]);
    let mut iov = [IoSliceMut::new(&mut chunk)];
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: the kernel just installed these fds in our table; we own them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn encode(r: &Response) -> Vec<u8> {
    let reason = match r.status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n",
        r.status
    );
    match &r.body {
        None => out.push_str("\r\n"),
        Some(b) if b.is_empty() => out.push_str("Content-Length: 0\r\n\r\n"),
        Some(b) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
    }
    out.into_bytes()
}

// ---- helpers for tests -------------------------------------------------------------------

/// A `cloud-hypervisor` stand-in for the driver: a wrapper script that execs the fake with
/// the test's `--fake-*` flags and a record file (exec keeps the pid the driver watches).
pub struct FakeClh {
    pub binary: PathBuf,
    pub record: PathBuf,
}

impl FakeClh {
    /// `fake` is the `fake-cloud-hypervisor` binary (`env!("CARGO_BIN_EXE_fake-cloud-hypervisor")`).
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

/// A raw HTTP exchange with the API socket, for checking the wire format itself.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on `conn` and reads the response (Content-Length framed).
pub fn raw_request(
    conn: &mut UnixStream,
    method: &str,
    call: &str,
    body: &str,
) -> std::io::Result<RawResponse> {
    write!(
        conn,
        "{method} /api/v1/{call} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(RawResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
