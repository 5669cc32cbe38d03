//! Structured logs: slog JSON lines, one logger per process, also catching the `log` facade
//! (which the containerd-shim crate uses) so every line has the same format.
use std::io::Write;

use slog::{o, Drain, Level, Logger};

/// Parses a configured level name; unknown names fall back to info.
pub fn level(name: &str) -> Level {
    match name {
        "error" => Level::Error,
        "warn" => Level::Warning,
        "debug" => Level::Debug,
        "trace" => Level::Trace,
        _ => Level::Info,
    }
}

/// A JSON logger writing to `out` at `level` and above.
pub fn json<W: Write + Send + 'static>(out: W, level: Level, component: &'static str) -> Logger {
    let drain = slog_json::Json::new(out).add_default_keys().build().fuse();
    let drain = slog::LevelFilter::new(std::sync::Mutex::new(drain).fuse(), level).fuse();
    Logger::root(drain, o!("component" => component))
}

/// Routes the `log` facade into `logger` for the life of the process.
pub fn capture_log_facade(logger: &Logger) {
    // The guard would restore the previous global logger when dropped: keep it forever.
    std::mem::forget(slog_scope::set_global_logger(logger.clone()));
    let _ = slog_stdlog::init();
}
