//! What the pod watches: each process's exit (one waiter per process), the VM's end, and
//! the guest's OOM reports.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use slog::{info, warn};

use super::{container::Kind, Event, Exit, Pod, PodVm, Process, VM_GONE_STATUS};

/// How long a process's output may still be copied out after the guest reported its exit.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// OOM events of one container closer together than this are one event for containerd
/// (the guest decides how often they come; it must not flood the event queue).
const OOM_EVENT_GAP: Duration = Duration::from_secs(1);

impl Pod {
    /// The waiter of one process: exit from the guest, then its output, then TaskExit.
    pub(super) async fn wait_process(self: Arc<Self>, vm: Arc<dyn PodVm>, process: Arc<Process>) {
        let exit = match vm
            .wait_process(&process.container_id, process.id.wire_id())
            .await
        {
            Ok(exit) => exit,
            Err(e) => {
                // The VM watcher reports processes of a VM that ended; anything else is logged.
                warn!(self.log, "waiting for a process failed"; "container" => &process.container_id, "exec" => %process.id, "error" => %e);
                Exit::now(VM_GONE_STATUS)
            }
        };
        if let Some(io) = process.io() {
            if tokio::time::timeout(OUTPUT_DRAIN, io.wait_output())
                .await
                .is_err()
            {
                warn!(self.log, "output still open after exit, not waiting longer"; "container" => &process.container_id);
            }
        }
        self.report_exit(&process, exit, vm.pid()).await;
    }

    pub(super) async fn report_exit(&self, process: &Process, exit: Exit, pid: u32) {
        if process.set_exited(exit.clone()).await {
            self.emit(Event::Exit {
                container_id: process.container_id.clone(),
                id: process.event_id().to_string(),
                pid,
                exit,
            });
        }
    }

    /// Ends every process of a VM that ended, then releases what the VM held on the host.
    pub(super) async fn watch_vm(self: Arc<Self>, vm: Arc<dyn PodVm>) {
        let exit = vm.wait_exit().await;
        // What the guest was still asked is moot: ending the VM first makes calls in flight
        // (a Start waiting on a dead virtiofsd) fail at once instead of at their timeout.
        let stopping = tokio::spawn({
            let vm = vm.clone();
            async move { vm.stop().await }
        });
        let open: Vec<_> = self
            .containers
            .lock()
            .unwrap()
            .values()
            .flat_map(|c| c.all_processes())
            .filter(|p| p.exit().is_none())
            .collect();
        if !open.is_empty() {
            warn!(self.log, "the pod's VM ended"; "reason" => &exit.reason, "status" => ?exit.status, "processes" => open.len());
        }
        // Side by side: one process whose Start is still unwinding holds back no other.
        let mut reports = tokio::task::JoinSet::new();
        for p in open {
            let pod = self.clone();
            let pid = vm.pid();
            reports.spawn(async move { pod.report_exit(&p, Exit::now(VM_GONE_STATUS), pid).await });
        }
        while reports.join_next().await.is_some() {}
        match stopping.await {
            Ok(Err(e)) => warn!(self.log, "releasing the ended VM failed"; "error" => %e),
            Err(e) => warn!(self.log, "releasing the ended VM panicked"; "error" => %e),
            Ok(Ok(())) => {}
        }
    }

    /// Forwards the guest's OOM events for containers of this pod, at most one per
    /// container per [`OOM_EVENT_GAP`]; ids the pod does not have are dropped.
    pub(super) async fn forward_ooms(self: Arc<Self>, vm: Arc<dyn PodVm>) {
        loop {
            let container_id = tokio::select! {
                _ = vm.wait_exit() => return,
                r = vm.next_oom() => match r {
                    Ok(id) => id,
                    Err(e) => {
                        // Normal when the VM shuts down: the agent closes its connection first.
                        info!(self.log, "OOM event stream ended"; "error" => %e);
                        return;
                    }
                },
            };
            let known = self
                .container(&container_id)
                .is_ok_and(|c| c.kind == Kind::Guest);
            if !known {
                warn!(self.log, "the guest reported an OOM kill in an unknown container, dropped";
                    "container" => container_id.chars().take(80).collect::<String>());
                continue;
            }
            let now = Instant::now();
            let mut last = self.last_oom.lock().unwrap();
            if last
                .get(&container_id)
                .is_some_and(|t| now.duration_since(*t) < OOM_EVENT_GAP)
            {
                continue;
            }
            last.insert(container_id.clone(), now);
            self.emit(Event::Oom { container_id });
        }
    }
}
