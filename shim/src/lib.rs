//! shoji, host side: the containerd shim, its sandbox (one microVM per pod) and the
//! operator CLI. See docs/architecture.md for how a request flows through these modules.

pub mod hypervisor;
pub mod process;
pub mod sharefs;
