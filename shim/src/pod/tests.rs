//! The pod's containerd semantics against the in-process fake VM: no root, no VM.
use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use oci_spec::runtime::{ProcessBuilder, Spec};
use tokio::sync::mpsc;

use super::{
    fake_vm::{FakeLauncher, FakeVm},
    CreateRequest, Event, Pod, PodError, ProcessRef, Status, VM_GONE_STATUS,
};
use crate::{oci, stdio::StdioPaths};

/// A process as the Task API names it ("" for the init).
fn p(exec_id: &str) -> ProcessRef {
    ProcessRef::from_task(exec_id)
}

/// A pod on a fake VM, with its events and a temp dir of bundles.
struct World {
    pod: Arc<Pod>,
    vm: Arc<FakeVm>,
    launcher: Arc<FakeLauncher>,
    events: mpsc::UnboundedReceiver<Event>,
    dir: PathBuf,
}

impl World {
    fn new(boot_delay: Duration) -> World {
        let dir = std::env::temp_dir().join(format!(
            "shoji-pod-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), "").unwrap();
        let vm = FakeVm::new();
        let launcher = Arc::new(FakeLauncher {
            vm: vm.clone(),
            boots: Default::default(),
            delay: boot_delay,
        });
        let (tx, events) = mpsc::unbounded_channel();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let pod = Pod::new(launcher.clone(), tx, log, Instant::now());
        World {
            pod,
            vm,
            launcher,
            events,
            dir,
        }
    }

    /// Writes a bundle whose spec has these CRI annotations.
    fn request(&self, id: &str, annotations: &[(&str, &str)]) -> CreateRequest {
        let bundle = self.dir.join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let mut spec = Spec::default();
        spec.set_process(Some(
            ProcessBuilder::default()
                .args(vec!["sh".to_string()])
                .build()
                .unwrap(),
        ));
        spec.set_annotations(Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        spec.save(bundle.join("config.json")).unwrap();
        CreateRequest {
            id: id.into(),
            bundle,
            rootfs: Vec::new(),
            stdio: StdioPaths::default(),
            config_path: Some(self.dir.join("config.toml")),
        }
    }

    fn pause(&self, id: &str) -> CreateRequest {
        self.request(
            id,
            &[
                (oci::ANNOTATION_CONTAINER_TYPE, "sandbox"),
                (oci::ANNOTATION_SANDBOX_ID, id),
            ],
        )
    }

    fn member(&self, id: &str, pod: &str) -> CreateRequest {
        self.request(
            id,
            &[
                (oci::ANNOTATION_CONTAINER_TYPE, "container"),
                (oci::ANNOTATION_SANDBOX_ID, pod),
            ],
        )
    }

    /// A pod sandbox `p` with one started container `c`.
    async fn running_pod(&self) {
        self.pod.create(self.pause("p")).await.unwrap();
        self.pod.start("p", &p("")).await.unwrap();
        self.pod.create(self.member("c", "p")).await.unwrap();
        self.pod.start("c", &p("")).await.unwrap();
    }

    /// Exec `e1` in container `c`, started.
    async fn started_exec(&self) {
        self.pod
            .exec("c", "e1", StdioPaths::default(), exec_spec())
            .await
            .unwrap();
        self.pod.start("c", &p("e1")).await.unwrap();
    }

    /// Events so far, as (kind, id) pairs.
    fn drain(&mut self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            out.push(match e {
                Event::Create { container_id, .. } => ("create", container_id),
                Event::Start { container_id, .. } => ("start", container_id),
                Event::ExecAdded { exec_id, .. } => ("exec-added", exec_id),
                Event::ExecStarted { exec_id, .. } => ("exec-started", exec_id),
                Event::Exit { id, .. } => ("exit", id),
                Event::Oom { container_id } => ("oom", container_id),
                Event::Paused { container_id } => ("paused", container_id),
                Event::Resumed { container_id } => ("resumed", container_id),
                Event::Delete { container_id, .. } => ("delete", container_id),
            });
        }
        out
    }

    async fn wait(&self, c: &str, e: &str) -> u32 {
        tokio::time::timeout(Duration::from_secs(5), self.pod.wait(c, &p(e)))
            .await
            .expect("an exit within 5 s")
            .unwrap()
            .status
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn position(events: &[(&str, String)], kind: &str, id: &str) -> usize {
    events
        .iter()
        .position(|(k, i)| *k == kind && i == id)
        .unwrap_or_else(|| panic!("no {kind} event for {id} in {events:?}"))
}

#[tokio::test]
async fn events_come_in_containerd_order() {
    let mut w = World::new(Duration::ZERO);
    w.running_pod().await;
    w.vm.exit("c", "", 3);
    assert_eq!(w.wait("c", "").await, 3);
    assert_eq!(w.pod.delete("c", &p("")).await.unwrap().status, 3);
    let events = w.drain();
    let order: Vec<usize> = ["create", "start", "exit", "delete"]
        .iter()
        .map(|k| position(&events, k, "c"))
        .collect();
    assert!(order.windows(2).all(|p| p[0] < p[1]), "{events:?}");
    assert!(position(&events, "create", "p") < position(&events, "create", "c"));
    assert_eq!(w.vm.removed(), ["c"]);
}

#[tokio::test]
async fn an_exit_racing_its_start_still_comes_after_the_start() {
    let mut w = World::new(Duration::ZERO);
    w.pod.create(w.pause("p")).await.unwrap();
    w.pod.create(w.member("c", "p")).await.unwrap();
    // The process exits the moment it is started, before Start has returned.
    w.vm.exit_when_started("c", "", 0);
    w.pod.start("c", &p("")).await.unwrap();
    assert_eq!(w.wait("c", "").await, 0);
    let events = w.drain();
    assert!(
        position(&events, "start", "c") < position(&events, "exit", "c"),
        "{events:?}"
    );
}

#[tokio::test]
async fn concurrent_creates_boot_one_vm() {
    let w = World::new(Duration::from_millis(100));
    let (a, b) = tokio::join!(w.pod.create(w.pause("p1")), w.pod.create(w.pause("p2")));
    assert_eq!(w.launcher.boots.load(Ordering::SeqCst), 1);
    let failed = match (a, b) {
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
        other => panic!("exactly one create must win: {other:?}"),
    };
    assert!(
        matches!(failed, PodError::FailedPrecondition(_)),
        "{failed}"
    );
    assert!(failed.to_string().contains("second VM"), "{failed}");
}

#[tokio::test]
async fn a_member_without_its_pod_is_refused() {
    let w = World::new(Duration::ZERO);
    let err = w.pod.create(w.member("c", "p")).await.unwrap_err();
    assert!(
        err.to_string().contains("pod sandbox p is not running"),
        "{err}"
    );
    assert_eq!(w.launcher.boots.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn vm_death_ends_every_process_with_255_and_releases_the_vm() {
    let mut w = World::new(Duration::ZERO);
    w.running_pod().await;
    w.started_exec().await;
    w.vm.die("virtiofsd exited");
    for (c, e) in [("p", ""), ("c", ""), ("c", "e1")] {
        assert_eq!(w.wait(c, e).await, VM_GONE_STATUS, "{c}/{e}");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while w.vm.stops() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(w.vm.stops() >= 1, "the ended VM was not released");
    let events = w.drain();
    for id in ["p", "c", "e1"] {
        position(&events, "exit", id);
    }
}

#[tokio::test]
async fn the_pause_container_is_killed_and_waited_without_the_guest() {
    let mut w = World::new(Duration::ZERO);
    w.pod.create(w.pause("p")).await.unwrap();
    w.pod.start("p", &p("")).await.unwrap();
    assert_eq!(w.pod.state("p", &p("")).unwrap().status, Status::Running);
    w.pod.kill("p", &p(""), 9, false).await.unwrap();
    assert_eq!(w.wait("p", "").await, 137);
    // A second kill of an exited process is NOT_FOUND, as containerd expects.
    assert!(matches!(
        w.pod.kill("p", &p(""), 9, false).await,
        Err(PodError::ProcessNotFound { .. })
    ));
    w.pod.delete("p", &p("")).await.unwrap();
    assert_eq!(w.vm.stops(), 1);
    assert!(
        w.vm.removed().is_empty(),
        "the pause container has nothing in the guest"
    );
    let events = w.drain();
    assert!(position(&events, "exit", "p") < position(&events, "delete", "p"));
    assert!(w.pod.is_empty());
}

#[tokio::test]
async fn a_kill_of_all_after_the_init_exited_still_reaches_the_guest() {
    let w = World::new(Duration::ZERO);
    w.running_pod().await;
    w.started_exec().await;
    w.vm.exit("c", "", 143);
    assert_eq!(w.wait("c", "").await, 143);
    // containerd's kill of all before Delete: what the init left in the pod's PID namespace.
    w.pod.kill("c", &p(""), 9, true).await.unwrap();
    let sent = |c: &str, e: &str, signal, all| (c.to_string(), e.to_string(), signal, all);
    assert_eq!(*w.vm.signals.lock().unwrap(), [sent("c", "", 9, true)]);
    // The exited init alone, an exec with all, or the pause container: NOT_FOUND, not sent.
    w.pod.kill("p", &p(""), 9, false).await.unwrap();
    assert_eq!(w.wait("p", "").await, 137);
    for (c, e, all) in [("c", "", false), ("p", "", true)] {
        assert!(matches!(
            w.pod.kill(c, &p(e), 9, all).await,
            Err(PodError::ProcessNotFound { .. })
        ));
    }
    w.vm.exit("c", "e1", 0);
    assert_eq!(w.wait("c", "e1").await, 0);
    assert!(matches!(
        w.pod.kill("c", &p("e1"), 9, true).await,
        Err(PodError::ProcessNotFound { .. })
    ));
    assert_eq!(w.vm.signals.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_exec_may_exit_before_its_init() {
    let mut w = World::new(Duration::ZERO);
    w.running_pod().await;
    w.started_exec().await;
    // An exec id is unique within its container.
    assert!(matches!(
        w.pod
            .exec("c", "e1", StdioPaths::default(), exec_spec())
            .await,
        Err(PodError::ExecExists { .. })
    ));
    // An exec without an id would be the init's name.
    assert!(matches!(
        w.pod
            .exec("c", "", StdioPaths::default(), exec_spec())
            .await,
        Err(PodError::InvalidArgument(_))
    ));
    w.vm.exit("c", "e1", 5);
    assert_eq!(w.wait("c", "e1").await, 5);
    assert_eq!(w.pod.delete("c", &p("e1")).await.unwrap().status, 5);
    assert_eq!(w.pod.state("c", &p("")).unwrap().status, Status::Running);
    w.vm.exit("c", "", 0);
    assert_eq!(w.wait("c", "").await, 0);
    let events = w.drain();
    let exec = ["exec-added", "exec-started", "exit"].map(|k| position(&events, k, "e1"));
    assert!(exec.windows(2).all(|p| p[0] < p[1]), "{events:?}");
    assert!(position(&events, "exit", "e1") < position(&events, "exit", "c"));
}

#[tokio::test]
async fn a_created_task_that_is_killed_gets_an_exit() {
    let mut w = World::new(Duration::ZERO);
    w.pod.create(w.pause("p")).await.unwrap();
    w.pod.create(w.member("c", "p")).await.unwrap();
    assert_eq!(w.pod.state("c", &p("")).unwrap().status, Status::Created);
    w.pod.kill("c", &p(""), 9, false).await.unwrap();
    assert_eq!(w.wait("c", "").await, 137);
    w.pod.delete("c", &p("")).await.unwrap();
    let events = w.drain();
    assert!(position(&events, "exit", "c") < position(&events, "delete", "c"));
}

#[tokio::test]
async fn a_standalone_container_owns_its_vm_and_deleting_it_stops_the_vm() {
    let mut w = World::new(Duration::ZERO);
    w.pod.create(w.request("solo", &[])).await.unwrap();
    w.pod.start("solo", &p("")).await.unwrap();
    w.vm.exit("solo", "", 0);
    w.wait("solo", "").await;
    w.pod.delete("solo", &p("")).await.unwrap();
    assert_eq!(w.vm.stops(), 1);
    // The VM goes whole: the container is not removed piece by piece first.
    assert!(w.vm.removed().is_empty());
    assert_eq!(w.drain().last().unwrap().0, "delete");
}

#[tokio::test]
async fn oom_events_are_checked_and_rate_limited() {
    let mut w = World::new(Duration::ZERO);
    w.running_pod().await;
    w.vm.oom("no-such-container");
    w.vm.oom("p"); // the pause container has nothing in the guest to kill
    for _ in 0..100 {
        w.vm.oom("c");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ooms: Vec<_> = w.drain().into_iter().filter(|(k, _)| *k == "oom").collect();
    assert_eq!(ooms, [("oom", "c".to_string())]);
}

#[tokio::test]
async fn a_running_process_cannot_be_deleted_and_unknown_ids_are_not_found() {
    let w = World::new(Duration::ZERO);
    w.running_pod().await;
    assert!(matches!(
        w.pod.delete("c", &p("")).await,
        Err(PodError::FailedPrecondition(_))
    ));
    assert!(matches!(
        w.pod.state("nope", &p("")),
        Err(PodError::ContainerNotFound(_))
    ));
    assert!(matches!(
        w.pod.state("c", &p("nope")),
        Err(PodError::ProcessNotFound { .. })
    ));
    assert!(matches!(
        w.pod.create(w.member("c", "p")).await,
        Err(PodError::ContainerExists(_))
    ));
}

fn exec_spec() -> Vec<u8> {
    serde_json::to_vec(
        &ProcessBuilder::default()
            .args(vec!["true".to_string()])
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// containerd's Update (UpdateContainerResources) of a guest container reaches the VM (the
/// sandbox sizes the VM and tells the agent, sandbox/sizing.rs) with the resources as sent;
/// the pause container has nothing in the guest; a malformed document goes nowhere.
#[tokio::test]
async fn update_reaches_the_vm_for_guest_containers_only() {
    let w = World::new(Duration::ZERO);
    w.running_pod().await;
    let json = br#"{"memory":{"limit":536870912},"cpu":{"quota":200000,"period":100000}}"#;
    w.pod.update("c", json).await.unwrap();
    w.pod.update("p", json).await.unwrap();
    let e = w.pod.update("c", b"{not json").await.unwrap_err();
    assert!(matches!(e, PodError::InvalidArgument(_)), "{e}");
    assert!(matches!(
        w.pod.update("nope", json).await.unwrap_err(),
        PodError::ContainerNotFound(_)
    ));
    assert_eq!(
        *w.vm.updates.lock().unwrap(),
        vec![("c".to_string(), json.to_vec())]
    );
}
