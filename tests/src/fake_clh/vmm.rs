//! The fake VMM: one VM's state machine and the handling of each API call, as a real
//! Cloud Hypervisor answers it.
use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{
    http::{encode, error, json_response, ok, read_request, Request, Response, Then},
    unix_ms, Args, Record,
};

/// What the VMM knows about its VM. `config == None` means no VM was created.
#[derive(Default)]
pub(super) struct Vm {
    pub(super) config: Option<Value>,
    pub(super) state: State,
    /// Tap fds received with vm.add-net, kept like CH keeps them.
    pub(super) taps: Vec<OwnedFd>,
    /// Open vhost-user (virtio-fs) connections and the hybrid-vsock listener of a booted VM.
    pub(super) fs_conns: Vec<UnixStream>,
    pub(super) vsock: Option<UnixListener>,
    /// The serial port's file of a booted VM (`--fake-console-flood` writes through a weak
    /// reference, so it stops when the VM does).
    pub(super) console: Option<Arc<File>>,
}

#[derive(Default, Clone, Copy, PartialEq)]
pub(super) enum State {
    #[default]
    Created,
    Running,
    Paused,
}

impl State {
    pub(super) fn name(self) -> &'static str {
        match self {
            State::Created => "Created",
            State::Running => "Running",
            State::Paused => "Paused",
        }
    }
}

pub(super) struct Fake {
    pub(super) args: Args,
    pub(super) started: Instant,
    /// The VMM thread: held for the whole handling of a request.
    pub(super) vm: Mutex<Vm>,
    pub(super) record: Mutex<Option<File>>,
}

const API_ERROR: &str = "Error from API";

impl Fake {
    pub(super) fn new(args: Args) -> Fake {
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

    pub(super) fn record(&self, r: Record) {
        if let Some(f) = self.record.lock().unwrap().as_mut() {
            let _ = writeln!(f, "{}", serde_json::to_string(&r).unwrap());
        }
    }

    pub(super) fn log(&self, thread: &str, level: &str, place: &str, msg: &str) {
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

    pub(super) fn event(&self, source: &str, event: &str) {
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

    /// SIGKILL from outside, as the OOM killer does it: no log line, no event.
    pub(super) fn die(&self) -> ! {
        self.record(Record::Exit {
            code: 128 + libc::SIGKILL,
            reason: "killed (--fake-die-after)".into(),
            unix_ms: unix_ms(),
        });
        // SAFETY: kill(2) of this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILL is not caught")
    }

    pub(super) fn exit(&self, code: i32, reason: &str) -> ! {
        self.record(Record::Exit {
            code,
            reason: reason.into(),
            unix_ms: unix_ms(),
        });
        std::process::exit(code)
    }

    /// One connection: requests in sequence (keep-alive) until the peer closes.
    pub(super) fn serve(self: Arc<Self>, mut conn: UnixStream) {
        let mut buf = Vec::new();
        loop {
            let mut fds = Vec::new();
            let req = match read_request(&conn, &mut buf, &mut fds) {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => return,
            };
            let resp = self.handle(req, fds);
            let _ = conn.write_all(&encode(&resp));
            match resp.then {
                Then::Serve => {}
                Then::Exit => {
                    let _ = conn.flush();
                    self.exit(0, "vmm.shutdown");
                }
                Then::Die => self.die(),
            }
        }
    }

    pub(super) fn handle(self: &Arc<Self>, req: Request, fds: Vec<OwnedFd>) -> Response {
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
        if let Some(&status) = self.args.reject.get(&call) {
            let resp = error(status, &rejection(status, &call));
            self.record(record(Some(resp.status)));
            return resp;
        }
        let mut resp = match (req.method.as_str(), call.as_str()) {
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
                    then: Then::Exit,
                }
            }
            _ => error(404, &["Not Found"]),
        };
        if self.args.die_after.contains(&call) {
            resp.then = Then::Die;
        }
        self.record(record(Some(resp.status)));
        resp
    }

    pub(super) fn transition(
        &self,
        vm: &mut Vm,
        from: State,
        to: State,
        done: &str,
        doing: &str,
    ) -> Response {
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

    pub(super) fn shutdown_vm(&self, vm: &mut Vm) {
        self.event("vm", "shutdown");
        vm.state = State::Created;
        vm.fs_conns.clear();
        vm.vsock = None;
        vm.console = None;
    }

    pub(super) fn boot(self: &Arc<Self>, vm: &mut Vm) -> Response {
        const BOOT: &str = "The VM could not boot";
        let Some(config) = vm.config.clone() else {
            return error(404, &[API_ERROR, BOOT, "VM config is missing"]);
        };
        if vm.state != State::Created {
            // Approximation.
            return error(500, &[API_ERROR, BOOT, "VM is already running"]);
        }
        // Creating the devices and loading the kernel, with the API blocked meanwhile.
        std::thread::sleep(self.args.boot_delay);
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
                Ok(l) => {
                    if let Some(agent) = &self.args.agent {
                        super::guest::start(&l, Path::new(socket), agent.clone());
                    }
                    vm.vsock = Some(l)
                }
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
            // As CH opens it: truncated, written at its own offset (not appended).
            vm.console = File::create(file).ok().map(Arc::new);
            self.guest_output(vm);
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

    /// What the guest writes on its serial port: `--fake-console` lines once, and with
    /// `--fake-console-flood` numbered lines as fast as about 4 MB/s until the VM ends.
    fn guest_output(&self, vm: &Vm) {
        let Some(console) = &vm.console else { return };
        for line in &self.args.console {
            let _ = writeln!(&**console, "{line}");
        }
        if self.args.console_flood {
            let console = Arc::downgrade(console);
            std::thread::spawn(move || {
                let chunk: String = (0..64)
                    .map(|i| format!("[{i:>4}] a guest flooding its console {}\n", "x".repeat(24)))
                    .collect();
                while let Some(f) = console.upgrade() {
                    if (&*f).write_all(chunk.as_bytes()).is_err() {
                        return;
                    }
                    drop(f);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
    }

    /// vm.add-*: on a created VM only the config changes (204); on a running one the device
    /// is hot-plugged and CH answers with its PCI address (200).
    pub(super) fn add_device(
        &self,
        vm: &mut Vm,
        key: &str,
        body: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Response {
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

/// The error chain of a call rejected with `--fake-reject CALL=STATUS`, in CH's style: the
/// API's outer message for that call, then (for a 400) config validation.
fn rejection(status: u16, call: &str) -> Vec<&'static str> {
    let what = match call {
        "vm.create" => "The VM could not be created",
        "vm.boot" => "The VM could not boot",
        "vm.info" => "The VM info is not available",
        "vm.add-net" => "The network device could not be added to the VM",
        "vm.resize" => "The VM could not be resized",
        "vm.shutdown" => "The VM could not shutdown",
        _ => "The request failed",
    };
    match status {
        400 => vec![
            API_ERROR,
            what,
            "Failed to validate config",
            "rejected by --fake-reject",
        ],
        _ => vec![API_ERROR, what, "rejected by --fake-reject"],
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
            // ACPI hot-plug (MemoryManager::resize in CH's source, not recorded): memory only
            // grows, by one DIMM of whole 128 MiB blocks, within the reserved room.
            let room = full["memory"]["hotplug_size"].as_i64().unwrap_or(0);
            let current = size + full["memory"]["hotplugged_size"].as_i64().unwrap_or(0);
            if ram <= current {
                return ok();
            }
            let failure = if (ram - current) % (128 << 20) != 0 {
                Some("The requested hotplug memory addition is not a valid size")
            } else if ram > size + room {
                Some("Not enough space in the hotplug RAM region")
            } else {
                None
            };
            if let Some(why) = failure {
                return error(500, &[API_ERROR, RESIZE, "Memory manager error", why]);
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
