//! The shim server: serves containerd's Task API on the socket `start` chose.
//!
//! We bootstrap the server ourselves instead of through `containerd_shim::asynchronous::run` because that
//! registers the service only as `containerd.task.v3.Task` (containerd 2.x). containerd 1.6 calls
//! `containerd.task.v2.Task`, whose messages are the same; we register both names.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use containerd_shim::asynchronous::Shim;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Flags};
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::Server;

use crate::shim::KataShim;

const V3: &str = "containerd.task.v3.Task";
const V2: &str = "containerd.task.v2.Task";

pub async fn serve(flags: Flags) -> Result<()> {
    if flags.socket.is_empty() {
        bail!("-socket is required to serve");
    }
    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id).context("open the shim log")?;
    let socket = flags.socket.trim_start_matches("unix://").to_string();
    let Some(listener) = bind(&socket)? else {
        // The pod's shim already serves this socket: this process only confirms the address.
        containerd_shim::asynchronous::util::write_str_to_file("address", &flags.socket).await?;
        server_started()?;
        return Ok(());
    };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address).await?;
    let mut shim = KataShim::new("io.containerd.kata.v2", &flags, &mut Config::default()).await;
    let task: Arc<dyn containerd_shim::Task + Send + Sync> = Arc::new(shim.create_task_service(publisher).await);
    let mut services = create_task(task.clone());
    if let Some(v3) = create_task(task).remove(V3) {
        services.insert(V2.to_string(), v3);
    }
    let listener = Listener::try_from(listener).context("ttrpc listener")?;
    let mut server = Server::new().add_listener(listener).register_service(services);
    server.start().await.context("start the ttrpc server")?;
    server_started()?;
    tracing::info!(socket = %flags.socket, "shim serving");
    tokio::spawn(ignore_termination_signals());
    shim.wait().await;
    tracing::info!("shim shutting down");
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Binds the socket; `None` when a live server already owns it. A stale socket file is replaced.
fn bind(path: &str) -> Result<Option<UnixListener>> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(path).with_context(|| format!("remove stale socket {path}"))?;
            Ok(Some(UnixListener::bind(path).with_context(|| format!("bind {path}"))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = Path::new(path).parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            }
            Ok(Some(UnixListener::bind(path).with_context(|| format!("bind {path}"))?))
        }
        Err(e) => Err(e).with_context(|| format!("bind {path}")),
    }
}

/// `start` waits for EOF on our stdout: point stdout at stderr (the log) to say the server is up.
fn server_started() -> Result<()> {
    nix::unistd::dup2(2, 1).context("redirect stdout")?;
    Ok(())
}

/// containerd may signal the shim's process group; the shim ends only through Shutdown.
async fn ignore_termination_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => tracing::debug!("SIGTERM ignored"),
            _ = int.recv() => tracing::debug!("SIGINT ignored"),
        }
    }
}
