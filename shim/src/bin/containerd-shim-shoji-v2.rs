//! containerd-shim-shoji-v2: the containerd shim v2 of shoji (`io.containerd.shoji.v2`).
use shoji::containerd::{
    bootstrap::{self, ShojiShim},
    info, RUNTIME_TYPE,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // containerd 2.x asks `-info` for the runtime's identity and features; containerd-shim
    // 0.11's run() does not answer it.
    if args.iter().skip(1).any(|a| a == "-info") {
        std::io::Write::write_all(&mut std::io::stdout(), &info::runtime_info())
            .expect("write RuntimeInfo");
        return;
    }
    if args.iter().skip(1).any(|a| a == "-v" || a == "--version") {
        println!("containerd-shim-shoji-v2 {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    // One shim per pod, mostly waiting: two workers (not one per host CPU), few blocking
    // threads that do not linger, and two malloc arenas (glibc would make one per thread)
    // keep its memory small on large nodes.
    // SAFETY: mallopt only sets allocator parameters, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(containerd_shim::asynchronous::run::<ShojiShim>(
        RUNTIME_TYPE,
        Some(bootstrap::shim_config()),
    ));
    // Blocking work still pending (e.g. a FIFO open nobody answers) must not keep the shim alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
}
