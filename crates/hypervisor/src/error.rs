//! Errors of the [`crate::Vm`] trait, shared by every backend.

use std::path::PathBuf;
use std::time::Duration;

use crate::accel::AccelError;
use crate::process::{ProcessRole, VmExit};
use crate::qmp::QmpError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot {op} a VM that is {state}")]
    InvalidState { op: &'static str, state: &'static str },
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error("{context}")]
    Io { context: String, source: std::io::Error },
    #[error("cannot start {role} ({program})")]
    Spawn { role: ProcessRole, program: PathBuf, source: std::io::Error },
    #[error("{role} exited during VM start ({status}); last lines of its output:\n{tail}")]
    HelperExited { role: ProcessRole, status: VmExit, tail: String },
    #[error("{role} did not create {socket} within {timeout:?}; last lines of its output:\n{tail}")]
    SocketTimeout { role: ProcessRole, socket: PathBuf, timeout: Duration, tail: String },
    #[error("{vmm} exited during VM start ({status}); last lines of its output:\n{vmm_tail}\nlast lines of the console:\n{console_tail}")]
    VmmExited { vmm: &'static str, status: VmExit, vmm_tail: String, console_tail: String },
    #[error("VM template: {0}")]
    Migration(String),
    /// A clone could not load its template's saved state (QEMU refused it or died loading it).
    /// The cause is part of the message: callers that show one line (the shim's error to containerd) keep it.
    #[error("cannot load the VM template's state {state}: {cause}")]
    StateLoad { state: PathBuf, cause: Box<Error> },
    /// The VM cannot grow as asked; `reason` says why and what to change.
    #[error("cannot grow the VM: {reason}")]
    Resize { reason: String },
    /// The guest did not take hot-plugged devices (no ACPI acknowledgement, or a failed one).
    #[error("the guest did not take the hot-plugged {devices}: {reason}")]
    GuestRejected { devices: String, reason: String },
    #[error("QMP request failed")]
    Qmp(#[from] QmpError),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
