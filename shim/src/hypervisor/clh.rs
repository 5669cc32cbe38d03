//! Cloud Hypervisor driver (REST API over a Unix socket).
