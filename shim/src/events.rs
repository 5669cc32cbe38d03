//! One ordered forwarder of task events to containerd.
//!
//! Every event goes through a single queue drained by one task, so containerd sees them in
//! the order the shim produced them (TaskStart before TaskExit, TaskDelete last).
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::{
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
        TaskResumed, TaskStart,
    },
    protobuf::MessageDyn,
    topics,
    ttrpc::context::Context,
};
use slog::{warn, Logger};
use tokio::sync::mpsc;

type Item = (&'static str, Box<dyn MessageDyn>);

/// Sends events to containerd, in order. Cheap to clone.
#[derive(Clone)]
pub struct EventSender {
    tx: mpsc::UnboundedSender<Item>,
}

impl EventSender {
    /// Starts the forwarder task for `namespace`.
    pub fn start(publisher: RemotePublisher, namespace: String, log: Logger) -> EventSender {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                if let Err(e) = publisher
                    .publish(Context::default(), topic, &namespace, event)
                    .await
                {
                    warn!(log, "failed to publish event"; "topic" => topic, "error" => %e);
                }
            }
        });
        EventSender { tx }
    }

    /// A sender whose events go nowhere (for code paths that run without containerd).
    pub fn discard() -> EventSender {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        EventSender { tx }
    }

    fn send(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        // The forwarder only stops when the shim exits.
        let _ = self.tx.send((topic, event));
    }

    pub fn task_create(&self, e: TaskCreate) {
        self.send(topics::TASK_CREATE_EVENT_TOPIC, Box::new(e));
    }
    pub fn task_start(&self, e: TaskStart) {
        self.send(topics::TASK_START_EVENT_TOPIC, Box::new(e));
    }
    pub fn task_exit(&self, e: TaskExit) {
        self.send(topics::TASK_EXIT_EVENT_TOPIC, Box::new(e));
    }
    pub fn task_delete(&self, e: TaskDelete) {
        self.send(topics::TASK_DELETE_EVENT_TOPIC, Box::new(e));
    }
    pub fn task_oom(&self, e: TaskOOM) {
        self.send(topics::TASK_OOM_EVENT_TOPIC, Box::new(e));
    }
    pub fn exec_added(&self, e: TaskExecAdded) {
        self.send(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e));
    }
    pub fn exec_started(&self, e: TaskExecStarted) {
        self.send(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e));
    }
    pub fn task_paused(&self, e: TaskPaused) {
        self.send(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(e));
    }
    pub fn task_resumed(&self, e: TaskResumed) {
        self.send(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(e));
    }
}
