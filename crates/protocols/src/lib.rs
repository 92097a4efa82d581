//! The kata-rs host <-> agent protocol: `kata.agent.v1.Agent` over ttrpc.
//!
//! Both sides use the generated code re-exported here; each side converts between these wire
//! types and its internal types in exactly one module (agent: `rpc::convert`, runtime:
//! `agent::convert`). The network description is the same on both sides, so it lives in [`net`]; the
//! port-forward stream, which runs beside ttrpc on a vsock port of its own, in [`forward`].

#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    unreachable_pub,
    missing_debug_implementations
)]
mod generated;

pub use generated::agent;
pub use generated::agent_ttrpc;

pub mod forward;
pub mod net;

/// Bumped on incompatible changes to `proto/agent.proto`.
pub const PROTOCOL_VERSION: u32 = 2;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port of the agent's port-forward listener: one connection per forwarded TCP connection, speaking
/// [`forward`]'s protocol.
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1026;

/// The host port the agent connects to (guest -> host, CID 2) once it listens on [`AGENT_VSOCK_PORT`], so
/// the host dials only when the guest's vsock is up. Dialling earlier queues a request in vhost-device-vsock
/// that can be lost for good when it arrives before the guest driver is ready.
pub const AGENT_READY_PORT: u32 = 1025;

/// The name of the virtio-serial port that carries the agent's ttrpc when the VM has no vsock (VMs made from
/// a template: vhost-user devices cannot be migrated).
pub const AGENT_SERIAL_PORT: &str = "agent.channel.0";

/// The kernel parameter that tells the agent to serve on [`AGENT_SERIAL_PORT`] instead of vsock.
pub const AGENT_SERIAL_PARAM: &str = "agent.transport=serial";

pub use ttrpc;

/// Where a guest spec names "the namespace of container `container_id`'s init" (`kind` as in `/proc/<pid>/ns/`:
/// `ipc`, `uts`, `pid`): the host's join of a pod's sandbox container namespace, e.g. `/proc/<pause pid>/ns/ipc`,
/// becomes this, and the agent resolves it to that container's init in the guest.
pub fn container_namespace_path(container_id: &str, kind: &str) -> String {
    format!("{CONTAINER_NAMESPACE_DIR}/{container_id}/{kind}")
}

/// The prefix of [`container_namespace_path`]; nothing is mounted there.
pub const CONTAINER_NAMESPACE_DIR: &str = "/run/kata-containers/namespaces";

/// The guest cgroup of a container: the host writes it into the spec's `cgroupsPath`, the agent refuses any
/// other.
pub fn container_cgroup(container_id: &str) -> String {
    format!("/kata/{container_id}")
}

/// `err` and its sources, `: `-separated ("outer: middle: inner"). Library errors do not repeat their source in
/// their own message, and both sides put the whole cause into logs and RPC statuses.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
