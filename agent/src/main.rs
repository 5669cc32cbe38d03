//! shoji-agent: PID 1 of a shoji microVM.
//!
//! Run by the kernel as `/init`, it prepares the guest (`init`), reaps every process
//! (`reaper`), serves the agent API on vsock (`server`; stdio and port-forward streams: `streams`, `io`, `forward`) and runs containers through
//! short-lived single-threaded copies of itself (`shoji-agent helper <verb> ...`, see
//! `container`), so libcontainer never runs inside the multi-threaded PID 1.
mod cgroup;
mod container;
mod forward;
mod guest;
mod init;
mod io;
mod logger;
mod network;
mod oom;
mod reaper;
mod runtime;
mod server;
mod streams;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(container::HELPER_ARG) {
        std::process::exit(container::helper::main(&args[2..]));
    }
    if std::process::id() != 1 {
        eprintln!(
            "shoji-agent runs as PID 1 of a shoji VM (or as `shoji-agent helper <verb> <request>`)"
        );
        std::process::exit(2);
    }
    init::run()
}
