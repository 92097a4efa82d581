//! The VM seam of kata-rs: a small backend-neutral [`Hypervisor`] trait and its QEMU backend ([`QemuVm`]).
//!
//! The runtime maps its configuration onto [`VmConfig`], drives the VM through [`Hypervisor`], and persists
//! [`Hypervisor::pids`] so a later `delete` can run [`cleanup_vm`] when the shim died. Nothing here knows about
//! containerd, TOML, or the agent protocol; the agent client only needs [`Hypervisor::agent_socket`]. The guest
//! console ([`GuestConsole`]) and the host processes' own output ([`ProcessOutput`]) are bounded in-memory rings,
//! never host files.

use std::fmt;
use std::path::PathBuf;

pub mod accel;
pub mod config;
pub mod console;
mod error;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod tsc;

pub use accel::{detect_accel, resolve_accel, Accel, AccelChoice, AccelReport, KvmStatus};
pub use config::{GuestMemory, MachineType, NetDevice, SharedFs, VmConfig, DEFAULT_SECCOMP_SANDBOX, SHARED_FS_TAG};
pub use console::{ConsoleEvent, ConsoleFollower, GuestConsole, RateLimit};
pub use error::{Error, Result};
pub use process::{cleanup_vm, CleanupReport, ProcessOutput, ProcessRole, VmExit, VmProcess};
pub use qemu::QemuVm;

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    /// Constructed, nothing checked or created yet.
    Created,
    /// Configuration checked and work dir created; nothing running.
    Prepared,
    Running,
    Paused,
    /// Running as a process, in a state the VMM reports by this name (e.g. `internal-error`, `guest-panicked`).
    Other(String),
    /// The VM process is gone; `None` when it never ran.
    Stopped(Option<VmExit>),
}

/// One VM and its host-side helper processes.
///
/// All methods take `&self` so one task can sit in [`wait`](Hypervisor::wait) while another calls
/// [`stop`](Hypervisor::stop). Hot-plugging devices (`add_device`) is not part of the trait yet: it arrives with
/// the first caller that needs it (block volumes, network hotplug).
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// Checks the configuration, chooses the accelerator and creates the work dir. Starts nothing.
    async fn prepare(&self) -> Result<()>;

    /// Boots the VM (preparing first if needed): helpers, then the VMM. Returns once the VMM's control channel
    /// answers, not when the guest is up; the agent connection tells that. On failure nothing is left running.
    async fn start(&self) -> Result<()>;

    /// Stops the VM, gracefully then forcibly, reaps it and its helpers and removes the work dir. Idempotent.
    async fn stop(&self) -> Result<()>;

    /// Resolves when the VM process exits, with how it exited.
    async fn wait(&self) -> Result<VmExit>;

    /// Pauses all vCPUs.
    async fn pause(&self) -> Result<()>;

    /// Resumes all vCPUs.
    async fn resume(&self) -> Result<()>;

    async fn status(&self) -> Result<VmStatus>;

    /// The unix socket the host connects to for guest vsock ports (hybrid vsock: `CONNECT <port>\n`), or `None`
    /// when the VM has no vsock device.
    fn agent_socket(&self) -> Option<PathBuf>;

    /// The host processes of this VM still running (VMM first), to persist for crash cleanup.
    fn pids(&self) -> Vec<VmProcess>;

    /// The guest serial console: its last lines (also after the VM exited) and new ones as they come.
    fn console(&self) -> &GuestConsole;
}
