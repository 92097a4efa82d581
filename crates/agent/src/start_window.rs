//! The moment between a container's start and its program being ready for signals.
//!
//! runc's `start` returns once the container's program was executed; libcontainer's returns once it told the
//! container's init to go, before the exec. And a container's init is PID 1 of its PID namespace, which drops
//! every signal it has no handler for (SIGKILL aside). So a SIGTERM sent right after start (Kubernetes stops a
//! container it just started) can reach a program that has not installed its handler yet, and is lost: the
//! stop then waits out the whole grace period. Two defences: start returns only after the exec, as runc's does
//! ([`wait_for_exec`]), and for a while after start a signal the init would drop is delivered again once the
//! program handles (or ignores) it ([`redeliver`]).

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::process::Process;

/// For how long after start a dropped signal is held for the program.
pub const HOLD_AFTER_START: Duration = Duration::from_secs(10);
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

fn would_drop(state: SignalState, signal: Signal) -> bool {
    let forced = matches!(signal, Signal::SIGKILL | Signal::SIGSTOP);
    let bit = 1u64 << ((signal as i32) - 1);
    state.namespace_init && !forced && state.disposed & bit == 0
}

/// Called after `signal` was sent to `process`, a container's init started at `started`: if the init dropped
/// it for want of a handler, sends it again as soon as the program handles it, until [`HOLD_AFTER_START`] after
/// start or the process exits.
pub fn redeliver(process: Arc<Process>, signal: Signal, started: Instant) {
    let until = started + HOLD_AFTER_START;
    if Instant::now() >= until || !read_state(process.pid).is_some_and(|s| would_drop(s, signal)) {
        return;
    }
    tokio::spawn(async move {
        while Instant::now() < until {
            tokio::time::sleep(REDELIVERY_POLL).await;
            if process.exit().is_some() {
                return;
            }
            match read_state(process.pid) {
                None => return,
                Some(state) if !would_drop(state, signal) => {
                    tracing::info!(pid = %process.pid, ?signal, "the program now handles the signal it missed; delivering it");
                    let _ = nix::sys::signal::kill(process.pid, signal);
                    return;
                }
                Some(_) => {}
            }
        }
    });
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
        assert!(!would_drop(state, Signal::SIGTERM), "SIGTERM (15) has a handler");
        assert!(!would_drop(state, Signal::SIGQUIT), "SIGQUIT (3) is ignored: nothing to wait for");
        assert!(would_drop(state, Signal::SIGUSR1));
        assert!(!would_drop(state, Signal::SIGKILL));
        let not_init = parse_status(&STATUS.replace("\t812\t1", "\t812\t7")).expect("parsed");
        assert!(!would_drop(not_init, Signal::SIGUSR1), "only a namespace's init drops signals");
        assert_eq!(parse_status("Name:\tsh\n"), None);
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
