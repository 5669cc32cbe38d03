//! The runtime's rules, through the fake guest (`fake.rs`): what each verb checks and in
//! which order, what a failure undoes, how creates and removals of one id serialize, which
//! exits take what with them, how long an exit waits for output and an exec is remembered.
//! This file is the harness; the tests are by verb: `create.rs` (CreateContainer,
//! StartProcess), `process.rs` (ExecProcess, WaitProcess, SignalProcess), `remove.rs`
//! (RemoveContainer and the rest).
mod create;
mod process;
mod remove;
use std::{path::PathBuf, sync::Arc, time::Duration};

use serde_json::json;
use shoji_agent_api::{
    stream::{read_line, StreamHeader, StreamKind},
    types::{CreateContainerRequest, ExecProcessRequest, Rootfs},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{fake::FakeGuest, process::EXEC_RETENTION, Runtime, RuntimeError};
use crate::oom::OomWatcher;

/// A runtime on the fake guest, its run directory, and an image whose only program is /bin/sh.
pub(super) struct Guest {
    pub rt: Arc<Runtime>,
    pub os: Arc<FakeGuest>,
    image: PathBuf,
    dir: tempfile::TempDir,
}

pub(super) fn runtime(debug_console: bool) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    std::fs::create_dir_all(image.join("bin")).unwrap();
    std::fs::write(image.join("bin/sh"), b"").unwrap();
    std::fs::set_permissions(
        image.join("bin/sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let os = Arc::new(FakeGuest::default());
    let rt = Arc::new(Runtime::new(
        os.clone(),
        &dir.path().join("run"),
        OomWatcher::start().unwrap(),
        debug_console,
    ));
    Guest { rt, os, image, dir }
}

/// How a test container shares the pod's namespaces.
#[derive(Clone, Copy)]
enum Pid {
    /// A PID namespace of its own (the kernel ends all of it with the init).
    Own,
    /// The pod's PID, IPC and UTS namespaces (CRI's `NamespaceMode POD`).
    Pod,
}

fn spec(args: &[&str], pid: Pid) -> serde_json::Value {
    let shared = |t: &str| json!({"type": t, "path": format!("/proc/7/ns/{t}")});
    let namespaces = match pid {
        Pid::Own => json!([{"type": "pid"}, {"type": "mount"}]),
        Pid::Pod => json!([shared("pid"), shared("ipc"), shared("uts"), {"type": "mount"}]),
    };
    json!({
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": namespaces}
    })
}

impl Guest {
    fn request(&self, id: &str, spec: serde_json::Value) -> CreateContainerRequest {
        let mut rootfs = Rootfs::new();
        rootfs.source = self.image.to_string_lossy().into();
        let mut r = CreateContainerRequest::new();
        r.container_id = id.into();
        r.spec_json = spec.to_string().into_bytes();
        r.rootfs = Some(rootfs).into();
        r
    }

    async fn create(&self, id: &str, pid: Pid) -> Result<(), RuntimeError> {
        self.rt
            .create_container(self.request(id, spec(&["sh"], pid)))
            .await
    }

    /// Creates and starts container `id`; its init's pid.
    async fn run(&self, id: &str, pid: Pid) -> i32 {
        self.create(id, pid).await.unwrap();
        self.rt.start_process(id, "").await.unwrap() as i32
    }

    async fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> Result<(), RuntimeError> {
        let mut r = ExecProcessRequest::new();
        r.container_id = id.into();
        r.exec_id = exec_id.into();
        r.process_json =
            json!({"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
                .to_string()
                .into_bytes();
        self.rt.exec_process(r).await
    }

    /// Registers and starts exec `exec_id` of `id`; its pid.
    async fn run_exec(&self, id: &str, exec_id: &str) -> i32 {
        self.exec(id, exec_id, &["sh"]).await.unwrap();
        self.rt.start_process(id, exec_id).await.unwrap() as i32
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("run/containers").join(id)
    }

    /// Attaches a stream to a process as the host does, through the stream router.
    async fn attach(&self, id: &str, exec_id: &str, kind: StreamKind) -> DuplexStream {
        let (mut host, agent) = tokio::io::duplex(64 * 1024);
        tokio::spawn(crate::streams::serve(self.rt.clone(), agent));
        let header = StreamHeader {
            kind,
            container_id: id.into(),
            exec_id: exec_id.into(),
        };
        host.write_all(header.encode().as_bytes()).await.unwrap();
        assert_eq!(read_line(&mut host, 256).await.unwrap(), "OK");
        host
    }
}

/// Lets the tasks that a fake event woke (an exit's delivery) run.
async fn settle() {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
}

async fn read_all(mut stream: DuplexStream) -> String {
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
        .await
        .expect("the stream ends")
        .unwrap();
    out
}

fn is<T: std::fmt::Debug>(r: Result<T, RuntimeError>, want: fn(&RuntimeError) -> bool) -> String {
    match r {
        Err(e) if want(&e) => e.to_string(),
        other => panic!("unexpected answer: {other:?}"),
    }
}

fn not_found(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::NotFound(_))
}
fn invalid(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::InvalidArgument(_))
}
fn exists(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::AlreadyExists(_))
}
fn precondition(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::FailedPrecondition(_))
}
fn internal(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Internal(_))
}
