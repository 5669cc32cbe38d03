//! One process of a container as containerd sees it: the init process or an exec
//! ([`ProcessRef`]). It holds the process's status, its stdio copies and its exit, which any number of
//! Wait calls can await.
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::stdio::{ProcessIo, StdioPaths};

/// Which process of a container. containerd's Task API names the init with an empty exec id;
/// that convention ends at the Task service ([`ProcessRef::from_task`]) and starts again on
/// the wire to the guest and in events ([`ProcessRef::wire_id`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProcessRef {
    Init,
    Exec(String),
}

impl ProcessRef {
    pub fn from_task(exec_id: &str) -> ProcessRef {
        match exec_id {
            "" => ProcessRef::Init,
            id => ProcessRef::Exec(id.into()),
        }
    }

    /// The exec id as containerd and the agent spell it ("" for the init).
    pub fn wire_id(&self) -> &str {
        match self {
            ProcessRef::Init => "",
            ProcessRef::Exec(id) => id,
        }
    }
}

impl std::fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessRef::Init => f.write_str("init"),
            ProcessRef::Exec(id) => f.write_str(id),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    pub at_secs: i64,
    pub at_nanos: u32,
}

impl Exit {
    /// An exit observed now.
    pub fn now(status: u32) -> Exit {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Exit {
            status,
            at_secs: d.as_secs() as i64,
            at_nanos: d.subsec_nanos(),
        }
    }
}

/// containerd's view of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    /// A Start is on its way to the guest: an exit seen meanwhile waits for its outcome, so
    /// containerd never sees TaskExit before TaskStart.
    Starting,
    Running,
    Stopped,
}

pub struct Process {
    pub container_id: String,
    pub id: ProcessRef,
    pub stdio: StdioPaths,
    phase: watch::Sender<Phase>,
    io: Mutex<Option<Arc<ProcessIo>>>,
    exit_tx: watch::Sender<Option<Exit>>,
    /// Kill calls in flight. An exit they cause is recorded (and published) once they have
    /// answered: containerd closes its connection for a task when it handles its exit, and a
    /// Kill still waiting for its answer on it would fail with "ttrpc: closed".
    signals: Arc<watch::Sender<u32>>,
}

/// A Kill in flight; the count goes down when it is dropped.
pub struct Signalling(Arc<watch::Sender<u32>>);

impl Drop for Signalling {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Process {
    pub fn new(container_id: &str, id: ProcessRef, stdio: StdioPaths) -> Arc<Process> {
        Arc::new(Process {
            container_id: container_id.into(),
            id,
            stdio,
            phase: watch::channel(Phase::Created).0,
            io: Mutex::new(None),
            exit_tx: watch::channel(None).0,
            signals: Arc::new(watch::channel(0).0),
        })
    }

    /// The id containerd uses for the process in events: the exec id, or the container id
    /// for the init.
    pub fn event_id(&self) -> &str {
        match &self.id {
            ProcessRef::Init => &self.container_id,
            ProcessRef::Exec(id) => id,
        }
    }

    pub fn set_io(&self, io: ProcessIo) {
        *self.io.lock().unwrap() = Some(Arc::new(io));
    }

    pub fn io(&self) -> Option<Arc<ProcessIo>> {
        self.io.lock().unwrap().clone()
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Created → Starting. False if it was not Created (already started, or exited).
    pub fn begin_start(&self) -> bool {
        self.phase.send_if_modified(|p| {
            let created = *p == Phase::Created;
            if created {
                *p = Phase::Starting;
            }
            created
        })
    }

    /// Starting → Running if the start succeeded, back to Created otherwise.
    pub fn finish_start(&self, started: bool) {
        self.phase.send_if_modified(|p| {
            let starting = *p == Phase::Starting;
            if starting {
                *p = if started {
                    Phase::Running
                } else {
                    Phase::Created
                };
            }
            starting
        });
    }

    /// Running, or on its way there.
    pub fn is_running(&self) -> bool {
        matches!(self.phase(), Phase::Starting | Phase::Running)
    }

    pub fn is_created(&self) -> bool {
        self.phase() == Phase::Created
    }

    /// Marks a Kill in flight until the returned guard is dropped.
    pub fn signalling(&self) -> Signalling {
        self.signals.send_modify(|n| *n += 1);
        Signalling(self.signals.clone())
    }

    /// Records the exit, once a start or kill on its way has finished. Returns false if the
    /// process had already exited (the first exit wins).
    pub async fn set_exited(&self, exit: Exit) -> bool {
        let mut phase = self.phase.subscribe();
        let _ = phase.wait_for(|p| *p != Phase::Starting).await;
        let mut signals = self.signals.subscribe();
        let _ = signals.wait_for(|n| *n == 0).await;
        let stopped = self.phase.send_if_modified(|p| {
            let first = *p != Phase::Stopped;
            *p = Phase::Stopped;
            first
        });
        if stopped {
            self.exit_tx.send_replace(Some(exit));
        }
        stopped
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit_tx.borrow().clone()
    }

    /// Resolves with the exit once the process has exited.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit_tx.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .expect("sender lives in self");
        exit.clone().expect("checked by wait_for")
    }

    /// containerd's view of the status; `paused` applies to a running container.
    pub fn status(&self, paused: bool) -> Status {
        match self.phase() {
            Phase::Created | Phase::Starting => Status::Created,
            Phase::Running if paused => Status::Paused,
            Phase::Running => Status::Running,
            Phase::Stopped => Status::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_exit_wins_and_wakes_waiters() {
        let p = Process::new("c", ProcessRef::Init, StdioPaths::default());
        assert_eq!(p.status(false), Status::Created);
        assert!(p.begin_start());
        assert!(!p.begin_start());
        p.finish_start(true);
        assert_eq!(p.status(true), Status::Paused);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await.status })
        };
        assert!(p.set_exited(Exit::now(7)).await);
        assert!(!p.set_exited(Exit::now(9)).await);
        assert_eq!(waiter.await.unwrap(), 7);
        assert_eq!(p.exit().unwrap().status, 7);
        assert_eq!(p.status(false), Status::Stopped);
        assert!(!p.begin_start());
    }

    #[tokio::test]
    async fn an_exit_during_a_kill_waits_for_the_kill_to_answer() {
        let p = Process::new("c", ProcessRef::Init, StdioPaths::default());
        p.begin_start();
        p.finish_start(true);
        let kill = p.signalling();
        let exiting = {
            let p = p.clone();
            tokio::spawn(async move { p.set_exited(Exit::now(137)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            p.exit().is_none(),
            "the exit went out before the kill answered"
        );
        drop(kill);
        assert!(exiting.await.unwrap());
    }

    #[tokio::test]
    async fn an_exit_during_a_start_waits_for_the_start() {
        let p = Process::new("c", ProcessRef::Init, StdioPaths::default());
        assert!(p.begin_start());
        let exiting = {
            let p = p.clone();
            tokio::spawn(async move { p.set_exited(Exit::now(1)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!exiting.is_finished());
        assert!(p.exit().is_none());
        p.finish_start(true);
        assert!(exiting.await.unwrap());
        assert_eq!(p.status(false), Status::Stopped);
    }
}
