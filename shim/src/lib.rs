//! shoji, host side: the containerd shim, its sandbox (one microVM per pod) and the
//! operator CLI. See docs/architecture.md for how a request flows through these modules.

pub mod agent_client;
pub mod bootstrap;
pub mod check;
pub mod cli;
pub mod config;
pub mod events;
pub mod host_cgroup;
pub mod hypervisor;
pub mod io;
pub mod kvm;
pub mod logging;
pub mod network;
pub mod pod;
pub mod process;
pub mod sandbox;
pub mod sharefs;
pub mod task;
