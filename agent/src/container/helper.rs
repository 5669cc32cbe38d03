//! Helper mode: `shoji-agent helper <verb> <work-dir> <request-json>`, one verb per process.
use std::{fs::File, path::Path, sync::Mutex};

use serde::de::DeserializeOwned;

use super::{create, err_file, exec, log_file, pause, standby};

/// Exit status 0 on success; 1 with the error text in `<work-dir>/<verb>.err` on failure.
pub fn main(args: &[String]) -> i32 {
    if let [verb] = args {
        if verb == standby::VERB {
            return match standby::receive() {
                Ok(work) => main(&work),
                Err(_) => 1,
            };
        }
        if verb == pause::VERB {
            pause::hold();
        }
    }
    let [verb, work_dir, request] = args else {
        eprintln!("usage: shoji-agent helper <verb> <work-dir> <request-json>");
        return 2;
    };
    let work_dir = Path::new(work_dir);
    // Rust's runtime ignores SIGPIPE, and libcontainer's fork+exec would hand that on to
    // every container process (`yes | head` would then never end): restore the default.
    // SAFETY: single-threaded helper, before any child exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    send_tracing_to(&log_file(work_dir, verb));
    let result = match verb.as_str() {
        create::VERB => parse(request).and_then(create::run),
        exec::VERB => parse(request).and_then(exec::run),
        other => Err(format!("unknown helper verb {other:?}")),
    };
    match result {
        Ok(()) => 0,
        Err(message) => {
            let _ = std::fs::write(err_file(work_dir, verb), &message);
            1
        }
    }
}

fn parse<T: DeserializeOwned>(request: &str) -> Result<T, String> {
    serde_json::from_str(request).map_err(|e| format!("bad helper request: {e}"))
}

/// libcontainer logs through `tracing`: keep it in a private file (opened close-on-exec),
/// never on the container's stdio.
fn send_tracing_to(path: &Path) {
    if let Ok(file) = File::create(path) {
        let _ = tracing_subscriber::fmt()
            .with_writer(Mutex::new(file))
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .try_init();
    }
}
