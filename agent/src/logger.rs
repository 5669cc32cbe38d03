//! The agent's log: slog JSON lines on the serial console (the host keeps them in console.log).
//!
//! Quiet at the default level (info): boot timing, readiness, failures. Per-request detail is debug.
//! Lines go through a bounded queue to a writer thread, so a slow console (a serial port under
//! emulation, a guest kernel flooding it) never stalls a request: when the queue is full,
//! lines are dropped and the drop is reported.
use std::{fs::OpenOptions, io::Write, sync::OnceLock, time::Instant};

use slog::{o, Drain, Level, Logger};

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// The console if it can be opened, else the inherited stderr (which the kernel points at the console too).
fn console() -> Box<dyn Write + Send> {
    match OpenOptions::new().write(true).open("/dev/console") {
        Ok(f) => Box::new(f),
        Err(_) => Box::new(std::io::stderr()),
    }
}

/// Installs the logger; the level comes from `shoji.log=` (error, warn, info, debug, trace).
pub fn init(level: &str) {
    let level = level.parse::<Level>().unwrap_or(Level::Info);
    let drain = slog_json::Json::new(console()).add_default_keys().build();
    let drain = slog_async::Async::new(drain.fuse())
        .chan_size(1024)
        .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
        .build()
        .fuse();
    let drain = slog::LevelFilter::new(drain, level).fuse();
    let _ = LOGGER.set(Logger::root(drain, o!("component" => "shoji-agent")));
}

/// The agent's logger (a discarding one before `init`).
pub fn log() -> &'static Logger {
    LOGGER.get_or_init(|| Logger::root(slog::Discard, o!()))
}

/// Milliseconds since `t`, fractional: the unit of the agent's phase timings in its logs.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
