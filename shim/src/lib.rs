//! shoji, host side: the containerd shim, its sandbox (one microVM per pod) and the
//! operator CLI. See docs/architecture.md for how a request flows through these modules.

pub mod agent_client;
pub mod config;
pub mod hypervisor;
pub mod kvm;
pub mod process;
pub mod sandbox;
pub mod sharefs;
