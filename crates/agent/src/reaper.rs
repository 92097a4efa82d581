//! Child reaping for the agent, which is PID 1 in the guest.
//!
//! Two libcontainer facts shape this module:
//! - libcontainer `waitpid`s its own intermediate process while it builds a container, so a
//!   global `waitpid(-1)` running concurrently would steal that status. The agent therefore
//!   reaps orphans only while no build is in flight ([`Reaper::build_guard`]); builds also run
//!   on the single runtime thread, so in practice the reaper cannot run during one at all.
//! - libcontainer clones the container process with `CLONE_PARENT` and exit signal 0, so its
//!   exit raises no SIGCHLD and plain `waitpid` does not see it without `__WALL`. Registered
//!   processes are therefore watched through a pidfd, and every wait uses `__WALL`.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::{watch, Notify};

/// How often the reaper looks for exits nobody told it about. SIGCHLD and each registered process's pidfd wake
/// it at once; this is only a backstop, and a 1 s tick kept every idle VM waking for nothing.
const BACKSTOP: Duration = Duration::from_secs(10);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    pub at: SystemTime,
}

impl ExitInfo {
    fn from_wait(status: WaitStatus) -> Option<Self> {
        let code = match status {
            WaitStatus::Exited(_, code) => code,
            WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
            _ => return None,
        };
        Some(Self { status: code, at: SystemTime::now() })
    }
}

/// Receives the exit of one registered process.
pub type ExitWatch = watch::Receiver<Option<ExitInfo>>;

#[derive(Debug, Default)]
struct Inner {
    registered: Mutex<HashMap<i32, watch::Sender<Option<ExitInfo>>>>,
    builds_in_flight: AtomicUsize,
    wake: Notify,
}

/// Reaps registered processes and, when no container build is in flight, orphans.
#[derive(Debug, Clone, Default)]
pub struct Reaper {
    inner: Arc<Inner>,
}

/// Holds off orphan reaping while libcontainer builds a container (see the module docs).
#[derive(Debug)]
pub struct BuildGuard {
    inner: Arc<Inner>,
}

impl Drop for BuildGuard {
    fn drop(&mut self) {
        self.inner.builds_in_flight.fetch_sub(1, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

impl Reaper {
    pub fn build_guard(&self) -> BuildGuard {
        self.inner.builds_in_flight.fetch_add(1, Ordering::SeqCst);
        BuildGuard { inner: self.inner.clone() }
    }

    /// Watches `pid` (a child of the agent) until it exits. Must be called before the guard of
    /// the build that created it is dropped.
    pub fn register(&self, pid: Pid) -> ExitWatch {
        let (tx, rx) = watch::channel(None);
        lock(&self.inner.registered).insert(pid.as_raw(), tx);
        // A pidfd becomes readable at exit even for children whose exit signal is 0.
        match pidfd_open(pid) {
            Ok(fd) => {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    if let Ok(afd) = crate::io::async_fd(fd) {
                        let _ = afd.readable().await;
                    }
                    inner.wake.notify_one();
                });
            }
            Err(err) => tracing::warn!(%pid, %err, "pidfd_open failed, relying on SIGCHLD"),
        }
        self.inner.wake.notify_one();
        rx
    }

    /// Runs forever: reaps on SIGCHLD, on pidfd readiness and on a slow backstop tick.
    pub async fn run(self, reap_orphans: bool) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(s) => Some(s),
            Err(err) => {
                tracing::error!(%err, "cannot watch SIGCHLD");
                None
            }
        };
        loop {
            self.reap_once(reap_orphans);
            tokio::select! {
                _ = async { match sigchld.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(BACKSTOP) => {}
            }
        }
    }

    fn reap_once(&self, reap_orphans: bool) {
        let flags = WaitPidFlag::WNOHANG | WaitPidFlag::__WALL;
        // Registered processes first, one by one, so they are never mistaken for orphans.
        let pids: Vec<i32> = lock(&self.inner.registered).keys().copied().collect();
        for pid in pids {
            match waitpid(Pid::from_raw(pid), Some(flags)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(status) => self.record(pid, status),
                Err(Errno::ECHILD) => {
                    tracing::warn!(pid, "registered process is not our child any more");
                    self.record_exit(pid, ExitInfo { status: 255, at: SystemTime::now() });
                }
                Err(err) => tracing::warn!(pid, %err, "waitpid failed"),
            }
        }
        if !reap_orphans || self.inner.builds_in_flight.load(Ordering::SeqCst) > 0 {
            return;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(flags)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => match status.pid() {
                    Some(pid) if lock(&self.inner.registered).contains_key(&pid.as_raw()) => {
                        self.record(pid.as_raw(), status)
                    }
                    Some(pid) => tracing::debug!(%pid, ?status, "reaped orphan"),
                    None => break,
                },
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!(%err, "waitpid(-1) failed");
                    break;
                }
            }
        }
    }

    fn record(&self, pid: i32, status: WaitStatus) {
        if let Some(info) = ExitInfo::from_wait(status) {
            self.record_exit(pid, info);
        }
    }

    fn record_exit(&self, pid: i32, info: ExitInfo) {
        if let Some(tx) = lock(&self.inner.registered).remove(&pid) {
            tracing::debug!(pid, status = info.status, "process exited");
            let _ = tx.send(Some(info));
        }
    }
}

fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    debug_assert!(owned.as_raw_fd() >= 0);
    Ok(owned)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_exit_is_128_plus_signal() {
        let pid = Pid::from_raw(10);
        let st = WaitStatus::Signaled(pid, nix::sys::signal::Signal::SIGKILL, false);
        assert_eq!(ExitInfo::from_wait(st).map(|e| e.status), Some(137));
        let st = WaitStatus::Exited(pid, 3);
        assert_eq!(ExitInfo::from_wait(st).map(|e| e.status), Some(3));
    }

    #[tokio::test]
    async fn registered_child_exit_is_reported() {
        let child = std::process::Command::new("sh").args(["-c", "exit 3"]).spawn();
        let Ok(child) = child else { return };
        let reaper = Reaper::default();
        let mut rx = reaper.register(Pid::from_raw(child.id() as i32));
        tokio::spawn(reaper.clone().run(false));
        let info = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|v| *v));
        assert_eq!(info.map(|i| i.status), Some(3));
    }
}
