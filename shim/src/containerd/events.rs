//! One ordered forwarder of the pod's events to containerd.
//!
//! Every event goes through a single queue drained by one task, so containerd sees them in
//! the order the pod produced them (TaskStart before TaskExit, TaskDelete last).
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::{
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
        TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::{well_known_types::timestamp::Timestamp, MessageDyn, MessageField},
    topics,
    ttrpc::context::Context,
};
use slog::{warn, Logger};
use tokio::sync::mpsc;

use crate::pod::{Event, EventSender, Exit};

/// Starts the forwarder for `namespace` and returns the pod's end of its queue.
pub fn forward(publisher: RemotePublisher, namespace: String, log: Logger) -> EventSender {
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let (topic, message) = to_protobuf(event);
            if let Err(e) = publisher
                .publish(Context::default(), topic, &namespace, message)
                .await
            {
                warn!(log, "failed to publish event"; "topic" => topic, "error" => %e);
            }
        }
    });
    tx
}

/// containerd's protobuf timestamp of an exit.
pub fn timestamp(exit: &Exit) -> MessageField<Timestamp> {
    MessageField::some(Timestamp {
        seconds: exit.at_secs,
        nanos: exit.at_nanos as i32,
        ..Default::default()
    })
}

fn to_protobuf(event: Event) -> (&'static str, Box<dyn MessageDyn>) {
    match event {
        Event::Create {
            container_id,
            bundle,
            stdio,
            pid,
        } => (
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id,
                bundle: bundle.display().to_string(),
                io: MessageField::some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        ),
        Event::Start { container_id, pid } => (
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id,
                pid,
                ..Default::default()
            }),
        ),
        Event::ExecAdded {
            container_id,
            exec_id,
        } => (
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id,
                exec_id,
                ..Default::default()
            }),
        ),
        Event::ExecStarted {
            container_id,
            exec_id,
            pid,
        } => (
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id,
                exec_id,
                pid,
                ..Default::default()
            }),
        ),
        Event::Exit {
            container_id,
            id,
            pid,
            exit,
        } => (
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id,
                id,
                pid,
                exit_status: exit.status,
                exited_at: timestamp(&exit),
                ..Default::default()
            }),
        ),
        Event::Oom { container_id } => (
            topics::TASK_OOM_EVENT_TOPIC,
            Box::new(TaskOOM {
                container_id,
                ..Default::default()
            }),
        ),
        Event::Paused { container_id } => (
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id,
                ..Default::default()
            }),
        ),
        Event::Resumed { container_id } => (
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id,
                ..Default::default()
            }),
        ),
        Event::Delete {
            container_id,
            pid,
            exit,
        } => (
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                id: container_id.clone(),
                container_id,
                pid,
                exit_status: exit.status,
                exited_at: timestamp(&exit),
                ..Default::default()
            }),
        ),
    }
}
