//! The containerd edge: the shim framework's entry points ([`bootstrap`]), the Task service
//! ([`task`]) and everything that speaks containerd's protobuf types (events, runtime
//! options, metrics); and [`pod_vm`], where the bootstrap joins the pod to its sandbox.
//! Below this module the shim works with its own types.
pub mod bootstrap;
pub mod events;
pub mod info;
pub mod options;
pub mod pod_vm;
pub mod stats;
pub mod task;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_TYPE: &str = "io.containerd.shoji.v2";
