//! Sandbox and container lifecycle on the host: boots the VM through `hypervisor`, talks to the guest through
//! the [`agent`] client, and shares container filesystems into the VM. No containerd types here.

pub mod agent;
pub mod boot;
mod console;
pub mod factory;
/// A VMM that starts nothing, for unit tests of the lifecycle (feature `test-doubles`).
#[cfg(any(test, feature = "test-doubles"))]
pub mod fake_vm;
pub mod host_fs;
pub mod io;
pub mod lifecycle;
#[cfg(test)]
mod lifecycle_tests;
pub mod mounts;
pub mod network;
pub mod paths;
pub mod pod_config;
pub mod process;
pub mod sandbox;
pub mod spec;
pub mod state;
pub mod vm_config;

pub use hypervisor::{GuestConsole, VmExit};
pub use lifecycle::{Deleted, ErrorKind, LifecycleError, ProcessState, Status};
pub use process::Exit;
pub use protocols::error_chain;
pub use sandbox::{Host, Rootfs, Sandbox, SandboxError, SandboxOptions};
