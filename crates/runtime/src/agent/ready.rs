//! The agent's readiness signal: before the VM starts, the host listens where vhost-device-vsock forwards the
//! guest's connections to host port [`AGENT_READY_PORT`] (`<uds path>_<port>`); the agent connects there
//! once it listens. Only then does the host dial the agent, so no `CONNECT` ever waits in the vsock daemon
//! for a guest driver that is not up yet (such a request can be lost, wedging every later dial).

use std::path::{Path, PathBuf};
use std::time::Duration;

use protocols::AGENT_READY_PORT;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("listen for the agent's readiness on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("accept the agent's readiness connection on {path}")]
    Accept {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not signal readiness within {timeout:?}")]
    Timeout { timeout: Duration },
}

#[derive(Debug)]
pub struct ReadySignal {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadySignal {
    /// Listens beside the VM's hybrid vsock socket `uds_path`. Call before the VM starts.
    pub fn bind(uds_path: &Path) -> Result<Self, ReadyError> {
        let path = PathBuf::from(format!("{}_{}", uds_path.display(), AGENT_READY_PORT));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| ReadyError::Bind { path: path.clone(), source })?;
        Ok(ReadySignal { listener, path })
    }

    /// Waits for the agent's connection and reads its one line.
    pub async fn wait(&self, timeout: Duration) -> Result<(), ReadyError> {
        let accept = async {
            let (mut stream, _) = self
                .listener
                .accept()
                .await
                .map_err(|source| ReadyError::Accept { path: self.path.clone(), source })?;
            let mut line = Vec::new();
            // The content does not matter; reading to EOF just lets the agent close cleanly.
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut line)).await;
            Ok(())
        };
        tokio::time::timeout(timeout, accept).await.map_err(|_| ReadyError::Timeout { timeout })?
    }
}

impl Drop for ReadySignal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_connection_on_the_ready_port_is_the_signal() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("kata.sock");
        let ready = ReadySignal::bind(&uds).unwrap();
        let port_path = dir.path().join(format!("kata.sock_{AGENT_READY_PORT}"));
        assert!(port_path.exists());
        let mut guest = tokio::net::UnixStream::connect(&port_path).await.unwrap();
        guest.write_all(b"ready\n").await.unwrap();
        drop(guest);
        ready.wait(Duration::from_secs(5)).await.unwrap();
        drop(ready);
        assert!(!port_path.exists(), "the listener's socket is removed");
    }

    #[tokio::test]
    async fn no_signal_times_out_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let ready = ReadySignal::bind(&dir.path().join("kata.sock")).unwrap();
        let err = ready.wait(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.to_string(), "the agent did not signal readiness within 50ms");
    }
}
