//! The guest end of port-forward (`protocols::forward`): the host's shim connects to
//! `protocols::PORT_FORWARD_VSOCK_PORT` once per TCP connection that containerd forwards into the pod, names a
//! port, and this module connects to that port on the guest's loopback, where the pod's containers listen (they
//! share the VM's network namespace), then splices the two streams.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use protocols::forward::{self, Reply};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

/// The host sends its request line right after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A loopback connect answers at once, unless the workload's accept queue is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the port-forward listener.
pub fn listen() -> io::Result<VsockListener> {
    let port = protocols::PORT_FORWARD_VSOCK_PORT;
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(|err| io::Error::new(err.kind(), format!("cannot listen on vsock port {port}: {err}")))
}

/// Accepts port-forward connections until the agent exits. Runs on the agent's one thread, as every task does.
pub async fn serve(listener: VsockListener) {
    // The host keeps to the same bound; this is a backstop.
    let slots = Arc::new(tokio::sync::Semaphore::new(forward::MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("port-forward accept: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("port-forward: {} connections are open already; refusing one", forward::MAX_CONNECTIONS);
            continue;
        };
        tokio::spawn(async move {
            if let Err(err) = serve_one(stream).await {
                tracing::debug!("port-forward connection ended: {err}");
            }
            drop(slot);
        });
    }
}

async fn serve_one(stream: VsockStream) -> io::Result<()> {
    let mut stream = BufReader::new(stream);
    let line = tokio::time::timeout(REQUEST_TIMEOUT, forward::read_line(&mut stream, forward::MAX_REQUEST))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request from the host"))?
        .map_err(io::Error::other)?;
    let port = match forward::parse_request(&line) {
        Ok(port) => port,
        Err(err) => {
            let reason = protocols::error_chain(&err);
            stream.write_all(&forward::reply(&Reply::Refused(reason.clone()))).await?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
    };
    match connect(port).await {
        Ok(target) => {
            stream.write_all(&forward::reply(&Reply::Ok)).await?;
            stream.flush().await?;
            tracing::debug!(port, "port-forward connected");
            // The host is the trusted side: no bound on how long it may take.
            forward::splice(target, stream, None).await
        }
        Err(err) => {
            stream.write_all(&forward::reply(&Reply::Refused(err.clone()))).await?;
            stream.flush().await?;
            tracing::debug!(port, "port-forward refused: {err}");
            Ok(())
        }
    }
}

/// Connects to `port` on 127.0.0.1, then on ::1, as containerd does on a host; the first error if both fail.
async fn connect(port: u16) -> Result<TcpStream, String> {
    let mut first = None;
    for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
        let addr = SocketAddr::new(ip, port);
        let err = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
        };
        first.get_or_insert(format!("connect to {addr}: {err}"));
    }
    Err(first.unwrap_or_default())
}
