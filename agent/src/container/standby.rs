//! A helper started ahead of need (`shoji-agent helper standby`), waiting on a control socket
//! for what a helper otherwise gets on its command line: the verb, the work dir, the request,
//! and the fds to place at fixed numbers.
//!
//! Under emulation a helper's start (exec of the static agent, its page faults, libc and Rust
//! start-up) costs 70–100 ms. A standby pays it while the VM waits for the host anyway (after
//! the agent announced itself, after each helper; at nice 19, so only with a vCPU nothing else
//! wants), so create and exec do not. Without a standby (two helpers at once, or it died) a
//! helper is started afresh, as before.
use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd},
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Instant,
};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use slog::debug;

use super::{agent_command, move_fds, FD_STDERR, HELPER_ARG};
use crate::logger::log;

pub const VERB: &str = "standby";
/// The standby's nice value until it gets work.
const NICE_WAITING: libc::c_int = 19;
/// Stdin, stdout, stderr at most.
const MAX_FDS: usize = 3;
/// A request also fits one command-line argument (128 KiB), which is what it replaces.
const MAX_MESSAGE: usize = 256 * 1024;

struct Standby {
    pid: i32,
    born: Instant,
    control: OwnedFd,
}

/// The one waiting standby. PID 1 is one per VM, so the slot is too.
static SLOT: Mutex<Option<Standby>> = Mutex::new(None);
/// A standby is being started (outside the slot's lock).
static STARTING: AtomicBool = AtomicBool::new(false);

#[derive(Serialize, Deserialize)]
struct Work {
    verb: String,
    work_dir: String,
    request: String,
    /// The fd number each passed fd goes to, in the order they were passed.
    targets: Vec<RawFd>,
}

/// Starts a standby unless one is waiting or starting. A failure only costs speed.
pub fn replenish() {
    // The slot is not held while the standby starts: a create or exec arriving meanwhile
    // takes a fresh helper instead of blocking an agent worker on this lock.
    if SLOT.lock().unwrap().is_some() || STARTING.swap(true, Ordering::AcqRel) {
        return;
    }
    let started = start();
    STARTING.store(false, Ordering::Release);
    match started {
        Ok(s) => {
            debug!(log(), "standby started"; "pid" => s.pid, "ms" => s.born.elapsed().as_millis() as u64);
            *SLOT.lock().unwrap() = Some(s);
        }
        Err(e) => debug!(log(), "no standby helper"; "error" => %e),
    }
}

fn start() -> std::io::Result<Standby> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // Its end of the control socket is its stdin. No code runs between fork and exec, so std
    // spawns it with posix_spawn (vfork): a fork would copy the agent's page tables and make
    // every page the agent writes until the exec fault (dear under TCG, and the exec competes
    // with the caller the standby is for). Linux keeps nice per thread and a child inherits
    // its creator's: this (blocking-pool) thread spawns at NICE_WAITING, so the standby's exec
    // and start-up run only on a vCPU nothing else wants, then it goes back to 0.
    set_nice(NICE_WAITING)?;
    let born = Instant::now();
    let spawned = agent_command(&[HELPER_ARG, VERB])
        .stdin(Stdio::from(theirs))
        .spawn();
    set_nice(0)?;
    Ok(Standby {
        pid: spawned?.id() as i32,
        born,
        control: ours,
    })
}

/// Gives a helper's work to the waiting standby; its pid and start time if it took it.
pub fn hand_over(
    verb: &str,
    work_dir: &Path,
    request: &str,
    fds: &[(RawFd, BorrowedFd<'_>)],
) -> Option<(i32, Instant)> {
    let standby = SLOT.lock().unwrap().take()?;
    let work = Work {
        verb: verb.to_string(),
        work_dir: work_dir.to_string_lossy().into_owned(),
        request: request.to_string(),
        targets: fds.iter().map(|(target, _)| *target).collect(),
    };
    let message = serde_json::to_vec(&work).expect("work serializes");
    let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    // Full priority before it can start on the work: a standby still starting up at nice 19
    // beside a busy container would otherwise take seconds (an exec probe's deadline is 1 s).
    // SAFETY: setpriority(2) only; a standby that died since left its pid free (reaped).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, standby.pid as libc::id_t, 0) };
    let iov = [IoSlice::new(&message)];
    match sendmsg::<()>(
        standby.control.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::empty(),
        None,
    ) {
        Ok(_) => Some((standby.pid, standby.born)),
        // Dropping the control socket ends a standby that is still alive.
        Err(e) => {
            debug!(log(), "standby helper unusable"; "pid" => standby.pid, "error" => %e);
            None
        }
    }
}

/// Standby side: waits (at the nice it inherited, 19; the agent raises it before sending) for
/// the work and places the fds; returns [verb, work dir, request].
pub fn receive() -> Result<[String; 3], String> {
    let control = take_control()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        control.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("standby: receiving work: {e}"))?;
    let len = msg.bytes;
    let mut received = Vec::new();
    for c in msg.cmsgs().map_err(|e| format!("standby: {e}"))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just installed these fds in this process for us alone.
            received.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if len == 0 {
        return Err("standby: the agent closed the control socket".into());
    }
    let work: Work = serde_json::from_slice(&buf[..len]).map_err(|e| format!("standby: {e}"))?;
    if work.targets.len() != received.len() {
        return Err(format!(
            "standby: {} fds for {} targets",
            received.len(),
            work.targets.len()
        ));
    }
    place(received, &work.targets)?;
    Ok([work.verb, work.work_dir, work.request])
}

/// Sets the calling thread's nice value (setpriority(2) with who 0 is per thread on Linux).
fn set_nice(nice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setpriority(2) on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The control socket arrives as stdin: moved to a close-on-exec fd above every target number
/// (`place` overwrites those), and /dev/null put at 0 (a helper without stdio hands its own
/// on to the container, as a fresh helper does).
fn take_control() -> Result<OwnedFd, String> {
    let fail = |what: &str, e: std::io::Error| format!("standby: {what}: {e}");
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd (> FD_STDERR) or -1.
    let high = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, FD_STDERR + 1) };
    if high < 0 {
        return Err(fail(
            "taking the control socket",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new fd only this function refers to.
    let control = unsafe { OwnedFd::from_raw_fd(high) };
    let null = std::fs::File::open("/dev/null").map_err(|e| fail("opening /dev/null", e))?;
    // SAFETY: dup2 onto stdin, whose old description (the socket) lives on in `control`.
    if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
        return Err(fail(
            "stdin from /dev/null",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(control)
}

/// Moves each fd to its target number (without close-on-exec, as an inherited fd would be).
fn place(fds: Vec<OwnedFd>, targets: &[RawFd]) -> Result<(), String> {
    let raw: Vec<RawFd> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    let moves: Vec<(RawFd, RawFd)> = raw.iter().copied().zip(targets.iter().copied()).collect();
    let parked = move_fds(&moves).map_err(|e| format!("standby: placing fds: {e}"))?;
    // The parked copies, and every received fd that no move overwrote, are ours to close.
    for fd in parked
        .into_iter()
        .chain(raw.into_iter().filter(|fd| !targets.contains(fd)))
    {
        // SAFETY: fds this process owns and nothing else refers to.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io::{Read, Write},
    };

    use super::*;

    #[test]
    fn place_swaps_fds_whose_targets_are_each_others_numbers() {
        let (a_read, a_write) = nix::unistd::pipe().unwrap();
        let (b_read, b_write) = nix::unistd::pipe().unwrap();
        let (a, b) = (a_read.as_raw_fd(), b_read.as_raw_fd());
        place(vec![a_read, b_read], &[b, a]).unwrap();
        File::from(a_write).write_all(b"from a").unwrap();
        File::from(b_write).write_all(b"from b").unwrap();
        // SAFETY: place() left these two numbers open and owned by nobody.
        let (at_b, at_a) = unsafe { (File::from_raw_fd(b), File::from_raw_fd(a)) };
        let read = |mut f: File| {
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(read(at_b), "from a");
        assert_eq!(read(at_a), "from b");
    }
}
