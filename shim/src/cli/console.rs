//! `shoji console SANDBOX`: an interactive shell in a running sandbox's guest, outside every
//! container, for debugging. Allowed only when this host's configuration says
//! `debug_console = true` *and* the sandbox was booted with it (the agent checks the
//! latter too: the kernel command line it was booted with). Every use is recorded in the
//! sandbox's `debug-console.log` (kept with its logs) and in the guest console.
use std::{io::Write, path::Path};

use serde_json::json;
use shoji_agent_api::{stream::StreamKind, types::DebugConsoleRequest, DEBUG_CONSOLE_CONTAINER};
use slog::{info, Logger};

use super::{
    terminal::{attach_tty, forward_winch, interrupted, terminal_size, DRAIN},
    CliError,
};
use crate::{
    agent_client::AgentClient,
    config::Config,
    node::{self, Status},
    sandbox::{logs::DEBUG_CONSOLE_LOG, validate_id},
};

/// Opens a shell in sandbox `prefix` (its id or a unique prefix) on this terminal; returns
/// the shell's exit status.
pub async fn console(config: &Config, prefix: &str, log: &Logger) -> Result<i32, CliError> {
    if !config.debug_console {
        return Err(CliError::Refused(
            "the debug console is off: set debug_console = true in shoji's configuration \
             (--config FILE, $SHOJI_CONFIG or /etc/shoji/config.toml); it applies to sandboxes \
             booted after that"
                .into(),
        ));
    }
    let id = node::resolve(&config.run_dir, prefix).map_err(CliError::Refused)?;
    let dir = config.run_dir.join(&id);
    let view = node::view(&id, &dir);
    if view.status != Status::Running {
        return Err(CliError::Refused(format!(
            "sandbox {id} is {}, not running",
            view.status.as_str()
        )));
    }
    if !view.state.info.as_ref().is_some_and(|i| i.debug_console) {
        return Err(CliError::Refused(format!(
            "sandbox {id} was booted without the debug console (debug_console = true \
             applies to sandboxes booted after it was set)"
        )));
    }
    let agent = AgentClient::connect(
        &crate::sandbox::agent_socket(&dir),
        config.timeouts.agent_call,
    )
    .await?;
    let (cols, rows) = terminal_size().unwrap_or((80, 24));
    let (exec_id, guest_pid) = agent
        .start_debug_console(DebugConsoleRequest {
            term: std::env::var("TERM").unwrap_or_default(),
            width: cols,
            height: rows,
            ..Default::default()
        })
        .await?;
    // The guest names the process: it must fit a stream header.
    validate_id("debug console id", &exec_id)
        .map_err(|e| CliError::Refused(format!("the guest answered with {e}")))?;
    let opened = json!({"exec": exec_id, "guest_pid": guest_pid});
    audit(&dir, &id, "opened", opened, log);
    eprintln!("shoji: debug console of sandbox {id} (logged); leave with `exit`\r");

    let conn = agent
        .open_stream(StreamKind::Tty, DEBUG_CONSOLE_CONTAINER, &exec_id)
        .await?;
    let (output, raw) = attach_tty(conn);
    tokio::spawn(forward_winch(
        agent.clone(),
        DEBUG_CONSOLE_CONTAINER,
        exec_id.clone(),
    ));
    let ended = tokio::select! {
        exit = agent.wait_process(DEBUG_CONSOLE_CONTAINER, &exec_id) => exit.map_err(CliError::from),
        sig = interrupted() => Err(CliError::Interrupted(sig)),
    };
    let _ = tokio::time::timeout(DRAIN, output).await;
    drop(raw);
    let status = ended.as_ref().map_or(-1, |e| e.exit_status);
    audit(
        &dir,
        &id,
        "closed",
        json!({"exec": exec_id, "status": status}),
        log,
    );
    // A status beyond a byte cannot come from a shell.
    Ok(ended?.exit_status.clamp(0, 255))
}

/// Records a console use: one JSON line in the sandbox's `debug-console.log` (when, which
/// event, and who on the host: uid, `$SUDO_USER`/`$USER`, the CLI's pid), and the CLI's log.
fn audit(dir: &Path, id: &str, event: &str, detail: serde_json::Value, log: &Logger) {
    info!(log, "debug console {}", event; "sandbox" => id, "detail" => %detail);
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_default();
    let line = json!({
        "ts": ts,
        "msg": format!("debug console {event}"),
        "sandbox": id,
        // SAFETY: getuid(2) has no preconditions.
        "uid": unsafe { libc::getuid() },
        "user": user,
        "cli_pid": std::process::id(),
        "detail": detail,
    });
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(DEBUG_CONSOLE_LOG))
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("shoji: cannot record the console use in {DEBUG_CONSOLE_LOG}: {e}\r");
    }
}
