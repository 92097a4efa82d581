//! Streaming handlers: process output, stdin and OOM events.

use std::sync::Arc;

use protocols::agent as pb;
use tokio::sync::broadcast;
use ttrpc::r#async::{ServerStreamReceiver, ServerStreamSender};
use ttrpc::Code;

use super::status;
use crate::io::IoError;
use crate::process::Process;

/// Sends output chunks until EOF of the process's stream; the call then returns and the
/// stream closes, so the host knows it has everything.
pub async fn read_output(p: Arc<Process>, stderr: bool, tx: ServerStreamSender<pb::OutputChunk>) -> ttrpc::Result<()> {
    #[derive(Debug)]
    enum E {
        Io(IoError),
        Send(ttrpc::Error),
    }
    impl From<IoError> for E {
        fn from(e: IoError) -> Self {
            E::Io(e)
        }
    }
    let tx = &tx;
    let r =
        p.io.read_output(stderr, |data| async move {
            tx.send(&pb::OutputChunk { data, ..Default::default() }).await.map_err(E::Send)
        })
        .await;
    match r {
        Ok(()) => Ok(()),
        Err(E::Io(e @ IoError::AlreadyAttached(_))) => Err(status(Code::ALREADY_EXISTS, &e)),
        Err(E::Io(e)) => Err(status(Code::INTERNAL, &e)),
        Err(E::Send(e)) => Err(e),
    }
}

pub async fn write_stdin<F>(lookup: F, mut rx: ServerStreamReceiver<pb::StdinChunk>) -> ttrpc::Result<()>
where
    F: Fn(&str, &str) -> ttrpc::Result<Arc<Process>>,
{
    let mut target: Option<Arc<Process>> = None;
    while let Some(chunk) = rx.recv().await? {
        let p = match &target {
            Some(p) => p.clone(),
            None => {
                let p = lookup(&chunk.container_id, &chunk.exec_id)?;
                target = Some(p.clone());
                p
            }
        };
        if !chunk.data.is_empty() {
            p.io.write_stdin(&chunk.data).await.map_err(|e| status(Code::FAILED_PRECONDITION, &e))?;
        }
    }
    Ok(())
}

pub async fn oom_events(
    mut rx: broadcast::Receiver<String>,
    tx: ServerStreamSender<pb::OomEvent>,
) -> ttrpc::Result<()> {
    loop {
        match rx.recv().await {
            Ok(container_id) => tx.send(&pb::OomEvent { container_id, ..Default::default() }).await?,
            Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!(n, "OOM event stream lagged"),
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}
