//! Boots one sandbox the way the shim would for a pod (in a network namespace, joined to a
//! host cgroup) and keeps it until killed: for crash tests of `shoji cleanup`.
//!
//!   boot-sandbox CONFIG ID NETNS CGROUP
//!
//! Prints `ready` once the sandbox runs; exits 1 with the error if the boot fails.
use std::path::PathBuf;

use shoji::{
    config::Config,
    sandbox::{Sandbox, SandboxConfig},
};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, config, id, netns, cgroup] = args.as_slice() else {
        eprintln!("usage: boot-sandbox CONFIG ID NETNS CGROUP");
        std::process::exit(2);
    };
    let config = Config::from_file(std::path::Path::new(config)).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let mut cfg = SandboxConfig::new(id, config);
    cfg.netns = Some(PathBuf::from(netns));
    cfg.cgroup = Some(cgroup.clone());
    let log = slog::Logger::root(slog::Discard, slog::o!());
    match Sandbox::start(cfg, log).await {
        Ok(_sandbox) => {
            println!("ready");
            std::future::pending::<()>().await
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}
