//! Runtime-side types of agent calls (the wire types stay inside `convert`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentVersion {
    pub agent_version: String,
    pub protocol_version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDetails {
    pub kernel_release: String,
    pub agent_version: String,
    pub boot_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedFsType {
    VirtioFs,
    NineP,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFsMount {
    pub fs_type: SharedFsType,
    pub tag: String,
    /// Guest mount point; None for the agent's default (/run/kata-containers/shared).
    pub mount_point: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxSetup {
    pub sandbox_id: String,
    pub hostname: String,
    /// resolv.conf lines.
    pub dns: Vec<String>,
    pub shared_fs: Option<SharedFsMount>,
    /// None leaves the guest clock alone.
    pub host_time: Option<SystemTime>,
    /// Host randomness the guest reseeds its generator with; empty sends none.
    pub entropy: Vec<u8>,
}

/// A process in a container: `exec_id` None is the container's init.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessRef {
    pub container_id: String,
    pub exec_id: Option<String>,
}

impl ProcessRef {
    pub fn init(container_id: impl Into<String>) -> Self {
        Self { container_id: container_id.into(), exec_id: None }
    }

    pub fn exec(container_id: impl Into<String>, exec_id: impl Into<String>) -> Self {
        Self { container_id: container_id.into(), exec_id: Some(exec_id.into()) }
    }
}

/// The processes of a container, as guest pids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessList {
    pub pids: Vec<i32>,
    /// The container's init among them, while it runs.
    pub init: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    pub exited_at: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuStats {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryStats {
    pub usage: u64,
    /// None when unlimited.
    pub limit: Option<u64>,
    pub stat: HashMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PidsStats {
    pub current: u64,
    /// None when unlimited.
    pub limit: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IoStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerStats {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
    pub io: IoStats,
}

/// The guest network is described in the protocol's own terms on both sides.
pub use protocols::net::{ArpNeighbor, Interface, IpNet, Route};
