//! The moment between a process's start and its program being ready for signals.
//!
//! runc's `start` returns once the container's program was executed; libcontainer's returns once it told the
//! container's init to go, before the exec. Under emulation a program also takes far longer to reach the point
//! where it installs its handlers. So a SIGTERM sent right after start (Kubernetes stops a container it just
//! started) reaches a program that has no handler yet: PID 1 of a PID namespace drops it (the stop then waits
//! out its whole grace period), any other process dies of it instead of running its handler. Three defences:
//! start returns only after the exec, as runc's does ([`wait_for_exec`]); a signal that PID 1 would drop is
//! delivered again once the program handles it, for [`HOLD_AFTER_START`]; and a signal that would kill any
//! other young process by default waits for its handler, for at most [`SETTLE`] after its start.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::process::Process;

/// For how long after start a signal PID 1 dropped is delivered again once its program handles it.
pub const HOLD_AFTER_START: Duration = Duration::from_secs(10);
/// For how long after start a signal that would kill a process by default waits for the program's handler.
pub const SETTLE: Duration = Duration::from_secs(1);
/// The longest start waits for the exec (libcontainer's init has little left to do by then).
const EXEC_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(2);
const REDELIVERY_POLL: Duration = Duration::from_millis(10);

/// Waits until `pid` runs another program than the agent's own binary (libcontainer's init is a fork of the
/// agent), has exited, or [`EXEC_WAIT`] passed.
pub async fn wait_for_exec(pid: Pid) {
    wait_for_exec_from(pid, std::path::Path::new("/proc/self/exe")).await;
}

/// [`wait_for_exec`] with `pid` starting as a copy of `program`.
async fn wait_for_exec_from(pid: Pid, program: &std::path::Path) {
    let Ok(agent) = std::fs::metadata(program) else { return };
    let deadline = Instant::now() + EXEC_WAIT;
    let exe = format!("/proc/{pid}/exe");
    while Instant::now() < deadline {
        match std::fs::metadata(&exe) {
            Ok(m) if m.dev() == agent.dev() && m.ino() == agent.ino() => tokio::time::sleep(POLL).await,
            _ => return,
        }
    }
    tracing::warn!(%pid, "the container's program was not executed within {EXEC_WAIT:?} of start");
}

/// What `/proc/<pid>/status` says about signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SignalState {
    /// PID 1 of its own PID namespace: it drops signals it has no handler for.
    namespace_init: bool,
    /// Signals with a handler or ignored (SigCgt | SigIgn), bit n-1 for signal n.
    disposed: u64,
}

fn parse_status(status: &str) -> Option<SignalState> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let mask = |name: &str| field(name).and_then(|v| u64::from_str_radix(v, 16).ok());
    let namespace_init = field("NSpid:")?.split_whitespace().last()? == "1";
    Some(SignalState { namespace_init, disposed: mask("SigCgt:")? | mask("SigIgn:")? })
}

fn read_state(pid: Pid) -> Option<SignalState> {
    parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Sends `signal` to `process`, minding its start: see the module documentation.
pub fn deliver(process: Arc<Process>, signal: Signal) -> nix::Result<()> {
    let young = |window: Duration| process.started.get().is_some_and(|at| at.elapsed() < window);
    let state = read_state(process.pid);
    let unhandled = state.is_some_and(|s| !forced(signal) && s.disposed & bit(signal) == 0);
    if unhandled && state.is_some_and(|s| !s.namespace_init) && young(SETTLE) {
        let until = process.started.get().map_or_else(Instant::now, |at| *at + SETTLE);
        tokio::spawn(async move {
            wait_for_handler(&process, signal, until).await;
            send(&process, signal);
        });
        return Ok(());
    }
    kill(process.pid, signal)?;
    if unhandled && young(HOLD_AFTER_START) {
        let until = process.started.get().map_or_else(Instant::now, |at| *at + HOLD_AFTER_START);
        tokio::spawn(async move {
            if wait_for_handler(&process, signal, until).await {
                tracing::info!(pid = %process.pid, ?signal, "the program now handles the signal it missed; delivering it");
                send(&process, signal);
            }
        });
    }
    Ok(())
}

fn kill(pid: Pid, signal: Signal) -> nix::Result<()> {
    match nix::sys::signal::kill(pid, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

fn send(process: &Process, signal: Signal) {
    if process.exit().is_none() {
        let _ = kill(process.pid, signal);
    }
}

/// Polls until the program handles (or ignores) `signal`: true then; false when `until` passed or it exited.
async fn wait_for_handler(process: &Process, signal: Signal, until: Instant) -> bool {
    while Instant::now() < until {
        if process.exit().is_some() {
            return false;
        }
        match read_state(process.pid) {
            None => return false,
            Some(state) if state.disposed & bit(signal) != 0 => return true,
            Some(_) => tokio::time::sleep(REDELIVERY_POLL).await,
        }
    }
    false
}

fn forced(signal: Signal) -> bool {
    matches!(signal, Signal::SIGKILL | Signal::SIGSTOP)
}

fn bit(signal: Signal) -> u64 {
    1u64 << ((signal as i32) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsh\nNSpid:\t812\t1\nSigQ:\t0/7823\nSigPnd:\t0000000000000000\n\
        SigBlk:\t0000000000000000\nSigIgn:\t0000000000000004\nSigCgt:\t0000000000004002\n";

    #[test]
    fn status_gives_namespace_init_and_dispositions() {
        let state = parse_status(STATUS).expect("parsed");
        assert_eq!(state, SignalState { namespace_init: true, disposed: 0x4006 });
        assert_ne!(state.disposed & bit(Signal::SIGTERM), 0, "SIGTERM (15) has a handler");
        assert_ne!(state.disposed & bit(Signal::SIGQUIT), 0, "SIGQUIT (3) is ignored");
        assert_eq!(state.disposed & bit(Signal::SIGUSR1), 0);
        let not_init = parse_status(&STATUS.replace("\t812\t1", "\t812\t7")).expect("parsed");
        assert!(!not_init.namespace_init);
        assert_eq!(parse_status("Name:\tsh\n"), None);
    }

    #[tokio::test]
    async fn a_young_process_gets_a_signal_once_its_handler_is_installed() {
        // sh installs its TERM handler after a pause: a TERM sent before must still reach the handler.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 0.3; trap 'exit 42' TERM; while :; do sleep 0.05; done"])
            .spawn()
            .expect("spawn sh");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let (_tx, exit) = tokio::sync::watch::channel(None);
        let process = Arc::new(Process::new(pid, crate::io::ProcessIo::default(), exit));
        let _ = process.started.set(Instant::now());
        deliver(process, Signal::SIGTERM).expect("deliver");
        let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
        assert_eq!(status.code(), Some(42), "the TERM waited for the handler: {status:?}");
    }

    #[tokio::test]
    async fn start_waits_while_the_process_runs_the_starting_program() {
        let mut child = std::process::Command::new("/bin/sleep").arg("0.5").spawn().expect("spawn sleep");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        wait_for_exec_from(pid, std::path::Path::new("/bin/true")).await;
        assert!(child.try_wait().expect("try_wait").is_none(), "another program than ours: no wait");
        wait_for_exec_from(pid, std::path::Path::new("/bin/sleep")).await;
        assert!(child.try_wait().expect("try_wait").is_some(), "still our program: waited until it exited");
    }
}
