//! How the host reaches the agent: hybrid vsock (vhost-device-vsock's unix socket), or the virtio-serial port
//! that VMs made from a template use (unlike vhost-user vsock it survives migration).

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::r#async::transport::Socket;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake on {path} failed")]
    Handshake {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock at {path} refused port {port}: {reply:?}")]
    Refused { path: PathBuf, port: u32, reply: String },
}

/// Opens one byte stream to the agent's ttrpc server.
#[async_trait]
pub trait AgentDialer: Debug + Send + Sync {
    async fn dial(&self) -> Result<Socket, DialError>;

    /// True when a stream, once open, must not be dropped and dialled again while the agent has not answered:
    /// bytes already sent would be half a request to the next session.
    fn single_session(&self) -> bool {
        false
    }
}

/// QEMU's end of the agent's virtio-serial port. QEMU accepts at once and holds what is written until the
/// agent reads it, so one stream carries the first Check however long the guest takes.
#[derive(Debug, Clone)]
pub struct SerialDialer {
    pub path: PathBuf,
}

#[async_trait]
impl AgentDialer for SerialDialer {
    async fn dial(&self) -> Result<Socket, DialError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| DialError::Connect { path: self.path.clone(), source })?;
        Ok(Socket::from(stream))
    }

    fn single_session(&self) -> bool {
        true
    }
}

/// vhost-device-vsock's (and Firecracker's / Cloud Hypervisor's) host-side unix socket:
/// `CONNECT <port>\n`, answered by `OK <host port>\n`.
#[derive(Debug, Clone)]
pub struct HybridVsockDialer {
    pub uds_path: PathBuf,
    pub port: u32,
}

/// The reply line is at most this long; anything longer is not a hybrid vsock server.
const MAX_REPLY: usize = 64;

#[async_trait]
impl AgentDialer for HybridVsockDialer {
    async fn dial(&self) -> Result<Socket, DialError> {
        Ok(Socket::from(connect_hybrid_vsock(&self.uds_path, self.port).await?))
    }
}

/// Connects to guest vsock port `port` through the hybrid vsock unix socket at `uds_path`. The stream is the
/// port's from the first byte on: the reply is read byte by byte, up to its newline.
pub async fn connect_hybrid_vsock(uds_path: &Path, port: u32) -> Result<UnixStream, DialError> {
    let path = uds_path.to_path_buf();
    let mut stream =
        UnixStream::connect(&path).await.map_err(|source| DialError::Connect { path: path.clone(), source })?;
    let hs = |source| DialError::Handshake { path: path.clone(), source };
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(hs)?;
    let mut reply = Vec::new();
    loop {
        let b = stream.read_u8().await.map_err(hs)?;
        if b == b'\n' {
            break;
        }
        reply.push(b);
        if reply.len() > MAX_REPLY {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if !reply.starts_with("OK ") {
        return Err(DialError::Refused { path, port, reply });
    }
    Ok(stream)
}
