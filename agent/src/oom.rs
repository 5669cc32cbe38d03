//! OOM kills: inotify on each container's `memory.events`; each new `oom_kill` is queued
//! once and handed to one WaitOomEvent caller.
use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use slog::{info, warn};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, Mutex as AsyncMutex},
};

use crate::{cgroup, logger::log};

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct Watched {
    id: String,
    dir: PathBuf,
    seen: u64,
}

struct Inner {
    inotify: AsyncFd<Fd>,
    watches: Mutex<HashMap<WatchDescriptor, Watched>>,
    tx: mpsc::UnboundedSender<String>,
}

pub struct OomWatcher {
    inner: Arc<Inner>,
    rx: AsyncMutex<mpsc::UnboundedReceiver<String>>,
}

impl OomWatcher {
    pub fn start() -> std::io::Result<OomWatcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let (tx, rx) = mpsc::unbounded_channel();
        // SAFETY: the Inotify fd stays open, unchanged, for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register(Fd(inotify)) }.map_err(|e| e.into_parts().1)?;
        let inner = Arc::new(Inner {
            inotify,
            watches: Mutex::new(HashMap::new()),
            tx,
        });
        let i = inner.clone();
        tokio::spawn(async move {
            loop {
                let mut guard = match i.inotify.readable().await {
                    Ok(g) => g,
                    Err(e) => return warn!(log(), "OOM watch stopped"; "error" => %e),
                };
                match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from))
                {
                    Ok(Ok(events)) => {
                        for ev in events {
                            i.check(ev.wd);
                        }
                    }
                    Ok(Err(e)) => return warn!(log(), "OOM watch stopped"; "error" => %e),
                    Err(_would_block) => continue,
                }
            }
        });
        Ok(OomWatcher {
            inner,
            rx: AsyncMutex::new(rx),
        })
    }

    /// Starts watching a container's cgroup (kills counted from now on).
    pub fn watch(&self, id: &str, dir: &Path) {
        let events = dir.join("memory.events");
        match self
            .inner
            .inotify
            .get_ref()
            .0
            .add_watch(&events, AddWatchFlags::IN_MODIFY)
        {
            Ok(wd) => {
                let seen = cgroup::oom_kills(dir).unwrap_or(0);
                let w = Watched {
                    id: id.to_string(),
                    dir: dir.to_path_buf(),
                    seen,
                };
                self.inner.watches.lock().unwrap().insert(wd, w);
            }
            Err(e) => warn!(log(), "cannot watch for OOM kills"; "container" => id, "error" => %e),
        }
    }

    pub fn unwatch(&self, id: &str) {
        let mut watches = self.inner.watches.lock().unwrap();
        let wds: Vec<_> = watches
            .iter()
            .filter(|(_, w)| w.id == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            watches.remove(&wd);
            let _ = self.inner.inotify.get_ref().0.rm_watch(wd);
        }
    }

    /// The id of the next container with a new OOM kill.
    pub async fn next(&self) -> Option<String> {
        self.rx.lock().await.recv().await
    }
}

impl Inner {
    fn check(&self, wd: WatchDescriptor) {
        let mut watches = self.watches.lock().unwrap();
        let Some(w) = watches.get_mut(&wd) else {
            return;
        };
        let Ok(kills) = cgroup::oom_kills(&w.dir) else {
            return;
        };
        for _ in w.seen..kills {
            info!(log(), "OOM kill"; "container" => &w.id);
            let _ = self.tx.send(w.id.clone());
        }
        w.seen = w.seen.max(kills);
    }
}
