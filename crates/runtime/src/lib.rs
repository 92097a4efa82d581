//! Sandbox and container lifecycle on the host: boots the VM through `hypervisor`, talks to the guest through
//! the [`agent`] client, and shares container filesystems into the VM. No containerd types here.

pub mod agent;
pub mod factory;
pub mod host_fs;
pub mod mounts;
pub mod network;
pub mod paths;
pub mod sandbox;
pub mod spec;
pub mod state;
pub mod vm_config;

pub use sandbox::{Rootfs, Sandbox, SandboxError, SandboxOptions};
