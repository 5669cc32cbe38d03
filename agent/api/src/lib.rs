//! The contract between the shoji shim (host) and shoji-agent (guest PID 1).
//!
//! * Control: the ttrpc service `Agent` on vsock port [`AGENT_PORT`] (see `proto/agent.proto`).
//! * Readiness: once serving, the agent connects to the host (CID 2) on [`READY_PORT`] and
//!   writes [`READY_LINE`]. The host dials the agent only after that (this also sidesteps a
//!   vhost-device-vsock bug with connects that arrive while the device starts).
//! * Process stdio: one vsock connection per stream on [`IO_PORT`], see [`stream`].
//! * Port-forward: one connection per forwarded TCP connection on [`IO_PORT`], see [`forward`].

pub mod forward;
pub mod stream;

#[allow(warnings, clippy::all)]
mod empty {
    include!(concat!(env!("OUT_DIR"), "/gen/empty.rs"));
}
#[allow(warnings, clippy::all)]
mod agent_pb {
    include!(concat!(env!("OUT_DIR"), "/gen/agent.rs"));
}
#[allow(warnings, clippy::all)]
mod agent_ttrpc_gen {
    include!(concat!(env!("OUT_DIR"), "/gen/agent_ttrpc.rs"));
}

/// Messages of the agent API.
pub mod types {
    pub use crate::agent_pb::*;
    pub use crate::empty::Empty;
}
/// The generated ttrpc service trait (`Agent`), its registration and the client (`AgentClient`).
pub mod ttrpc_api {
    pub use crate::agent_ttrpc_gen::*;
}

// The generated code names the messages by their module paths.
pub(crate) use agent_pb as agent;

/// vsock port of the agent's ttrpc service.
pub const AGENT_PORT: u32 = 1024;
/// vsock port of the agent's stdio stream listener.
pub const IO_PORT: u32 = 1025;
/// vsock port on the host (CID 2) that the agent connects to when it is ready.
pub const READY_PORT: u32 = 1026;
/// What the agent writes on the readiness connection.
pub const READY_LINE: &str = "SHOJI-AGENT-READY\n";

/// Where the agent mounts the virtio-fs share inside the guest.
pub const GUEST_SHARE_DIR: &str = "/run/shoji/shared";
/// Kernel command line key naming the virtio-fs tag to mount at [`GUEST_SHARE_DIR`].
pub const CMDLINE_SHARE_TAG: &str = "shoji.share";
/// Kernel command line key for the agent's log level (error, warn, info, debug).
pub const CMDLINE_LOG_LEVEL: &str = "shoji.log";
/// Kernel command line key for the guest hostname.
pub const CMDLINE_HOSTNAME: &str = "shoji.hostname";
/// Kernel command line key: `shoji.debug_console=1` (the host's `debug_console = true` at
/// boot) allows StartDebugConsole; without it the agent refuses the call.
pub const CMDLINE_DEBUG_CONSOLE: &str = "shoji.debug_console";
/// Kernel command line key: the smallest free block (a page order) the guest reports to the
/// host through free page reporting. Linux 6.1 resets its own `page_reporting.page_reporting_order`
/// to 2 MiB blocks (order 9) when the balloon registers, so the agent sets it once it runs.
pub const CMDLINE_PAGE_REPORTING_ORDER: &str = "shoji.page_reporting_order";
/// Where the host shares a static busybox for the debug console, relative to
/// [`GUEST_SHARE_DIR`] (a name no container id can take).
pub const DEBUG_SHELL_REL: &str = ".shoji-debug/busybox";
/// The pseudo container id of debug console processes: their stdio streams, WaitProcess,
/// ResizeTty and SignalProcess name it with the exec id StartDebugConsole returned. No
/// container id can start with a dot.
pub const DEBUG_CONSOLE_CONTAINER: &str = ".debug-console";
