//! An in-process [`GuestOs`] for the runtime's unit tests. A process is a row: its pid, its
//! cgroup, the stdio ends it holds (copies of what the runtime passed) and its exit, handed
//! to whoever reaps it. A process ends by `exit` or by a signal it does not ignore; its ends
//! close with it, so output streams see EOF as they would. Tests make a process write,
//! fork a child that keeps its output open, ignore a signal; make a verb fail once or wait
//! at a gate; and read back every call the runtime made, in order.
use std::{
    collections::HashMap,
    fs,
    io::{IoSlice, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use async_trait::async_trait;
use nix::{
    pty::openpty,
    sys::{
        signal::Signal,
        socket::{sendmsg, ControlMessage, MsgFlags},
    },
};
use tokio::sync::{oneshot, Semaphore};

use super::{
    guest_os::{GuestOs, NewStdio},
    RuntimeError,
};
use crate::{
    container::{kill::KillError, rootfs::RootfsError, HelperError},
    reaper::Exit,
};

/// The fake pause process's cgroup.
pub const POD_CGROUP: &str = "/pod";

struct Proc {
    cgroup: PathBuf,
    /// What the process holds of its stdio: stdin, stdout, stderr (or the pty slave).
    stdio: Vec<OwnedFd>,
    ignores: Vec<Signal>,
    exit: Option<Exit>,
    reaper: Option<oneshot::Sender<Exit>>,
}

#[derive(Default)]
struct State {
    next_pid: i32,
    procs: HashMap<i32, Proc>,
    calls: Vec<String>,
    /// Verb → the error its next call returns.
    failures: HashMap<&'static str, String>,
}

impl State {
    fn new_pid(&mut self) -> i32 {
        self.next_pid += 1;
        100 + self.next_pid
    }
}

#[derive(Default)]
pub struct FakeGuest {
    state: Mutex<State>,
    /// Verb → a gate its calls wait at (see [`FakeGuest::gate`]).
    gates: Mutex<HashMap<&'static str, Arc<Semaphore>>>,
}

impl FakeGuest {
    /// The next call of `verb` ("pause", "create", "start", "exec", "sysctl") fails with `message`.
    pub fn fail_next(&self, verb: &'static str, message: &str) {
        self.state
            .lock()
            .unwrap()
            .failures
            .insert(verb, message.to_string());
    }

    /// From now on, calls of `verb` wait until [`Gate::open`] lets one through.
    pub fn gate(&self, verb: &'static str) -> Gate {
        let s = Arc::new(Semaphore::new(0));
        self.gates.lock().unwrap().insert(verb, s.clone());
        Gate(s)
    }

    /// Every call so far, e.g. `create c1`, `signal 101 SIGTERM`, `signal_all c1 SIGKILL`.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Whether any call so far starts with `prefix`.
    pub fn called(&self, prefix: &str) -> bool {
        self.calls().iter().any(|c| c.starts_with(prefix))
    }

    /// Writes to the process's stdout (or its tty).
    pub fn write_stdout(&self, pid: i32, bytes: &[u8]) {
        let s = self.state.lock().unwrap();
        let p = &s.procs[&pid];
        let fd = p.stdio.get(1).unwrap_or(&p.stdio[0]);
        fs::File::from(fd.try_clone().unwrap())
            .write_all(bytes)
            .unwrap();
    }

    /// A child of `pid` in the same cgroup, holding the same stdio (as a forked server's
    /// worker does); returns its pid.
    pub fn fork(&self, pid: i32) -> i32 {
        let mut s = self.state.lock().unwrap();
        let parent = &s.procs[&pid];
        let child = Proc {
            cgroup: parent.cgroup.clone(),
            stdio: parent
                .stdio
                .iter()
                .map(|f| f.try_clone().unwrap())
                .collect(),
            ignores: parent.ignores.clone(),
            exit: None,
            reaper: None,
        };
        let child_pid = s.new_pid();
        s.procs.insert(child_pid, child);
        child_pid
    }

    /// Makes the process ignore `signal`.
    pub fn ignore(&self, pid: i32, signal: Signal) {
        self.state
            .lock()
            .unwrap()
            .procs
            .get_mut(&pid)
            .unwrap()
            .ignores
            .push(signal);
    }

    /// Ends the process with `status` now.
    pub fn exit(&self, pid: i32, status: i32) {
        self.exit_at(pid, status, SystemTime::now());
    }

    /// Ends the process with `status`, as if it had ended at `at`.
    pub fn exit_at(&self, pid: i32, status: i32, at: SystemTime) {
        end(&mut self.state.lock().unwrap(), pid, Exit { status, at });
    }

    /// Ends the process without telling whoever reaps it until [`FakeGuest::exit`]: the
    /// moment between a process's death and its reaping.
    pub fn vanish(&self, pid: i32) {
        let mut s = self.state.lock().unwrap();
        let p = s.procs.get_mut(&pid).unwrap();
        p.exit = Some(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        p.stdio.clear();
    }

    /// The pid of the newest process.
    pub fn last_pid(&self) -> i32 {
        100 + self.state.lock().unwrap().next_pid
    }

    /// The window size of the process's tty: (columns, rows).
    pub fn tty_size(&self, pid: i32) -> (u16, u16) {
        let s = self.state.lock().unwrap();
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize to the pointer.
        let r = unsafe {
            libc::ioctl(
                s.procs[&pid].stdio[0].as_raw_fd(),
                libc::TIOCGWINSZ,
                &mut ws,
            )
        };
        assert_eq!(r, 0, "the process has no tty");
        (ws.ws_col, ws.ws_row)
    }

    /// Whether the process runs.
    pub fn alive(&self, pid: i32) -> bool {
        self.state
            .lock()
            .unwrap()
            .procs
            .get(&pid)
            .is_some_and(|p| p.exit.is_none())
    }

    fn record(&self, verb: &'static str, call: String) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(call);
        match s.failures.remove(verb) {
            Some(message) => Err(message),
            None => Ok(()),
        }
    }

    async fn pass_gate(&self, verb: &'static str) {
        let gate = self.gates.lock().unwrap().get(verb).cloned();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
    }

    /// A new process in `cgroup`, holding `stdio` (a tty: the slave of a new pty whose
    /// master goes to the console socket, as libcontainer sends it).
    fn spawn(&self, cgroup: PathBuf, stdio: Option<NewStdio<'_>>) -> i32 {
        let stdio = match stdio {
            None => vec![],
            Some(NewStdio::Pipes(fds)) => fds
                .iter()
                .map(|f| f.try_clone_to_owned().unwrap())
                .collect(),
            Some(NewStdio::Console(socket)) => {
                let pty = openpty(None, None).unwrap();
                let conn = UnixStream::connect(socket).unwrap();
                let fds = [pty.master.as_raw_fd()];
                sendmsg::<()>(
                    conn.as_raw_fd(),
                    &[IoSlice::new(b"pty")],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .unwrap();
                vec![pty.slave]
            }
        };
        let mut s = self.state.lock().unwrap();
        let pid = s.new_pid();
        s.procs.insert(
            pid,
            Proc {
                cgroup,
                stdio,
                ignores: vec![],
                exit: None,
                reaper: None,
            },
        );
        pid
    }

    fn deliver(&self, pid: i32, signal: Signal) -> Result<(), KillError> {
        let mut s = self.state.lock().unwrap();
        let p = s.procs.get(&pid).ok_or(KillError::Gone)?;
        if p.exit.is_some() {
            return Err(KillError::Gone);
        }
        if signal != Signal::SIGKILL && p.ignores.contains(&signal) {
            return Ok(());
        }
        let exit = Exit {
            status: 128 + signal as i32,
            at: SystemTime::now(),
        };
        end(&mut s, pid, exit);
        Ok(())
    }

    fn live_in(&self, cgroup: &Path) -> Vec<i32> {
        let s = self.state.lock().unwrap();
        let mut pids: Vec<i32> = s
            .procs
            .iter()
            .filter(|(_, p)| p.cgroup == cgroup && p.exit.is_none())
            .map(|(pid, _)| *pid)
            .collect();
        pids.sort();
        pids
    }
}

/// Lets calls of a gated verb through, one per [`Gate::open`].
pub struct Gate(Arc<Semaphore>);

impl Gate {
    pub fn open(&self) {
        self.0.add_permits(1);
    }
}

fn end(s: &mut State, pid: i32, exit: Exit) {
    let p = s.procs.get_mut(&pid).expect("a fake process");
    // A vanished process keeps the exit it had; it is reaped now.
    let exit = *p.exit.get_or_insert(exit);
    p.stdio.clear();
    if let Some(tx) = p.reaper.take() {
        let _ = tx.send(exit);
    }
}

/// The last component of a path, for short call records.
fn name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

fn helper_failed(verb: &'static str) -> impl FnOnce(String) -> HelperError {
    move |message| HelperError::Failed {
        verb,
        status: 1,
        message,
    }
}

#[async_trait]
impl GuestOs for FakeGuest {
    async fn start_pause(&self) -> Result<i32, HelperError> {
        self.record("pause", "pause".into())
            .map_err(helper_failed("pause"))?;
        self.pass_gate("pause").await;
        Ok(self.spawn(POD_CGROUP.into(), None))
    }

    async fn create(&self, id: &str, dir: &Path, stdio: NewStdio<'_>) -> Result<i32, HelperError> {
        self.record("create", format!("create {id}"))
            .map_err(helper_failed("create"))?;
        self.pass_gate("create").await;
        assert!(
            dir.join("config.json").is_file(),
            "create before config.json"
        );
        Ok(self.spawn(crate::cgroup::dir(id), Some(stdio)))
    }

    async fn start(&self, id: &str) -> Result<(), String> {
        self.record("start", format!("start {id}"))
    }

    async fn exec(&self, id: &str, dir: &Path, stdio: NewStdio<'_>) -> Result<i32, HelperError> {
        self.record("exec", format!("exec {id} {}", name(dir)))
            .map_err(helper_failed("exec"))?;
        self.pass_gate("exec").await;
        assert!(
            dir.join("process.json").is_file(),
            "exec before process.json"
        );
        Ok(self.spawn(crate::cgroup::dir(id), Some(stdio)))
    }

    fn reap(&self, pid: i32, _born: Instant) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.state.lock().unwrap();
        let p = s.procs.get_mut(&pid).expect("reaping a fake process");
        match p.exit {
            Some(exit) => drop(tx.send(exit)),
            None => p.reaper = Some(tx),
        }
        rx
    }

    fn signal(&self, pid: i32, signal: Signal) -> Result<(), KillError> {
        let _ = self.record("signal", format!("signal {pid} {signal}"));
        self.deliver(pid, signal)
    }

    fn exists(&self, pid: i32) -> bool {
        self.alive(pid)
    }

    async fn signal_all(&self, cgroup: &Path, signal: Signal) -> Result<(), KillError> {
        let _ = self.record(
            "signal_all",
            format!("signal_all {} {signal}", name(cgroup)),
        );
        for pid in self.live_in(cgroup) {
            match self.deliver(pid, signal) {
                Err(KillError::Gone) => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// The rootfs is a link to the source: what the runtime checks in it is the image's.
    fn assemble_rootfs(
        &self,
        source: &Path,
        overlay: bool,
        dir: &Path,
    ) -> Result<PathBuf, RootfsError> {
        let _ = self.record("rootfs", format!("rootfs {} overlay={overlay}", name(dir)));
        if !source.is_dir() {
            return Err(RootfsError::NoSource(source.to_path_buf()));
        }
        let target = crate::container::rootfs::path(dir);
        std::os::unix::fs::symlink(source, &target).unwrap();
        Ok(target)
    }

    fn remove_files(&self, dir: &Path) -> Result<(), RootfsError> {
        let _ = self.record("remove_files", format!("remove_files {}", name(dir)));
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => Ok(()),
        }
    }

    async fn destroy(&self, id: &str, cgroup: &Path, dir: &Path) {
        let _ = self.record("destroy", format!("destroy {id}"));
        for pid in self.live_in(cgroup) {
            let _ = self.deliver(pid, Signal::SIGKILL);
        }
        let _ = self.remove_files(dir);
    }

    async fn set_sysctls(
        &self,
        sysctls: Vec<(String, String)>,
        ipc_of: Option<i32>,
    ) -> Result<(), RuntimeError> {
        let list: Vec<String> = sysctls.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let scope = ipc_of.map_or("net".to_string(), |pid| format!("ipc of {pid}"));
        self.record("sysctl", format!("sysctl {scope} {}", list.join(",")))
            .map_err(RuntimeError::InvalidArgument)
    }
}
