//! The VM seam of kata-rs: backend-neutral traits ([`Hypervisor`] makes a [`Vm`] from a [`VmConfig`]; [`Snapshot`]
//! saves one for templating) and the QEMU backend ([`Qemu`]).
//!
//! The runtime maps its configuration onto [`VmConfig`], drives VMs only through these traits, and persists
//! [`Vm::pids`] and [`Vm::agent_endpoint`] so another process can find the VM again ([`Hypervisor::attach`]) or
//! clean up after a crash ([`cleanup_vm`]). Nothing here knows about containerd, TOML, or the agent protocol. The
//! guest console ([`GuestConsole`]) and the host processes' own output ([`ProcessOutput`]) are bounded in-memory
//! rings, never host files.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub mod accel;
pub mod config;
pub mod console;
mod error;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod tsc;

pub use accel::{detect_accel, resolve_accel, Accel, AccelChoice, AccelReport, KvmStatus};
pub use config::{
    AgentEndpoint, AgentTransport, GuestMemory, MachineType, NetDevice, QemuConfig, SharedFs, VmConfig, VmSize,
    DEFAULT_SECCOMP_SANDBOX, SHARED_FS_TAG,
};
pub use console::{ConsoleEvent, ConsoleFollower, GuestConsole, RateLimit};
pub use error::{Error, Result};
pub use process::{cleanup_vm, pid_alive, CleanupReport, ProcessOutput, ProcessRole, VmExit, VmProcess};
pub use qemu::Qemu;

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

/// A VM backend: makes VMs from a [`VmConfig`], and finds one again from what was persisted about it.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// A VM for `config`, not prepared or started.
    fn vm(&self, config: VmConfig) -> Arc<dyn Vm>;

    /// A running VM that this backend started, possibly in another process that has since exited, found by
    /// what [`Vm::saved`] recorded. It can be paused, resumed, queried, waited for and stopped; its console is
    /// the part the attaching process sees (nothing of what came before).
    async fn attach(&self, saved: SavedVm) -> Result<Arc<dyn Vm>>;

    /// The unix sockets a VM of this backend creates in `work_dir` (each must fit in 107 bytes).
    fn sockets(&self, work_dir: &Path) -> Vec<std::path::PathBuf>;

    /// The host programs whose build shapes the guest of `config` (the VMM binary): a template made with
    /// another build of one of them is not used.
    fn programs(&self, config: &VmConfig) -> Vec<std::path::PathBuf>;

    /// The VMM's command line for `config` on this host, with values that differ between VMs of one shape
    /// (measured frequencies) left out: saved device state loads only into the same machine, so a template made
    /// by a build that launched VMs differently is not used either.
    fn launch_shape(&self, _config: &VmConfig) -> Vec<String> {
        Vec::new()
    }
}

/// What another process needs to find a running VM again: persist it beside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedVm {
    /// The VM's configuration (its tap fds left out).
    pub config: VmConfig,
    /// Its host processes, VMM first, with start times so a reused PID is never taken for them.
    pub processes: Vec<VmProcess>,
}

/// One VM and its host-side helper processes.
///
/// All methods take `&self` so one task can sit in [`wait`](Vm::wait) while another calls [`stop`](Vm::stop).
/// A VM's life is not tied to this value: dropping it without [`stop`](Vm::stop) leaves the VM running (the
/// runtime persists [`saved`](Vm::saved) first, so it can be stopped by id later). Growing it (CPU and memory
/// hot-plug, [`resize`](Vm::resize)) is part of the trait; hot-plugging other devices is not yet: it arrives with
/// the first caller that needs it.
#[async_trait::async_trait]
pub trait Vm: Send + Sync + fmt::Debug {
    /// Checks the configuration, chooses the accelerator and creates the work dir. Starts nothing.
    async fn prepare(&self) -> Result<()>;

    /// Boots the VM (preparing first if needed): helpers, then the VMM. Returns once the VMM's control channel
    /// answers, not when the guest is up; the agent connection tells that. On failure nothing is left running.
    async fn start(&self) -> Result<()>;

    /// Stops the VM, gracefully then forcibly, reaps it and its helpers and removes the work dir. Idempotent.
    async fn stop(&self) -> Result<()>;

    /// Resolves when the VMM process exits, with how it exited.
    async fn wait(&self) -> Result<VmExit>;

    /// Pauses all vCPUs.
    async fn pause(&self) -> Result<()>;

    /// Resumes all vCPUs.
    async fn resume(&self) -> Result<()>;

    async fn status(&self) -> Result<VmStatus>;

    /// Where the host reaches the agent, once prepared; `None` when the VM has no agent channel.
    fn agent_endpoint(&self) -> Option<AgentEndpoint>;

    /// The host processes of this VM still running (VMM first), to persist for crash cleanup.
    fn pids(&self) -> Vec<VmProcess>;

    /// What [`Hypervisor::attach`] needs to find this VM again.
    fn saved(&self) -> SavedVm;

    /// The guest serial console: its last lines (also after the VM exited) and new ones as they come.
    fn console(&self) -> &GuestConsole;

    /// The running VM's vCPUs and memory as the VMM reports them now, so also right for a VM that
    /// [`Hypervisor::attach`] found again, or that another process grew.
    async fn size(&self) -> Result<VmSize>;

    /// Grows the running VM to at least `want` by hot-plugging vCPUs and memory, and returns its new size. Never
    /// shrinks: a `want` at or below the current size (in either part) leaves that part alone, and one at or
    /// below in both is a no-op. Returns once the guest kernel took the new devices; they come up offline, so
    /// the guest's agent then onlines them. Fails with [`Error::Resize`], growing nothing, when the VM cannot
    /// grow that far (a machine without hot-plug, past the configured maximum, no slot left); a failure while
    /// plugging can leave it partly grown, which [`Vm::size`] tells.
    async fn resize(&self, want: VmSize) -> Result<VmSize>;

    /// Whether [`Vm::resize`] can grow this VM at all: its machine hot-plugs and it was started with room to grow.
    fn can_resize(&self) -> bool;

    /// Lets go of the running VM without stopping it: closes the control connection, so that another process
    /// can [`Hypervisor::attach`] to it (a VM cache handing the VM to a shim). The VM stays this process's
    /// child, reaped when it exits; nothing else should be asked of this handle afterwards.
    fn release(&self) {}

    /// Saving the VM as a template, when this backend can.
    fn snapshot(&self) -> Option<&dyn Snapshot> {
        None
    }
}

/// Saving a running VM so that others start from it ([`GuestMemory::Clone`] loads what this saved).
#[async_trait::async_trait]
pub trait Snapshot: Send + Sync {
    /// Pauses the guest and writes its device state to `state`; its RAM is already in the template's memory
    /// file ([`GuestMemory::Template`]). The VM stays paused; stop it afterwards.
    async fn save(&self, state: &Path) -> Result<()>;
}
