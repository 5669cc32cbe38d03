//! The fake Cloud Hypervisor answers as the real one did (cloud-hypervisor-api.md): these
//! tests replay the recorded exchanges over raw HTTP and compare status, headers and bodies.
use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use shoji_tests::fake_clh::{raw_request, RawResponse};

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

struct Fake {
    dir: tempfile::TempDir,
    child: Child,
    socket: PathBuf,
}

impl Fake {
    fn start(flags: &[&str]) -> Fake {
        let dir = tempfile::Builder::new()
            .prefix("shoji-clh-fake-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("api.sock");
        let child = Command::new(FAKE)
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .arg("--log-file")
            .arg(dir.path().join("ch.log"))
            .arg("--event-monitor")
            .arg(format!("path={}", dir.path().join("events.json").display()))
            .args(flags)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "fake never listened on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Fake { dir, child, socket }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conn(&self) -> UnixStream {
        let c = UnixStream::connect(&self.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chain(r: &RawResponse) -> Vec<String> {
    serde_json::from_str(&r.body).unwrap_or_else(|e| {
        panic!(
            "error body {:?} is not a JSON array of strings: {e}",
            r.body
        )
    })
}

fn assert_error(r: &RawResponse, status: u16, expected: &[&str]) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("Content-Type"), Some("application/json"), "{r:?}");
    assert_eq!(chain(r), expected, "{r:?}");
}

fn assert_no_content(r: &RawResponse) {
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("Content-Type"), None, "{r:?}");
    assert_eq!(r.body, "");
}

fn events(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|v| {
            let v = v.unwrap();
            assert!(
                v["timestamp"]["secs"].is_u64() && v["timestamp"]["nanos"].is_u64(),
                "{v}"
            );
            assert!(v["properties"].is_null(), "{v}");
            (
                v["source"].as_str().unwrap().to_string(),
                v["event"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn recorded_exchanges_without_a_bootable_vm() {
    let mut fake = Fake::start(&[]);
    let mut c = fake.conn();

    // Every answer on one keep-alive connection, as a real client would.
    let ping = raw_request(&mut c, "GET", "vmm.ping", "").unwrap();
    assert_eq!(ping.status, 200);
    assert_eq!(ping.header("Server"), Some("Cloud Hypervisor API"));
    assert_eq!(ping.header("Connection"), Some("keep-alive"));
    assert_eq!(ping.header("Content-Type"), Some("application/json"));
    let v: Value = serde_json::from_str(&ping.body).unwrap();
    assert_eq!(v["version"], "54.0.0");
    assert_eq!(v["pid"], fake.child.id());
    assert_eq!(v["features"], json!(["io_uring", "kvm"]));

    let e = "Error from API";
    assert_error(
        &raw_request(&mut c, "GET", "vm.info", "").unwrap(),
        404,
        &[e, "The VM info is not available", "VM is not created"],
    );
    assert_error(
        &raw_request(&mut c, "PUT", "vm.boot", "").unwrap(),
        404,
        &[e, "The VM could not boot", "VM config is missing"],
    );
    assert_error(
        &raw_request(&mut c, "PUT", "vm.shutdown", "").unwrap(),
        500,
        &[e, "The VM could not shutdown", "VM is not running"],
    );
    assert_error(
        &raw_request(&mut c, "GET", "vm.nonsense", "").unwrap(),
        404,
        &["Not Found"],
    );
    assert_error(
        &raw_request(&mut c, "PUT", "vm.create", "nope").unwrap(),
        400,
        &[
            "Failed to deserialize JSON",
            "expected ident at line 1 column 2",
        ],
    );

    // Paths are only checked at boot.
    let missing = fake.path("no-such-vmlinux");
    let create = json!({
        "payload": {"kernel": missing},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 268435456, "shared": true},
    })
    .to_string();
    assert_no_content(&raw_request(&mut c, "PUT", "vm.create", &create).unwrap());
    let info = raw_request(&mut c, "GET", "vm.info", "").unwrap();
    assert_eq!(info.status, 200);
    let v: Value = serde_json::from_str(&info.body).unwrap();
    assert_eq!(v["state"], "Created");
    assert_eq!(v["config"]["serial"], json!({"mode": "Null"}));
    assert_eq!(v["config"]["console"], json!({"mode": "Tty"}));
    assert_eq!(v["config"]["rng"], json!({"src": "/dev/urandom"}));
    assert_eq!(v["memory_actual_size"], 268435456);
    // The driver parses vm.info with the client crate's types.
    serde_json::from_str::<cloud_hypervisor_client::models::VmInfo>(&info.body).unwrap();

    assert_error(
        &raw_request(&mut c, "PUT", "vm.boot", "").unwrap(),
        500,
        &[
            e,
            "The VM could not boot",
            "Cannot open kernel file",
            "No such file or directory (os error 2)",
        ],
    );
    assert_error(
        &raw_request(&mut c, "PUT", "vm.create", &create).unwrap(),
        500,
        &[e, "The VM could not be created", "VM is already created"],
    );
    assert_error(
        &raw_request(&mut c, "GET", "vm.counters", "").unwrap(),
        500,
        &[e, "The VM info is not available", "VM is not running"],
    );
    assert_error(
        &raw_request(&mut c, "PUT", "vm.pause", "").unwrap(),
        500,
        &[e, "The VM could not be paused", "VM is not running"],
    );

    // add-* on a created VM only edits the config: 204 without a body.
    let fs =
        json!({"tag": "t", "socket": fake.path("vfs.sock"), "num_queues": 1, "queue_size": 512})
            .to_string();
    assert_no_content(&raw_request(&mut c, "PUT", "vm.add-fs", &fs).unwrap());
    // A resize beyond max_vcpus is accepted on a created VM; the next boot fails validation.
    assert_no_content(&raw_request(&mut c, "PUT", "vm.resize", r#"{"desired_vcpus":2}"#).unwrap());
    assert_error(
        &raw_request(&mut c, "PUT", "vm.boot", "").unwrap(),
        400,
        &[
            e,
            "The VM could not boot",
            "Failed to validate config",
            "Max CPUs (1) lower than boot CPUs (2)",
        ],
    );
    assert_no_content(&raw_request(&mut c, "PUT", "vm.delete", "").unwrap());

    // Unknown fields are ignored; the missing payload fails at boot and at add-net.
    assert_no_content(&raw_request(&mut c, "PUT", "vm.create", r#"{"bogus":1}"#).unwrap());
    assert_error(
        &raw_request(&mut c, "PUT", "vm.boot", "").unwrap(),
        400,
        &[
            e,
            "The VM could not boot",
            "Failed to validate config",
            "Payload configuration is not bootable",
            "No bootitem provided: neither firmware nor kernel",
        ],
    );
    let add_net = raw_request(&mut c, "PUT", "vm.add-net", r#"{"tap":"tap9"}"#).unwrap();
    assert_eq!(add_net.status, 400);
    assert_eq!(
        chain(&add_net)[..3],
        [
            e,
            "The network device could not be added to the VM",
            "Failed to validate config"
        ]
    );

    // vmm.shutdown: 200, empty body, then the process exits.
    let bye = raw_request(&mut c, "PUT", "vmm.shutdown", "").unwrap();
    assert_eq!(bye.status, 200);
    assert_eq!(bye.header("Content-Length"), Some("0"));
    assert_eq!(bye.body, "");
    assert_eq!(fake.exit_status().code(), Some(0));
    assert_eq!(
        events(&fake.path("events.json")),
        [
            ("vmm".into(), "starting".into()),
            ("vm".into(), "deleted".into()),
            ("vmm".into(), "shutdown".into())
        ]
    );
}

#[test]
fn boot_pause_resume_and_the_virtiofs_wait() {
    let fake = Fake::start(&["--fake-fs-wait-ms", "400"]);
    let mut c = fake.conn();
    let kernel = fake.path("vmlinux");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let vsock = fake.path("vsock.sock");
    let body = json!({
        "payload": {"kernel": kernel, "cmdline": "console=ttyS0"},
        "memory": {"size": 268435456, "shared": true},
        "fs": [{"tag": "t", "socket": fake.path("vfs.sock"), "num_queues": 1, "queue_size": 1024}],
        "vsock": {"cid": 3, "socket": vsock},
        "serial": {"mode": "File", "file": fake.path("console.log")},
        "console": {"mode": "Off"},
    });
    assert_no_content(&raw_request(&mut c, "PUT", "vm.create", &body.to_string()).unwrap());

    // Nobody listens on the virtio-fs socket: the boot blocks (60 s in the real VMM), and
    // the API with it.
    let t = Instant::now();
    let mut other = fake.conn();
    let blocked = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        raw_request(&mut other, "GET", "vmm.ping", "").unwrap();
        t.elapsed()
    });
    let r = raw_request(&mut c, "PUT", "vm.boot", "").unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert!(
        blocked.join().unwrap() >= Duration::from_millis(200),
        "vmm.ping was not blocked by the boot"
    );
    assert_error(
        &r,
        500,
        &[
            "Error from API",
            "The VM could not boot",
            "Error from device manager",
            "Cannot create virtio-fs device",
            "Timed out waiting for vhost-user connection",
        ],
    );
    let log = std::fs::read_to_string(fake.path("ch.log")).unwrap();
    assert!(log.contains("<vmm> ERROR:virtio-devices/src/vhost_user/vu_common_ctrl.rs:545 -- Timed out waiting for vhost-user connection on socket"), "{log}");

    // With a listener there, the boot succeeds, the vsock socket appears and the vhost-user
    // connection is made.
    let vfs = std::os::unix::net::UnixListener::bind(fake.path("vfs.sock")).unwrap();
    assert_no_content(&raw_request(&mut c, "PUT", "vm.boot", "").unwrap());
    vfs.set_nonblocking(true).unwrap();
    assert!(vfs.accept().is_ok(), "no vhost-user connection");
    assert!(vsock.exists());
    let state = |c: &mut UnixStream| -> String {
        let v: Value =
            serde_json::from_str(&raw_request(c, "GET", "vm.info", "").unwrap().body).unwrap();
        v["state"].as_str().unwrap().to_string()
    };
    assert_eq!(state(&mut c), "Running");
    assert_no_content(&raw_request(&mut c, "PUT", "vm.pause", "").unwrap());
    assert_eq!(state(&mut c), "Paused");
    assert_no_content(&raw_request(&mut c, "PUT", "vm.resume", "").unwrap());
    assert_eq!(state(&mut c), "Running");
    assert_no_content(&raw_request(&mut c, "PUT", "vm.shutdown", "").unwrap());
    let ev: Vec<String> = events(&fake.path("events.json"))
        .into_iter()
        .map(|(s, e)| format!("{s} {e}"))
        .collect();
    assert_eq!(
        ev,
        [
            "vmm starting",
            "vm booting",
            "vm booting",
            "vm booted",
            "vm pausing",
            "vm paused",
            "vm resuming",
            "vm resumed",
            "vm shutdown"
        ]
    );
}

impl Fake {
    /// Waits (bounded) for the fake to exit on its own.
    fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fake did not exit after vmm.shutdown"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
