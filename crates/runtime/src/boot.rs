//! Boot a VM and connect to its agent: the one sequence every VM goes through (pods, templates, the bench
//! floor, the VM tests).

use std::sync::Arc;
use std::time::Duration;

use hypervisor::{AgentEndpoint, Vm, VmExit, VmProcess};
use tokio::sync::watch;

use crate::agent::{AgentClient, AgentDialer, AgentError, ReadySignal, AGENT_PORT};

/// Lines of the guest console quoted when the agent does not answer.
const CONSOLE_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("start the VM")]
    Vm(#[source] hypervisor::Error),
    #[error("the VM has no agent channel (no vsock daemon or serial port configured)")]
    NoAgentChannel,
    /// The cause is part of the message, before the console's lines, which read best last.
    #[error("connect to the agent: {}; last lines of the guest console:\n{console}", crate::error_chain(cause))]
    Connect { cause: AgentError, console: String },
    #[error("the VM exited ({exit}) before its agent answered; last lines of the guest console:\n{console}")]
    ExitedBeforeAgent { exit: VmExit, console: String },
}

impl BootError {
    /// The hypervisor's error, when starting the VM itself failed.
    pub fn vm_error(&self) -> Option<&hypervisor::Error> {
        match self {
            BootError::Vm(e) => Some(e),
            _ => None,
        }
    }
}

/// A booted VM's agent, and a watch that turns `Some` when the VM exits.
#[derive(Debug)]
pub struct Booted {
    pub agent: AgentClient,
    pub exit: watch::Receiver<Option<VmExit>>,
}

/// Starts `vm` (preparing it first unless the caller did), calls `started` with its processes (also when the start failed half-way, so the caller can
/// persist them for cleanup), then connects to the agent within `dial_timeout`. A VM that dies while we dial
/// ends the dial at once. On any failure after the start, the VM is stopped.
pub async fn boot_and_connect(
    vm: &Arc<dyn Vm>,
    dial_timeout: Duration,
    started: impl FnOnce(&[VmProcess]),
) -> Result<Booted, BootError> {
    boot_and_connect_with(vm, dial_timeout, None, started).await
}

/// [`boot_and_connect`], with the agent reached through `dialer` instead of the VM's endpoint when one is given
/// (a test double).
pub async fn boot_and_connect_with(
    vm: &Arc<dyn Vm>,
    dial_timeout: Duration,
    dialer: Option<Arc<dyn AgentDialer>>,
    started: impl FnOnce(&[VmProcess]),
) -> Result<Booted, BootError> {
    if matches!(vm.status().await, Ok(hypervisor::VmStatus::Created)) {
        vm.prepare().await.map_err(BootError::Vm)?;
    }
    let endpoint = vm.agent_endpoint().ok_or(BootError::NoAgentChannel)?;
    // Over vsock the agent says when it listens, on a socket that must exist before the guest runs.
    let ready = match &endpoint {
        AgentEndpoint::HybridVsock(socket) => Some(
            ReadySignal::bind(socket).map_err(|e| BootError::Connect { cause: e.into(), console: String::new() })?,
        ),
        _ => None,
    };
    let start = vm.start().await;
    started(&vm.pids());
    start.map_err(BootError::Vm)?;
    let exit = watch_exit(vm);
    let dial = async {
        match (&endpoint, &ready) {
            (AgentEndpoint::HybridVsock(socket), Some(ready)) => {
                AgentClient::connect_when_ready(ready, socket, AGENT_PORT, dial_timeout).await
            }
            _ => dial(&endpoint, dialer, dial_timeout).await,
        }
    };
    let mut exited = exit.clone();
    let connected = tokio::select! {
        connected = dial => connected.map_err(Some),
        _ = exited.wait_for(Option::is_some) => Err(None),
    };
    match connected {
        Ok(agent) => Ok(Booted { agent, exit }),
        Err(failure) => {
            let console = vm.console().tail(CONSOLE_LINES);
            if let Err(e) = vm.stop().await {
                tracing::warn!(error = %crate::error_chain(&e), "stopping a VM whose agent did not answer");
            }
            Err(match failure {
                Some(cause) => BootError::Connect { cause, console },
                None => {
                    let exit = exit.borrow().unwrap_or(VmExit { code: None, signal: None });
                    BootError::ExitedBeforeAgent { exit, console }
                }
            })
        }
    }
}

/// Connects to an agent that is up at `endpoint` (or through `dialer`, a test double), within `timeout`.
pub async fn dial(
    endpoint: &AgentEndpoint,
    dialer: Option<Arc<dyn AgentDialer>>,
    timeout: Duration,
) -> Result<AgentClient, AgentError> {
    match (dialer, endpoint) {
        (Some(dialer), _) => AgentClient::connect_with(dialer, timeout).await,
        (None, AgentEndpoint::HybridVsock(socket)) => AgentClient::connect(socket, AGENT_PORT, timeout).await,
        (None, AgentEndpoint::Serial(path)) => AgentClient::connect_serial(path, timeout).await,
    }
}

/// A watch that turns `Some` when `vm` exits, for whatever reason.
pub fn watch_exit(vm: &Arc<dyn Vm>) -> watch::Receiver<Option<VmExit>> {
    let (tx, rx) = watch::channel(None);
    let vm = vm.clone();
    tokio::spawn(async move {
        if let Ok(exit) = vm.wait().await {
            let _ = tx.send(Some(exit));
        }
    });
    rx
}
