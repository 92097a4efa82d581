//! Process IO: containerd's FIFOs on one side, the agent's streams on the other.
//!
//! Output streams end only at EOF in the guest, and the exit of a process is reported only after its output
//! copies finished, so `ctr run` sees all output before the exit.
//!
//! stdin is forwarded as runc's shim does it: the shim holds a writer of the stdin FIFO itself, so a client can
//! detach (close its writer) and attach again without the process seeing end of file; CloseIO drops that writer,
//! and the process sees end of file once the clients closed theirs and everything they wrote was delivered.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::agent::{AgentClient, AgentError, ProcessRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// The FIFO paths containerd gave for one process; empty strings mean "not connected".
#[derive(Debug, Clone, Default)]
pub struct IoPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Running copies for one process: the output copies end at EOF; stdin forwarding ends after CloseIO.
#[derive(Debug, Default)]
pub struct IoCopies {
    pub outputs: Vec<JoinHandle<()>>,
    pub stdin: Option<StdinCopy>,
}

/// stdin forwarding from containerd's FIFO to the process. Dropping it stops the forwarding at once (the
/// process was deleted); [`StdinCopy::close`] lets it finish.
#[derive(Debug)]
pub struct StdinCopy {
    /// The shim's own writer of the FIFO, which keeps a detaching client from ending the process's input.
    writer: Option<std::fs::File>,
    task: JoinHandle<()>,
}

impl StdinCopy {
    /// CloseIO: forwarding ends, and the process reads end of file, once every client closed its writer and what
    /// they wrote was delivered.
    pub fn close(&mut self) {
        self.writer.take();
    }
}

impl Drop for StdinCopy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resolves when every output copy reached EOF (or failed).
pub async fn outputs_done(outputs: Vec<JoinHandle<()>>) {
    for h in outputs {
        let _ = h.await;
    }
}

/// Connects the process's streams to the FIFOs and starts copying.
pub async fn attach(agent: &AgentClient, process: &ProcessRef, paths: &IoPaths) -> Result<IoCopies, AgentError> {
    let mut copies = IoCopies::default();
    let stdout = agent.read_stdout(process).await?;
    copies.outputs.push(tokio::spawn(copy_out(stdout, fifo(&paths.stdout), "stdout")));
    if !paths.terminal {
        let stderr = agent.read_stderr(process).await?;
        copies.outputs.push(tokio::spawn(copy_out(stderr, fifo(&paths.stderr), "stderr")));
    }
    if let Some(path) = fifo(&paths.stdin) {
        let (mut reader, writer) = match open_stdin(&path) {
            Ok(ends) => ends,
            Err(e) => {
                // As for an output FIFO: the process runs, without input.
                tracing::warn!(path = %path.display(), error = %e, "cannot open the stdin FIFO");
                return Ok(copies);
            }
        };
        let sink = agent.stdin(process).await?;
        let (agent, process) = (agent.clone(), process.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(container = %process.container_id, exec = ?process.exec_id, error = %e, "cannot read the stdin FIFO");
                        break;
                    }
                };
                if let Err(e) = sink.write(&buf[..n]).await {
                    tracing::warn!(container = %process.container_id, exec = ?process.exec_id, error = %crate::error_chain(&e), "cannot forward stdin");
                    return;
                }
            }
            // Every writer closed, ours included (CloseIO): the process must see EOF too.
            let _ = sink.finish().await;
            if let Err(e) = agent.close_stdin(&process).await {
                tracing::debug!(container = %process.container_id, exec = ?process.exec_id, error = %crate::error_chain(&e), "close stdin");
            }
        });
        copies.stdin = Some(StdinCopy { writer: Some(writer), task });
    }
    Ok(copies)
}

/// Opens the stdin FIFO for reading and, once a reader exists so the open cannot fail with ENXIO, for writing.
/// With our own writer open, a read of 0 is a real end of file: no writer is left, ours included.
fn open_stdin(path: &Path) -> std::io::Result<(pipe::Receiver, std::fs::File)> {
    let reader = pipe::OpenOptions::new().open_receiver(path)?;
    let writer = std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_NONBLOCK).open(path)?;
    Ok((reader, writer))
}

fn fifo(path: &str) -> Option<PathBuf> {
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Copies an agent output stream into a FIFO; without a FIFO the output is drained so the process never blocks.
async fn copy_out(mut stream: crate::agent::OutputStream, path: Option<PathBuf>, name: &'static str) {
    let mut sink = match path.as_deref().map(open_writer).transpose() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(stream = name, error = %e, "cannot open the FIFO");
            None
        }
    };
    loop {
        match stream.next().await {
            Ok(Some(chunk)) => {
                if let Some(w) = sink.as_mut() {
                    if let Err(e) = w.write_all(&chunk).await {
                        tracing::warn!(stream = name, error = %e, "cannot write to the FIFO");
                        sink = None;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(stream = name, error = %crate::error_chain(&e), "stream ended");
                break;
            }
        }
    }
}

/// Opens a FIFO for writing without blocking on a reader (read-write open), as containerd may reopen it.
fn open_writer(path: &Path) -> std::io::Result<pipe::Sender> {
    pipe::OpenOptions::new().read_write(true).open_sender(path)
}
