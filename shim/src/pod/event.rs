//! What happened to the pod's tasks, in the order containerd must see it. The containerd
//! edge (`containerd::events`) turns each into its protobuf event and publishes them in
//! order through one queue.
use std::path::PathBuf;

use tokio::sync::mpsc;

use super::process::Exit;
use crate::stdio::StdioPaths;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Create {
        container_id: String,
        bundle: PathBuf,
        stdio: StdioPaths,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    /// `id` is the exec id, or the container id for the init process.
    Exit {
        container_id: String,
        id: String,
        pid: u32,
        exit: Exit,
    },
    Oom {
        container_id: String,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit: Exit,
    },
}

/// Where the pod sends its events. Unbounded so a slow containerd never blocks a process's
/// exit; what the guest can trigger (OOM events) is filtered and rate-limited before it.
pub type EventSender = mpsc::UnboundedSender<Event>;
