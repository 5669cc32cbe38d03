//! The `shoji` operator CLI's commands (the binary in `src/bin/shoji.rs` only parses
//! arguments): `vm run` boots a throwaway VM and runs one container in it ([`run`]),
//! `vm bench` measures boots ([`bench`]); `ps` ([`ps`]), `console` ([`console`]) and `logs`
//! ([`logs`]) look at the node's sandboxes.
pub mod bench;
pub mod console;
pub mod logs;
pub mod ps;
pub mod rootfs;
pub mod run;
pub mod run_spec;
mod terminal;

use crate::{
    agent_client::AgentError,
    config::Config,
    sandbox::{SandboxConfig, SandboxError},
};

pub use self::{
    bench::{bench_once, bench_table, BootSample},
    run::{run_vm, RunOptions},
};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    /// The request cannot be served as asked; the text says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// Unique sandbox ids for throwaway VMs.
fn throwaway_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:08x}", std::process::id())
}

fn sandbox_config(
    config: Config,
    id: &str,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
) -> SandboxConfig {
    let mut cfg = SandboxConfig::new(id, config);
    cfg.vcpus = vcpus.unwrap_or(cfg.vcpus);
    cfg.memory_mib = memory_mib.unwrap_or(cfg.memory_mib);
    cfg
}
