//! The agent's log: slog JSON lines on the serial console (the host keeps them in console.log).
//!
//! Quiet at the default level (info): boot timing, readiness, failures. Per-request detail is debug.
use std::{
    fs::OpenOptions,
    io::Write,
    sync::{Mutex, OnceLock},
};

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
    let drain = Mutex::new(drain).map(slog::Fuse);
    let drain = slog::LevelFilter::new(drain, level).fuse();
    let _ = LOGGER.set(Logger::root(drain, o!("component" => "shoji-agent")));
}

/// The agent's logger (a discarding one before `init`).
pub fn log() -> &'static Logger {
    LOGGER.get_or_init(|| Logger::root(slog::Discard, o!()))
}
