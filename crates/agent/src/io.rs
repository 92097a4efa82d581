//! Process stdio as the agent sees it: pipes or a pty master, drained only when a reader is
//! attached, so output written before the host attaches waits in the pipe instead of being lost.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot create a pipe for the process's {0}")]
    Pipe(&'static str, #[source] nix::Error),
    #[error("cannot set up the console socket")]
    ConsoleSocket(#[source] std::io::Error),
    #[error("the container did not send its pty master on the console socket")]
    NoPtyMaster,
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("the {0} stream of this process is already attached to another reader")]
    AlreadyAttached(&'static str),
    #[error("stdin of this process is closed")]
    StdinClosed,
    #[error("I/O on the process's {0} failed")]
    Io(&'static str, #[source] std::io::Error),
}

/// The child's ends of its stdio pipes, handed to libcontainer.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends of one process's stdio.
#[derive(Debug, Default)]
pub struct ProcessIo {
    stdin: Mutex<Option<OwnedFd>>,
    stdout: Mutex<Option<OwnedFd>>,
    stderr: Mutex<Option<OwnedFd>>,
    /// The pty master, kept for resizing.
    tty: Option<OwnedFd>,
}

impl ProcessIo {
    /// Creates the stdio pipes; the agent keeps non-blocking ends, the child gets blocking ones. Without
    /// `stdin` the child reads /dev/null, as under runc when the client attached no stdin: a program that
    /// reads its stdin must see end of file at once, not wait on a pipe nobody writes.
    pub fn pipes(stdin: bool) -> Result<(Self, ChildStdio), IoError> {
        let (in_r, in_w) = if stdin {
            let (r, w) = pipe("stdin")?;
            (r, Some(w))
        } else {
            (dev_null()?, None)
        };
        let (out_r, out_w) = pipe("stdout")?;
        let (err_r, err_w) = pipe("stderr")?;
        for fd in in_w.iter().chain([&out_r, &err_r]) {
            set_nonblocking(fd.as_raw_fd()).map_err(|e| IoError::Pipe("stdio", e))?;
        }
        let io = Self {
            stdin: Mutex::new(in_w),
            stdout: Mutex::new(Some(out_r)),
            stderr: Mutex::new(Some(err_r)),
            tty: None,
        };
        Ok((io, ChildStdio { stdin: in_r, stdout: out_w, stderr: err_w }))
    }

    /// Wraps a pty master: stdin and stdout are the master, stderr is empty (merged by the pty).
    pub fn tty(master: OwnedFd) -> Result<Self, IoError> {
        set_nonblocking(master.as_raw_fd()).map_err(|e| IoError::Pipe("tty", e))?;
        let dup = |what| master.try_clone().map_err(|e| IoError::Io(what, e));
        Ok(Self {
            stdin: Mutex::new(Some(dup("stdin")?)),
            stdout: Mutex::new(Some(dup("stdout")?)),
            stderr: Mutex::new(None),
            tty: Some(master),
        })
    }

    /// What the process wrote to stderr so far, without waiting (for error reports when the
    /// process died during setup: libcontainer's init logs to the container's stderr).
    pub fn stderr_so_far(&self) -> String {
        let guard = lock(&self.stderr);
        let Some(fd) = guard.as_ref() else { return String::new() };
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = read_fd(fd, &mut buf) {
            if n == 0 || all.len() > 256 * 1024 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    }

    pub fn is_tty(&self) -> bool {
        self.tty.is_some()
    }

    /// Copies the process's stdout (or stderr) to `sink` until EOF. If the sink fails the
    /// stream is kept so a later reader can carry on where this one stopped.
    pub async fn read_output<F, Fut, E>(&self, stderr: bool, mut sink: F) -> Result<(), E>
    where
        F: FnMut(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: From<IoError>,
    {
        let (slot, what) = if stderr { (&self.stderr, "stderr") } else { (&self.stdout, "stdout") };
        let fd = match lock(slot).take() {
            Some(fd) => fd,
            // A tty has no separate stderr; a finished stream has nothing more to give.
            None if stderr && self.is_tty() => return Ok(()),
            None => return Err(IoError::AlreadyAttached(what).into()),
        };
        let afd = async_fd(fd).map_err(|e| IoError::Io(what, e))?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = {
                let mut guard = afd.readable().await.map_err(|e| IoError::Io(what, e))?;
                match guard.try_io(|inner| read_fd(inner.get_ref(), &mut buf)) {
                    Ok(Ok(n)) => n,
                    // A pty master reports EIO once every slave fd is closed: that is EOF.
                    Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => 0,
                    Ok(Err(e)) => return Err(IoError::Io(what, e).into()),
                    Err(_would_block) => continue,
                }
            };
            if n == 0 {
                return Ok(());
            }
            let chunk = buf[..n].to_vec();
            if let Err(err) = sink(chunk).await {
                *lock(slot) = Some(afd.into_inner());
                return Err(err);
            }
        }
    }

    /// Writes all of `data` to the process's stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), IoError> {
        let fd = lock(&self.stdin)
            .as_ref()
            .map(|fd| fd.try_clone())
            .transpose()
            .map_err(|e| IoError::Io("stdin", e))?
            .ok_or(IoError::StdinClosed)?;
        let afd = async_fd(fd).map_err(|e| IoError::Io("stdin", e))?;
        let mut rest = data;
        while !rest.is_empty() {
            let mut guard = afd.writable().await.map_err(|e| IoError::Io("stdin", e))?;
            match guard.try_io(|inner| write_fd(inner.get_ref(), rest)) {
                Ok(Ok(n)) => rest = &rest[n..],
                Ok(Err(e)) => return Err(IoError::Io("stdin", e)),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Closes stdin: EOF for a pipe, ^D for a terminal (whose master must stay open).
    pub async fn close_stdin(&self) -> Result<(), IoError> {
        if self.is_tty() {
            self.write_stdin(&[4]).await?;
        }
        lock(&self.stdin).take();
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), IoError> {
        let master = self.tty.as_ref().ok_or(IoError::NoTerminal)?;
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the whole call.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(IoError::Io("tty", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// A unix socket libcontainer connects to and sends the pty master over.
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> Result<Self, IoError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(IoError::ConsoleSocket)?;
        Ok(Self { listener })
    }

    /// Receives the master after the build returned: libcontainer connected during the build
    /// and the container sent the fd before it reported ready, so both wait in the socket.
    pub fn receive_master(&self) -> Result<OwnedFd, IoError> {
        self.listener.set_nonblocking(true).map_err(IoError::ConsoleSocket)?;
        let (conn, _) = self.listener.accept().map_err(IoError::ConsoleSocket)?;
        conn.set_nonblocking(true).map_err(IoError::ConsoleSocket)?;
        let mut name = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| IoError::ConsoleSocket(e.into()))?;
        for c in msg.cmsgs().map_err(|e| IoError::ConsoleSocket(e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(&fd) = fds.first() {
                    // SAFETY: SCM_RIGHTS just installed this fd in our table; we own it now.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(IoError::NoPtyMaster)
    }
}

/// Registers an owned fd with the reactor.
pub fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor and always returns the same raw fd; the
    // AsyncFd owns it until it is dropped or `into_inner` hands it back.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn dev_null() -> Result<OwnedFd, IoError> {
    let file = std::fs::File::open("/dev/null").map_err(|e| IoError::Io("stdin", e))?;
    Ok(OwnedFd::from(file))
}

fn pipe(what: &'static str) -> Result<(OwnedFd, OwnedFd), IoError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| IoError::Pipe(what, e))
}

fn set_nonblocking(fd: RawFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    Ok(nix::unistd::read(fd.as_raw_fd(), buf)?)
}

fn write_fd(fd: &OwnedFd, buf: &[u8]) -> std::io::Result<usize> {
    Ok(nix::unistd::write(fd.as_fd(), buf)?)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn output_is_kept_until_a_reader_attaches_and_ends_at_eof() {
        let (io, child) = ProcessIo::pipes(true).expect("pipes");
        let mut w = std::fs::File::from(child.stdout);
        w.write_all(b"early ").expect("write");
        w.write_all(b"output").expect("write");
        drop(w);
        let mut got = Vec::new();
        io.read_output(false, |c| {
            got.extend(c);
            async { Ok::<(), IoError>(()) }
        })
        .await
        .expect("read");
        assert_eq!(got, b"early output");
    }

    #[tokio::test]
    async fn second_reader_is_refused_while_first_is_attached() {
        let (io, _child) = ProcessIo::pipes(true).expect("pipes");
        lock(&io.stdout).take();
        let r = io.read_output(false, |_| async { Ok::<(), IoError>(()) }).await;
        assert!(matches!(r, Err(IoError::AlreadyAttached("stdout"))));
    }

    #[tokio::test]
    async fn stdin_reaches_the_child_and_close_gives_eof() {
        let (io, child) = ProcessIo::pipes(true).expect("pipes");
        io.write_stdin(b"hello").await.expect("write");
        io.close_stdin().await.expect("close");
        let mut s = String::new();
        std::fs::File::from(child.stdin).read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello");
    }

    #[tokio::test]
    async fn without_stdin_the_child_reads_dev_null() {
        let (io, child) = ProcessIo::pipes(false).expect("pipes");
        let target = std::fs::read_link(format!("/proc/self/fd/{}", child.stdin.as_raw_fd())).expect("readlink");
        assert_eq!(target, Path::new("/dev/null"));
        assert!(matches!(io.write_stdin(b"x").await, Err(IoError::StdinClosed)));
        io.close_stdin().await.expect("closing an absent stdin is harmless");
    }
}
