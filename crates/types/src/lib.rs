//! Types shared by the kata-rs host components and the guest agent.
//!
//! [`config`] is the Kata-compatible `configuration.toml`: schema and defaults, loading
//! precedence, drop-ins, provenance, annotations and validation.
//!
//! [`mountinfo`] parses `/proc/self/mountinfo`, for the runtime, the agent and the host tools.

pub mod config;
pub mod mountinfo;
