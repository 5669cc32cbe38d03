//! One process of a container as containerd sees it: the init process (exec id "") or an
//! exec. It holds the process's status, its stdio copies and its exit, which any number of
//! Wait calls can await.
use std::sync::{Arc, Mutex};

use containerd_shim_protos::{
    protobuf::{well_known_types::timestamp::Timestamp, MessageField},
    types::task::Status,
};
use tokio::sync::watch;

use crate::io::{ProcessIo, StdioPaths};

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

    pub fn timestamp(&self) -> MessageField<Timestamp> {
        MessageField::some(Timestamp {
            seconds: self.at_secs,
            nanos: self.at_nanos as i32,
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

pub struct Process {
    pub container_id: String,
    /// "" for the container's init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    phase: Mutex<Phase>,
    /// Guest pid once started.
    guest_pid: Mutex<u32>,
    io: Mutex<Option<Arc<ProcessIo>>>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioPaths) -> Arc<Process> {
        Arc::new(Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            phase: Mutex::new(Phase::Created),
            guest_pid: Mutex::new(0),
            io: Mutex::new(None),
            exit_tx: watch::channel(None).0,
        })
    }

    pub fn set_io(&self, io: ProcessIo) {
        *self.io.lock().unwrap() = Some(Arc::new(io));
    }

    pub fn io(&self) -> Option<Arc<ProcessIo>> {
        self.io.lock().unwrap().clone()
    }

    pub fn set_running(&self, guest_pid: u32) {
        *self.guest_pid.lock().unwrap() = guest_pid;
        let mut phase = self.phase.lock().unwrap();
        if *phase == Phase::Created {
            *phase = Phase::Running;
        }
    }

    pub fn guest_pid(&self) -> u32 {
        *self.guest_pid.lock().unwrap()
    }

    pub fn is_running(&self) -> bool {
        *self.phase.lock().unwrap() == Phase::Running
    }

    pub fn is_created(&self) -> bool {
        *self.phase.lock().unwrap() == Phase::Created
    }

    /// Records the exit. Returns false if the process had already exited (the first exit wins).
    pub fn set_exited(&self, exit: Exit) -> bool {
        let mut phase = self.phase.lock().unwrap();
        if *phase == Phase::Stopped {
            return false;
        }
        *phase = Phase::Stopped;
        self.exit_tx.send_replace(Some(exit));
        true
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
        match *self.phase.lock().unwrap() {
            Phase::Created => Status::CREATED,
            Phase::Running if paused => Status::PAUSED,
            Phase::Running => Status::RUNNING,
            Phase::Stopped => Status::STOPPED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_exit_wins_and_wakes_waiters() {
        let p = Process::new("c", "", StdioPaths::default());
        assert_eq!(p.status(false), Status::CREATED);
        p.set_running(42);
        assert_eq!(p.status(true), Status::PAUSED);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await.status })
        };
        assert!(p.set_exited(Exit::now(7)));
        assert!(!p.set_exited(Exit::now(9)));
        assert_eq!(waiter.await.unwrap(), 7);
        assert_eq!(p.exit().unwrap().status, 7);
        assert_eq!(p.status(false), Status::STOPPED);
    }
}
