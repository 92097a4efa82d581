//! Process IO: containerd's FIFOs on one side, the agent's streams on the other.
//!
//! Output streams end only at EOF in the guest, and the exit of a process is reported only after its output
//! copies finished, so `ctr run` sees all output before the exit.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::agent::{AgentClient, AgentError, ProcessRef};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The FIFO paths containerd gave for one process; empty strings mean "not connected".
#[derive(Debug, Clone, Default)]
pub struct IoPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Running copies for one process: the output copies end at EOF; stdin forwarding is stopped by CloseIO.
#[derive(Debug, Default)]
pub struct IoCopies {
    pub outputs: Vec<JoinHandle<()>>,
    pub stdin: Option<JoinHandle<()>>,
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
        let sink = agent.stdin(process).await?;
        let (agent, process) = (agent.clone(), process.clone());
        copies.stdin = Some(tokio::spawn(async move {
            let mut chunks = read_fifo_in_thread(path);
            while let Some(chunk) = chunks.recv().await {
                if let Err(e) = sink.write(&chunk).await {
                    tracing::warn!("stdin of {process:?}: {}", crate::error_chain(&e));
                    return;
                }
            }
            // EOF from containerd's side: the process must see EOF too.
            let _ = sink.finish().await;
            if let Err(e) = agent.close_stdin(&process).await {
                tracing::debug!("close stdin of {process:?}: {}", crate::error_chain(&e));
            }
        }));
    }
    Ok(copies)
}

fn fifo(path: &str) -> Option<PathBuf> {
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Copies an agent output stream into a FIFO; without a FIFO the output is drained so the process never blocks.
async fn copy_out(mut stream: crate::agent::OutputStream, path: Option<PathBuf>, name: &'static str) {
    let mut sink = match path.as_deref().map(open_writer).transpose() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("open {name} FIFO: {e}");
            None
        }
    };
    loop {
        match stream.next().await {
            Ok(Some(chunk)) => {
                if let Some(w) = sink.as_mut() {
                    if let Err(e) = w.write_all(&chunk).await {
                        tracing::warn!("write {name}: {e}");
                        sink = None;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("{name} stream ended: {}", crate::error_chain(&e));
                break;
            }
        }
    }
}

/// Opens a FIFO for writing without blocking on a reader (read-write open), as containerd may reopen it.
fn open_writer(path: &Path) -> std::io::Result<pipe::Sender> {
    pipe::OpenOptions::new().read_write(true).open_sender(path)
}

/// Reads a FIFO with blocking calls in its own thread: the open waits for containerd's writer, and a read of 0
/// is a real EOF (the writer closed), which non-blocking opens cannot tell from "no writer yet".
fn read_fifo_in_thread(path: PathBuf) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("open stdin FIFO {}: {e}", path.display());
                return;
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}
