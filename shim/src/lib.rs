//! shoji, host side: the containerd shim, its sandbox (one microVM per pod) and the
//! operator CLI. A request flows containerd → [`containerd`] (Task service) → [`pod`]
//! (containerd semantics) → [`sandbox`] (one VM and its host resources) →
//! [`hypervisor`] / [`network`] / [`sharefs`] / [`agent_client`] → the guest agent.
//! See docs/architecture.md.

pub mod agent_client;
pub mod call_stats;
pub mod check;
pub mod cli;
pub mod config;
pub mod containerd;
pub mod daemon;
pub mod host_cgroup;
pub mod hypervisor;
pub mod jail;
pub mod kvm;
pub mod logging;
pub mod logtail;
pub mod metrics;
pub mod network;
pub mod node;
pub mod oci;
pub mod pod;
pub mod port_forward;
pub mod private_file;
pub mod procfs;
pub mod sandbox;
pub mod sharefs;
pub mod stdio;
