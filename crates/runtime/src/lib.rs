//! The lifecycle of sandboxes, their containers and processes on the host, for every front end (the containerd
//! shim, the CLI): boots VMs through `hypervisor`'s traits, talks to the guest through the [`agent`] client,
//! shares container filesystems into the VM, and persists what another process needs to find a sandbox again.
//! No containerd types here.

pub mod agent;
pub mod boot;
mod console;
pub mod factory;
/// A VMM that starts nothing, for unit tests of the lifecycle (feature `test-doubles`).
#[cfg(any(test, feature = "test-doubles"))]
pub mod fake_vm;
pub mod host_cgroup;
pub mod host_fs;
pub mod io;
pub mod lifecycle;
#[cfg(test)]
mod lifecycle_tests;
pub mod mounts;
pub mod network;
pub mod paths;
mod persist;
pub mod placement;
pub mod pod_config;
pub mod process;
pub mod resize;
#[cfg(test)]
mod resize_tests;
pub mod resources;
pub mod sandbox;
pub mod spec;
pub mod state;
pub mod vm_cache;
pub mod vm_config;

/// Which accelerator this host offers (KVM, or TCG and why), for host checks (`kata-runtime check`).
pub use hypervisor::accel;
pub use hypervisor::{GuestConsole, VmExit};
pub use lifecycle::{Deleted, ErrorKind, LifecycleError, ProcessState, Status};
pub use process::Exit;
pub use protocols::error_chain;
pub use sandbox::{Host, Rootfs, Sandbox, SandboxError, SandboxOptions};
