//! Test harness: real containerd, real VMs.

pub mod backend;
pub mod bench;
pub mod bins;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod critest_images;
pub mod fake_agent;
pub mod fake_clh;
pub mod image;
pub mod leaks;
pub mod metrics;
pub mod oci;
pub mod pods;
pub mod registry;
pub mod scenario;
pub mod streaming;
pub mod vm;
