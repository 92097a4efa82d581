//! Running helper commands with a deadline, and stopping processes by PID (never by name).

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Errors while running a helper command.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("could not wait for `{command}`")]
    Wait {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?} and was killed; stdout: {stdout:?}; stderr: {stderr:?}")]
    Timeout { command: String, timeout: Duration, stdout: String, stderr: String },
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` to completion capturing stdout and stderr; if it is still running after `timeout`, kills it
/// (SIGKILL to its PID) and returns [`ProcessError::Timeout`] with what it printed so far.
/// stdin is left as the caller set it (inherited by default).
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, ProcessError> {
    let command = describe(cmd);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ProcessError::Spawn { command: command.clone(), source })?;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = wait_until(&mut child, Instant::now() + timeout)
        .map_err(|source| ProcessError::Wait { command: command.clone(), source })?;
    if status.is_none() {
        kill_and_reap(&mut child);
    }
    // A grandchild may hold the pipes open after the child is gone: do not wait for it for long.
    let drain = Duration::from_secs(2);
    let stdout = stdout.recv_timeout(drain).unwrap_or_default();
    let stderr = stderr.recv_timeout(drain).unwrap_or_default();
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => Err(ProcessError::Timeout {
            command,
            timeout,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }),
    }
}

fn collect<R: Read + Send + 'static>(stream: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut stream) = stream {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error only truncates what the report shows.
            let _ = stream.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// Polls `child` until it exits or `deadline` passes; `Ok(None)` means it is still running.
pub fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs our child by PID and reaps it.
pub fn kill_and_reap(child: &mut Child) {
    // The child may have exited meanwhile; then kill fails harmlessly and wait reaps it.
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends SIGTERM to our child, waits up to `grace`, then SIGKILLs it. Returns the exit status and whether
/// SIGKILL was needed.
pub fn terminate_child(child: &mut Child, grace: Duration) -> io::Result<(ExitStatus, bool)> {
    if let Some(status) = child.try_wait()? {
        return Ok((status, false));
    }
    send_signal(child.id(), Signal::SIGTERM);
    if let Some(status) = wait_until(child, Instant::now() + grace)? {
        return Ok((status, false));
    }
    let _ = child.kill();
    Ok((child.wait()?, true))
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn send_signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether `pid` (not necessarily our child) still exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_state(&stat), Some('Z') | Some('X') | None),
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive or `timeout` passes; returns those still alive.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The state letter of a `/proc/PID/stat` line (the field after the parenthesised command name).
pub(crate) fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The parent PID of a `/proc/PID/stat` line.
pub(crate) fn stat_ppid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_and_parens_in_the_name() {
        let stat = "1234 (a (weird) name) S 77 1234 1234 0 -1";
        assert_eq!(stat_state(stat), Some('S'));
        assert_eq!(stat_ppid(stat), Some(77));
    }

    #[test]
    fn captures_output_and_status() {
        let out = output_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn kills_a_command_that_hangs() {
        let started = Instant::now();
        let err = output_with_timeout(
            Command::new("sh").args(["-c", "echo before; exec sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        match err {
            ProcessError::Timeout { stdout, .. } => assert_eq!(stdout, "before\n"),
            other => panic!("unexpected {other}"),
        }
    }
}
