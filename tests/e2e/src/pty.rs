//! Driving an interactive command (e.g. `ctr run -t`) through a pseudo-terminal: the child gets the pty
//! slave as stdin/stdout/stderr and as its controlling terminal; the test writes keys to the master and
//! reads until a pattern appears.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::{openpty, Winsize};

use crate::process::{describe, kill_and_reap, wait_until};

/// Errors while driving a pty session.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("could not open a pseudo-terminal")]
    Open(#[source] nix::Error),
    #[error("could not set up the pseudo-terminal descriptors")]
    Descriptor(#[source] io::Error),
    #[error("could not start `{command}` on a pseudo-terminal")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("could not write to the terminal of `{command}`")]
    Write {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("could not read the terminal of `{command}`")]
    Read {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` did not print {pattern:?} within {timeout:?}; terminal output so far:\n{output}")]
    PatternTimeout { command: String, pattern: String, timeout: Duration, output: String },
    #[error("`{command}` closed its terminal before printing {pattern:?}; terminal output:\n{output}")]
    PatternEof { command: String, pattern: String, output: String },
    #[error("`{command}` did not exit within {timeout:?}; terminal output:\n{output}")]
    ExitTimeout { command: String, timeout: Duration, output: String },
    #[error("could not wait for `{command}`")]
    Wait {
        command: String,
        #[source]
        source: io::Error,
    },
}

/// A child process attached to a pseudo-terminal. Dropping the session SIGKILLs the child (by PID) if it
/// is still running.
#[derive(Debug)]
pub struct PtySession {
    child: Child,
    master: File,
    command: String,
    /// Output read but not yet consumed by [`PtySession::expect`].
    pending: Vec<u8>,
    /// Everything read from the terminal.
    transcript: Vec<u8>,
    eof: bool,
}

impl PtySession {
    /// Spawns `cmd` in a new session whose controlling terminal is a fresh 80x24 pty.
    pub fn spawn(mut cmd: Command) -> Result<Self, PtyError> {
        let command = describe(&cmd);
        let size = Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = openpty(&size, None).map_err(PtyError::Open)?;
        set_cloexec(&pty.master)?;
        set_cloexec(&pty.slave)?;
        let slave_out = pty.slave.try_clone().map_err(PtyError::Descriptor)?;
        let slave_err = pty.slave.try_clone().map_err(PtyError::Descriptor)?;
        cmd.stdin(Stdio::from(pty.slave)).stdout(Stdio::from(slave_out)).stderr(Stdio::from(slave_err));
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
        // system calls (setsid, ioctl) on descriptors that exist there; it allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // stdin is already the pty slave: make it the controlling terminal of the new session.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| PtyError::Spawn { command: command.clone(), source })?;
        // Close our copies of the slave so that reading the master reports EOF once the child is gone.
        drop(cmd);
        Ok(Self {
            child,
            master: File::from(pty.master),
            command,
            pending: Vec::new(),
            transcript: Vec::new(),
            eof: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes `keys` to the terminal as typed.
    pub fn send(&mut self, keys: &str) -> Result<(), PtyError> {
        self.master
            .write_all(keys.as_bytes())
            .and_then(|()| self.master.flush())
            .map_err(|source| PtyError::Write { command: self.command.clone(), source })
    }

    /// Types `line` followed by Enter (carriage return, as a terminal sends it).
    pub fn send_line(&mut self, line: &str) -> Result<(), PtyError> {
        self.send(&format!("{line}\r"))
    }

    /// Reads until `pattern` appears in the output not yet consumed; returns that output up to and including
    /// the pattern and consumes it.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> Result<String, PtyError> {
        let deadline = Instant::now() + timeout;
        let needle = pattern.as_bytes();
        loop {
            if let Some(pos) = find(&self.pending, needle) {
                let end = pos + needle.len();
                let consumed: Vec<u8> = self.pending.drain(..end).collect();
                return Ok(String::from_utf8_lossy(&consumed).into_owned());
            }
            if self.eof {
                return Err(PtyError::PatternEof {
                    command: self.command.clone(),
                    pattern: pattern.to_owned(),
                    output: self.transcript(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PtyError::PatternTimeout {
                    command: self.command.clone(),
                    pattern: pattern.to_owned(),
                    timeout,
                    output: self.transcript(),
                });
            }
            self.read_some(deadline - now)?;
        }
    }

    /// Reads lines until one equals `line` once carriage returns are stripped (nested terminals, as with
    /// `ctr run -t`, end lines with `\r\r\n`); returns the output consumed up to and including it.
    pub fn expect_line(&mut self, line: &str, timeout: Duration) -> Result<String, PtyError> {
        let deadline = Instant::now() + timeout;
        let mut consumed = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = self.expect("\n", left).map_err(|e| match e {
                PtyError::PatternTimeout { command, timeout: _, output, .. } => {
                    PtyError::PatternTimeout { command, pattern: format!("a line {line:?}"), timeout, output }
                }
                PtyError::PatternEof { command, output, .. } => {
                    PtyError::PatternEof { command, pattern: format!("a line {line:?}"), output }
                }
                other => other,
            })?;
            consumed.push_str(&chunk);
            let text = chunk.trim_end_matches('\n').replace('\r', "");
            if text == line {
                return Ok(consumed);
            }
        }
    }

    /// Waits for the child to exit, reading its terminal meanwhile (so it cannot block on a full pty).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, PtyError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status =
                self.child.try_wait().map_err(|source| PtyError::Wait { command: self.command.clone(), source })?;
            if let Some(status) = status {
                // Collect what is still buffered in the pty.
                while !self.eof && self.read_some(Duration::from_millis(50))? {}
                return Ok(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PtyError::ExitTimeout {
                    command: self.command.clone(),
                    timeout,
                    output: self.transcript(),
                });
            }
            if self.eof {
                let status = wait_until(&mut self.child, deadline)
                    .map_err(|source| PtyError::Wait { command: self.command.clone(), source })?;
                if let Some(status) = status {
                    return Ok(status);
                }
            } else {
                self.read_some((deadline - now).min(Duration::from_millis(50)))?;
            }
        }
    }

    /// Everything the terminal has shown so far.
    pub fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.transcript).into_owned()
    }

    /// Output read but not yet consumed by [`PtySession::expect`].
    pub fn pending(&self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }

    /// Reads what is available within `timeout`; returns whether anything was read.
    fn read_some(&mut self, timeout: Duration) -> Result<bool, PtyError> {
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(PtyError::Read { command: self.command.clone(), source: e.into() }),
        }
        let mut buf = [0u8; 4096];
        match self.master.read(&mut buf) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.transcript.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            // Linux reports EIO on the master once every slave descriptor is closed.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                self.eof = true;
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(source) => Err(PtyError::Read { command: self.command.clone(), source }),
        }
    }
}

impl Drop for PtySession {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_and_reap(&mut self.child);
        }
    }
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), PtyError> {
    fcntl(std::os::fd::AsRawFd::as_raw_fd(fd), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(|_| ())
        .map_err(|e| PtyError::Descriptor(e.into()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_an_interactive_shell() {
        let mut cmd = Command::new("sh");
        cmd.env("PS1", "prompt> ");
        let mut session = PtySession::spawn(cmd).unwrap();
        session.expect("prompt> ", Duration::from_secs(10)).unwrap();
        session.send_line("tty; echo $((6*7))").unwrap();
        session.expect("/dev/pts/", Duration::from_secs(10)).unwrap();
        session.expect_line("42", Duration::from_secs(10)).unwrap();
        session.send_line("exit 5").unwrap();
        let status = session.wait(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(5));
    }

    #[test]
    fn reports_what_was_seen_when_the_pattern_never_comes() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; exec sleep 30"]);
        let mut session = PtySession::spawn(cmd).unwrap();
        let err = session.expect("never", Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("hello"), "{err}");
    }
}
