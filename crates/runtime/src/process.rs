//! Bookkeeping for one process (a container's init or an exec) and the task that waits for its exit.

use std::time::{Duration, SystemTime};

use crate::agent::{AgentClient, ProcessRef};
use hypervisor::VmExit;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::io::{self, IoPaths};

/// Exit status reported when the VM died under a process (containerd's convention for "unknown").
pub const VM_DIED_STATUS: u32 = 255;

/// How long output may still flow after the process exited, e.g. from a background child holding stdout.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Created,
    Running,
    Stopped,
}

#[derive(Debug)]
pub struct Process {
    pub io: IoPaths,
    /// OCI process JSON of an exec, kept from Exec until Start.
    pub exec_spec: Option<Vec<u8>>,
    pub started: bool,
    exit_tx: watch::Sender<Option<Exit>>,
    /// stdin forwarding, ended by CloseIO, stopped when the process is deleted.
    pub stdin: Option<io::StdinCopy>,
    /// Output copies, handed to the waiter at start.
    pub outputs: Vec<JoinHandle<()>>,
}

impl Process {
    pub fn new(io: IoPaths, exec_spec: Option<Vec<u8>>) -> Self {
        Process { io, exec_spec, started: false, exit_tx: watch::channel(None).0, stdin: None, outputs: Vec::new() }
    }

    pub fn phase(&self) -> Phase {
        match (*self.exit_tx.borrow(), self.started) {
            (Some(_), _) => Phase::Stopped,
            (None, true) => Phase::Running,
            (None, false) => Phase::Created,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    /// Marks a never-started process as gone (its container was deleted or the VM died before start).
    pub fn set_exit(&self, exit: Exit) {
        self.exit_tx.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exit);
                true
            } else {
                false
            }
        });
    }

    /// Starts the task that waits for the process in the guest, then for its output, then records the exit and
    /// calls `on_exit` (which publishes TaskExit). A dead VM ends the wait with [`VM_DIED_STATUS`].
    pub fn spawn_waiter(
        &mut self,
        agent: AgentClient,
        mut vm_exit: watch::Receiver<Option<VmExit>>,
        process: ProcessRef,
        on_exit: impl FnOnce(Exit) + Send + 'static,
    ) {
        let outputs = std::mem::take(&mut self.outputs);
        let exit_tx = self.exit_tx.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                r = agent.wait_process(&process) => match r {
                    Ok(e) => u32::try_from(e.status).unwrap_or(VM_DIED_STATUS),
                    Err(e) => {
                        tracing::warn!(container = %process.container_id, exec = ?process.exec_id, error = %crate::error_chain(&e), "wait for a process");
                        VM_DIED_STATUS
                    }
                },
                _ = vm_exit.wait_for(Option::is_some) => VM_DIED_STATUS,
            };
            let _ = tokio::time::timeout(OUTPUT_GRACE, io::outputs_done(outputs)).await;
            let exit = Exit { status, at: SystemTime::now() };
            exit_tx.send_replace(Some(exit));
            on_exit(exit);
        });
    }
}
