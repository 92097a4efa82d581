//! The listener's connections, each carried to the agent: dial the agent's port-forward vsock port, name the
//! original port, wait for `OK`, then splice (`protocols::forward`).
//!
//! The agent is untrusted. What it can do to the host here is bounded: at most
//! [`forward::MAX_CONNECTIONS`] connections are open at once (more are reset at once), the handshake must be
//! over within [`HANDSHAKE_TIMEOUT`], its reply line and every frame have fixed upper bounds, and each
//! connection holds two buffers of at most [`forward::MAX_FRAME`] bytes. All connections are served by the one
//! task that owns the listener, so aborting that task closes every socket at once.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use protocols::forward::{self, Reply};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::agent::connect_hybrid_vsock;

/// From accepting a connection to the agent's `OK`: a vsock round trip and a loopback connect in the guest.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Once containerd has closed its side, how long the guest may stay silent before the connection is dropped:
/// a guest that never closes would otherwise keep its slot for good.
pub(crate) const GUEST_IDLE: Duration = Duration::from_secs(60);

/// Where a forwarded connection goes, and how its original port is found.
#[derive(Debug, Clone)]
pub(crate) struct Relay {
    pub(crate) sandbox: String,
    /// The VM's hybrid vsock unix socket.
    pub(crate) uds: PathBuf,
    /// [`original_port`], or a stand-in in tests without a redirect.
    pub(crate) original_port: fn(&TcpStream) -> io::Result<u16>,
    /// [`HANDSHAKE_TIMEOUT`], shorter in tests.
    pub(crate) handshake_timeout: Duration,
    /// [`GUEST_IDLE`], shorter in tests.
    pub(crate) guest_idle: Duration,
}

/// Why one connection was not carried to the guest.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("cannot find the port it was meant for")]
    OriginalPort(#[source] io::Error),
    #[error("cannot reach the agent's port-forward port")]
    Dial(#[from] crate::agent::DialError),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent's answer")]
    Reply(#[from] forward::HeaderError),
    #[error("sending the request")]
    Request(#[source] io::Error),
    #[error("the guest refused: {0:?}")]
    Refused(String),
}

impl Relay {
    /// Accepts and relays until aborted.
    pub(crate) async fn serve(self, listener: TcpListener) {
        let mut open = FuturesUnordered::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) if open.len() >= forward::MAX_CONNECTIONS => {
                        tracing::warn!(sandbox = %self.sandbox, "port-forward: {} connections are open already; resetting a new one", forward::MAX_CONNECTIONS);
                        reset(tcp);
                    }
                    Ok((tcp, _)) => open.push(self.relay(tcp)),
                    Err(e) => {
                        // Out of file descriptors, most likely: a busy loop would not help.
                        tracing::warn!(sandbox = %self.sandbox, error = %e, "port-forward accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(()) = open.next(), if !open.is_empty() => {}
            }
        }
    }

    /// One connection, from accept to close. A connection that cannot reach the guest is reset, so that
    /// containerd reports an error instead of an empty answer.
    async fn relay(&self, tcp: TcpStream) {
        let port = match (self.original_port)(&tcp) {
            Ok(port) => port,
            Err(e) => {
                let e = RelayError::OriginalPort(e);
                tracing::warn!(sandbox = %self.sandbox, error = %crate::error_chain(&e), "port-forward");
                return reset(tcp);
            }
        };
        let guest = match tokio::time::timeout(self.handshake_timeout, self.open(port)).await {
            Ok(Ok(guest)) => guest,
            Ok(Err(e)) => {
                tracing::info!(sandbox = %self.sandbox, port, error = %crate::error_chain(&e), "port-forward not connected");
                return reset(tcp);
            }
            Err(_) => {
                tracing::warn!(sandbox = %self.sandbox, port, error = %RelayError::Timeout(self.handshake_timeout), "port-forward not connected");
                return reset(tcp);
            }
        };
        tracing::debug!(sandbox = %self.sandbox, port, "port-forward connected");
        if let Err(e) = forward::splice(tcp, guest, Some(self.guest_idle)).await {
            tracing::debug!(sandbox = %self.sandbox, port, error = %e, "port-forward connection ended");
        }
    }

    /// A stream to `port` in the guest, the agent's `OK` read. Buffered: frames that follow the `OK` at once
    /// stay in the buffer for the splice.
    async fn open(&self, port: u16) -> Result<BufReader<UnixStream>, RelayError> {
        let stream = connect_hybrid_vsock(&self.uds, protocols::PORT_FORWARD_VSOCK_PORT).await?;
        let mut stream = BufReader::new(stream);
        stream.write_all(&forward::request(port)).await.map_err(RelayError::Request)?;
        let line = forward::read_line(&mut stream, forward::MAX_REPLY).await?;
        match forward::parse_reply(&line)? {
            Reply::Ok => Ok(stream),
            Reply::Refused(reason) => Err(RelayError::Refused(reason)),
        }
    }
}

/// Closes `tcp` with a reset rather than an orderly end.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
}

/// The port a redirected connection was meant for, from its connection tracking entry.
pub fn original_port(tcp: &TcpStream) -> io::Result<u16> {
    let addr = nix::sys::socket::getsockopt(tcp, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(u16::from_be(addr.sin_port))
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
