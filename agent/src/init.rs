//! Guest bring-up as PID 1: tmpfs root, mounts, cgroups, hostname, share; clean power-off.
//!
//! The kernel starts `/init` on the initramfs (rootfs), where pivot_root(2) fails with EINVAL,
//! and libcontainer needs it for each container. So the first run mounts a fresh tmpfs,
//! moves it over `/`, chroots into it and re-executes itself (the classic switch_root);
//! [`ROOT_SWITCHED_ENV`] tells the second run it already happened.
use std::{
    ffi::CString,
    fs,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::{
    mount::{mount, MsFlags},
    sys::reboot::{reboot, RebootMode},
    unistd::{chdir, chroot, fexecve, sethostname, sync},
};
use shoji_agent_api::{
    CMDLINE_DEBUG_CONSOLE, CMDLINE_HOSTNAME, CMDLINE_LOG_LEVEL, CMDLINE_PAGE_REPORTING_ORDER,
    CMDLINE_SHARE_TAG, GUEST_SHARE_DIR,
};
use slog::{error, info, warn};

use crate::{
    cgroup,
    logger::{log, ms_since},
    network, server,
};

/// Set (to the switch's start time in µs since the epoch) when `/` is already the tmpfs.
const ROOT_SWITCHED_ENV: &str = "SHOJI_AGENT_ROOT_SWITCHED_AT";
const NEW_ROOT: &str = "/newroot";

/// Settings the host passes on the kernel command line.
#[derive(Debug, Default, PartialEq)]
pub struct Cmdline {
    pub share_tag: Option<String>,
    pub log_level: Option<String>,
    pub hostname: Option<String>,
    /// `shoji.debug_console=1`: the host allows debug consoles.
    pub debug_console: bool,
    /// `shoji.page_reporting_order=N`: see [`report_free_blocks_from`].
    pub page_reporting_order: Option<u32>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut c = Cmdline::default();
        for word in text.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let value = Some(value.to_string()).filter(|v| !v.is_empty());
            match key {
                CMDLINE_SHARE_TAG => c.share_tag = value,
                CMDLINE_LOG_LEVEL => c.log_level = value,
                CMDLINE_HOSTNAME => c.hostname = value,
                CMDLINE_DEBUG_CONSOLE => c.debug_console = value.as_deref() == Some("1"),
                CMDLINE_PAGE_REPORTING_ORDER => {
                    // Orders above 10 are not free-list orders in Linux 6.1 (MAX_ORDER 11).
                    c.page_reporting_order = value.and_then(|v| v.parse().ok()).filter(|o| *o <= 10)
                }
                _ => {}
            }
        }
        c
    }
}

/// Milliseconds spent in each phase of bring-up, logged with readiness.
#[derive(Debug, Default, Clone, Copy)]
struct BootTimes {
    /// From the first run's start to the second run's start (the switch to a tmpfs root).
    root_switch_ms: Option<f64>,
    mounts_ms: f64,
    share_ms: f64,
    /// The second run's start to serving (mounts, share, runtime, lo).
    init_ms: f64,
}

/// PID 1's whole life; never returns (the VM powers off).
pub fn run() -> ! {
    let started = Instant::now();
    let mut times = BootTimes::default();
    let switch_started_us = match std::env::var(ROOT_SWITCHED_ENV) {
        Ok(v) => v.parse::<u64>().ok(),
        Err(_) => {
            // Nothing can be logged yet: on failure the kernel panics and the host sees it.
            switch_root()
                .unwrap_or_else(|e| panic!("shoji-agent: moving / onto a tmpfs failed: {e}"));
            unreachable!("switch_root returns only on error");
        }
    };
    times.root_switch_ms = switch_started_us.map(|t| now_us().saturating_sub(t) as f64 / 1000.0);
    tune_malloc();
    if let Err(e) = mount_basics() {
        panic!("shoji-agent: mounting the basic filesystems failed: {e}");
    }
    times.mounts_ms = ms_since(started);
    let cmdline = Cmdline::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    crate::logger::init(cmdline.log_level.as_deref().unwrap_or("info"));

    if let Err(e) = cgroup::init_root() {
        error!(log(), "cgroup setup failed, containers will not run"; "error" => %e);
    }
    if let Some(order) = cmdline.page_reporting_order {
        report_free_blocks_from(order);
    }
    if let Some(name) = &cmdline.hostname {
        if let Err(e) = sethostname(name) {
            warn!(log(), "setting the hostname failed"; "hostname" => name, "error" => %e);
        }
    }
    if let Some(tag) = &cmdline.share_tag {
        let t = Instant::now();
        if let Err(e) = mount_share(tag) {
            error!(log(), "mounting the shared directory failed"; "tag" => tag, "error" => %e);
        }
        times.share_ms = ms_since(t);
    }

    // One worker per vCPU (at most two): the agent mostly waits.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("shoji-agent: starting the tokio runtime failed: {e}"));
    let result = runtime.block_on(async move {
        if let Err(e) = network::loopback_up().await {
            warn!(log(), "bringing up lo failed"; "error" => %e);
        }
        let times = BootTimes {
            init_ms: ms_since(started),
            ..times
        };
        let serving = match server::start(cmdline.debug_console).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        expedite_rcu(false);
        // The first helper's start is paid while the host prepares its first request.
        crate::container::standby::replenish();
        if serving.announced {
            info!(log(), "agent ready";
                "since_boot_ms" => uptime_ms(), "root_switch_ms" => times.root_switch_ms,
                "mounts_ms" => times.mounts_ms, "share_ms" => times.share_ms,
                "init_ms" => times.init_ms, "seccomp" => "libseccomp, linked statically",
                "debug_console" => cmdline.debug_console);
        }
        serving.wait().await
    });
    error!(log(), "agent server failed, powering off"; "error" => %result);
    power_off()
}

fn uptime_ms() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .unwrap_or(0.0)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Makes a fresh tmpfs `/` and re-executes the agent there.
///
/// The binary is not copied: it is re-executed through an fd opened before the switch
/// (the initramfs stays allocated underneath, as a copy would be; helpers later run it
/// through /proc/self/exe).
fn switch_root() -> Result<(), nix::Error> {
    let start = now_us();
    let io = |e: std::io::Error| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    let exe = fs::File::open("/init").map_err(io)?;
    fs::create_dir_all(NEW_ROOT).map_err(io)?;
    mount(
        Some("rootfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        fs::create_dir_all(Path::new(NEW_ROOT).join(dir)).map_err(io)?;
    }
    chdir(NEW_ROOT)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    chroot(".")?;
    chdir("/")?;
    let argv = [CString::new("/init").unwrap()];
    let env = [CString::new(format!("{ROOT_SWITCHED_ENV}={start}")).unwrap()];
    fexecve(&exe, &argv, &env)?;
    Ok(())
}

/// Lets the guest report free blocks of `2^order` pages to the host's free page reporting
/// (the balloon device's queue), not only whole 2 MiB ones: what the guest frees after boot
/// (the compressed initramfs, init sections) is mostly in smaller blocks.
fn report_free_blocks_from(order: u32) {
    const PARAM: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
    if let Err(e) = fs::write(PARAM, order.to_string()) {
        warn!(log(), "setting the page reporting order failed"; "order" => order, "error" => %e);
    }
}

/// Whether RCU grace periods are expedited. An ordinary one takes 10–30 ms at the guest's
/// 100 Hz tick, and the agent's start-up waits for several (the `favordynmods` cgroup mount
/// alone ~25 ms). The kernel expedites them until it starts PID 1; the agent goes on doing
/// so until it is ready, and then stops (containers' execs measured slower with it).
/// Best effort: it only costs time.
fn expedite_rcu(on: bool) {
    let _ = fs::write("/sys/kernel/rcu_expedited", if on { "1" } else { "0" });
}

/// Keeps the agent's heap small: one arena (the agent is mostly idle and the tokio
/// workers are few) and a fixed mmap threshold, so that large request buffers go back
/// to the kernel when freed instead of raising glibc's dynamic thresholds.
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * 1024);
    }
}

/// One mount, tolerating "already mounted" (a re-run or a kernel that automounted it).
fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(e) => Err(format!("mount {fstype} on {target}: {e}")),
    }
}

fn mount_basics() -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    expedite_rcu(true);
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "run",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    // favordynmods: moving a process into a cgroup (every create and exec) and enabling
    // controllers otherwise wait for an RCU grace period, 25 ms at the guest's 100 Hz tick.
    mount_fs(
        "cgroup2",
        cgroup::ROOT,
        "cgroup2",
        nodev,
        Some("favordynmods"),
    )?;
    Ok(())
}

/// The share holds the containers' rootfs: set-uid programs in an image work as with runc
/// (no_new_privs decides, per container). nosuid stays on the host side of every bind.
fn mount_share(tag: &str) -> Result<(), String> {
    mount_fs(tag, GUEST_SHARE_DIR, "virtiofs", MsFlags::MS_NODEV, None)
}

/// Flushes filesystems and powers the VM off.
pub fn power_off() -> ! {
    sync();
    // The log's writer thread gets a moment for the last lines.
    std::thread::sleep(Duration::from_millis(100));
    let e = reboot(RebootMode::RB_POWER_OFF).unwrap_err();
    panic!("shoji-agent: power-off failed: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keys() {
        let c = Cmdline::parse(
            "console=ttyS0 quiet shoji.share=pod1 shoji.log=debug shoji.hostname=web-0 shoji.x=1\n",
        );
        assert_eq!(
            c,
            Cmdline {
                share_tag: Some("pod1".into()),
                log_level: Some("debug".into()),
                hostname: Some("web-0".into()),
                debug_console: false,
                page_reporting_order: None,
            }
        );
        assert_eq!(
            Cmdline::parse("shoji.page_reporting_order=5").page_reporting_order,
            Some(5)
        );
        for bad in ["11", "-1", "x", ""] {
            let c = Cmdline::parse(&format!("shoji.page_reporting_order={bad}"));
            assert_eq!(c.page_reporting_order, None, "{bad}");
        }
        assert!(Cmdline::parse("quiet shoji.debug_console=1").debug_console);
        assert!(!Cmdline::parse("shoji.debug_console=0").debug_console);
        assert_eq!(
            Cmdline::parse("shoji.share= root=/dev/vda"),
            Cmdline::default()
        );
    }
}
