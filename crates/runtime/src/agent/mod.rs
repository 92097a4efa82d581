//! The host side of the agent protocol: [`AgentClient`] over an [`AgentDialer`].
//!
//! Wire types never leave this module: callers use the types in [`types`], and `convert` is
//! the only place that maps between the two.

mod client;
/// Public only so `fuzz/` can feed it what a hostile agent sends; callers use [`AgentClient`].
#[doc(hidden)]
pub mod convert;
/// A scriptable fake agent for unit tests of host code (feature `test-doubles`).
#[cfg(any(test, feature = "test-doubles"))]
pub mod fake;
mod ready;
mod transport;
pub mod types;

pub use client::{AgentClient, AgentError, OomStream, OutputStream, RpcCode, StdinStream, Timeouts};
pub use convert::ConvertError;
pub use ready::{ReadyError, ReadySignal};
pub use transport::{connect_hybrid_vsock, AgentDialer, DialError, HybridVsockDialer, SerialDialer};
pub use types::*;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = protocols::AGENT_VSOCK_PORT;
