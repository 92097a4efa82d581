//! `--console-socket`: the container's terminal, as runc hands it over. A pty is made on the host and its master
//! sent to the caller's socket (SCM_RIGHTS, the pty's name as the message), where the runc shim copies it to the
//! client. The guest runs the process on a terminal of its own; the host pty is a raw pass-through: its slave
//! is relayed to and from two FIFOs that the runtime's IO copying reads and writes, and a window-size change
//! on it (the shim's ResizePty sets it on the master) is passed on to the guest's terminal.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use runtime::io::IoPaths;

/// How often the pty's window size is looked at.
const RESIZE_POLL: Duration = Duration::from_millis(200);

/// The host side of a container's terminal.
#[derive(Debug)]
pub struct Terminal {
    slave: Arc<File>,
    stdin_fifo: PathBuf,
    stdout_fifo: PathBuf,
}

impl Terminal {
    /// Makes the pty, sends its master to `console_socket` and the FIFOs in `dir` (the container's private
    /// directory) the runtime copies the terminal through.
    pub fn open(console_socket: &Path, dir: &Path, name: &str) -> Result<Terminal> {
        let pty = nix::pty::openpty(None, None).context("make a pty")?;
        let mut raw = tcgetattr(&pty.slave).context("read the pty's settings")?;
        cfmakeraw(&mut raw);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &raw).context("make the pty raw")?;
        send_master(console_socket, &pty.master)?;
        drop(pty.master);
        let stdin_fifo = dir.join(format!("{name}.tty-in"));
        let stdout_fifo = dir.join(format!("{name}.tty-out"));
        for fifo in [&stdin_fifo, &stdout_fifo] {
            let _ = std::fs::remove_file(fifo);
            nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .with_context(|| format!("make {}", fifo.display()))?;
        }
        Ok(Terminal { slave: Arc::new(File::from(pty.slave)), stdin_fifo, stdout_fifo })
    }

    /// The container's IO: one terminal stream in and out.
    pub fn io_paths(&self) -> IoPaths {
        IoPaths {
            stdin: self.stdin_fifo.display().to_string(),
            stdout: self.stdout_fifo.display().to_string(),
            stderr: String::new(),
            terminal: true,
        }
    }

    /// Starts relaying between the pty and the FIFOs, and calls `resize(rows, cols)` (on a thread of its own)
    /// whenever the pty's window size changes, for the guest's terminal to follow. Both last as long as this
    /// process.
    pub fn relay(&self, mut resize: impl FnMut(u16, u16) + Send + 'static) -> Result<()> {
        // Read-write opens: neither blocks for the other end, and neither sees end of file when it goes.
        let open = |path: &Path| {
            std::fs::OpenOptions::new().read(true).write(true).custom_flags(nix::libc::O_CLOEXEC).open(path)
        };
        let mut to_guest = open(&self.stdin_fifo).context("open the terminal's input FIFO")?;
        let mut from_guest = open(&self.stdout_fifo).context("open the terminal's output FIFO")?;
        let mut keys = self.slave.try_clone().context("dup the pty")?;
        std::thread::spawn(move || copy(&mut keys, &mut to_guest));
        let mut screen = self.slave.try_clone().context("dup the pty")?;
        std::thread::spawn(move || copy(&mut from_guest, &mut screen));
        let slave = self.slave.clone();
        std::thread::spawn(move || {
            let mut last = None;
            loop {
                let size = window_size(&slave);
                if let Some((rows, cols)) = size.filter(|_| size != last) {
                    resize(rows, cols);
                    last = size;
                }
                std::thread::sleep(RESIZE_POLL);
            }
        });
        Ok(())
    }

    /// Removes the FIFOs (an exec's, when it ends; a container's go with its directory).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.stdin_fifo);
        let _ = std::fs::remove_file(&self.stdout_fifo);
    }
}

fn copy(from: &mut File, to: &mut File) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Rows and columns of the pty; `None` while they are 0 (never set) or unreadable.
fn window_size(pty: &File) -> Option<(u16, u16)> {
    let mut size = nix::libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which lives across the call; the fd is
    // open for as long as `pty` is borrowed.
    let rc = unsafe { nix::libc::ioctl(pty.as_raw_fd(), nix::libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// Sends `master` over the console socket, as runc does: one message carrying the fd, with the pty's name.
fn send_master(console_socket: &Path, master: &OwnedFd) -> Result<()> {
    let stream = UnixStream::connect(console_socket)
        .with_context(|| format!("connect to the console socket {}", console_socket.display()))?;
    let fds = [master.as_fd().as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .with_context(|| format!("send the terminal to {}", console_socket.display()))?;
    Ok(())
}
