//! Test harness: real containerd, real VMs.

pub mod containerd;
pub mod image;
pub mod fake_clh;
