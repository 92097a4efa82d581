//! kata-agent: PID 1 in the kata-rs guest. Serves `kata.agent.v1.Agent` over ttrpc on vsock
//! port 1024 and runs containers with libcontainer. Run as another PID (for debugging) it
//! skips the init duties: `kata-agent --listen unix:///tmp/agent.sock`.

mod container;
mod device_cgroup;
mod exec_seccomp;
mod forward;
mod hotplug;
mod init;
mod io;
mod mount;
mod network;
mod process;
mod random;
mod reaper;
mod rpc;
mod sandbox;
mod serial;
mod start_window;
mod stats;

use std::sync::Arc;

use anyhow::Context;

pub use protocols::error_chain;

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
        init::setup();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let level = init::log_level_from_cmdline(&cmdline)
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|_| !is_init))
        .unwrap_or_else(|| "info".to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::sync::Mutex::new(log_file()))
        .with_ansi(false)
        .init();

    let listen = if is_init && cmdline.split_whitespace().any(|w| w == protocols::AGENT_SERIAL_PARAM) {
        Listen::Serial
    } else {
        Listen::Address(listen_address(std::env::args().skip(1)))
    };
    // One thread only: libcontainer forks with raw clone3 (see container.rs).
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|rt| rt.block_on(run(is_init, &listen)));
    if let Err(err) = result {
        tracing::error!("kata-agent failed: {err:#}");
        if is_init {
            // Exiting PID 1 panics the kernel, which the host sees as the VM going away.
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        std::process::exit(1);
    }
}

/// A private close-on-exec copy of stderr for logs. libcontainer's container init inherits
/// our tracing subscriber and logs after it has put the container's stdio on fds 0-2; writing
/// to fd 2 would put those lines into the workload's stderr.
fn log_file() -> std::fs::File {
    use std::os::fd::AsFd;
    match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        // Without a copy there is nowhere sensible to log; /dev/null keeps the agent running.
        Err(_) => std::fs::File::create("/dev/null").unwrap_or_else(|_| std::process::exit(1)),
    }
}

/// Tells the host that the agent listens: one connection to the host's ready port (see
/// `protocols::AGENT_READY_PORT`). Retried for a while in case the host is slow to listen.
async fn announce_ready() {
    use tokio::io::AsyncWriteExt;
    const HOST_CID: u32 = 2;
    let addr = tokio_vsock::VsockAddr::new(HOST_CID, protocols::AGENT_READY_PORT);
    let mut last = String::new();
    for _ in 0..300 {
        match tokio_vsock::VsockStream::connect(addr).await {
            Ok(mut stream) => {
                let _ = stream.write_all(b"ready\n").await;
                let _ = stream.shutdown(std::net::Shutdown::Write);
                tracing::debug!("announced readiness to the host");
                return;
            }
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tracing::warn!("could not announce readiness to the host: {last}");
}

fn listen_address(mut args: impl Iterator<Item = String>) -> String {
    let mut listen = format!("vsock://-1:{}", protocols::AGENT_VSOCK_PORT);
    while let Some(a) = args.next() {
        if a == "--listen" {
            if let Some(v) = args.next() {
                listen = v;
            }
        }
    }
    listen
}

/// Where the ttrpc server takes connections.
enum Listen {
    /// A ttrpc address: vsock by default, `--listen unix://...` for debugging.
    Address(String),
    /// The virtio-serial port `protocols::AGENT_SERIAL_PORT` (kernel parameter `protocols::AGENT_SERIAL_PARAM`).
    Serial,
}

async fn run(is_init: bool, listen: &Listen) -> anyhow::Result<()> {
    let shown = match listen {
        Listen::Address(addr) => addr.as_str(),
        Listen::Serial => protocols::AGENT_SERIAL_PORT,
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), pid1 = is_init, listen = shown, "kata-agent starting");
    let reaper = reaper::Reaper::default();
    tokio::spawn(reaper.clone().run(is_init));
    if is_init {
        if let Err(err) = network::loopback_up().await {
            tracing::warn!("{}", error_chain(&err));
        }
    }
    let sandbox = sandbox::Sandbox::new(reaper, is_init);
    let service = protocols::agent_ttrpc::create_agent(Arc::new(rpc::AgentService::new(sandbox)));
    let server = ttrpc::r#async::Server::new();
    let server = match listen {
        Listen::Address(addr) => server.bind(addr).with_context(|| format!("cannot listen on {addr}"))?,
        Listen::Serial => {
            let port = serial::find_port(protocols::AGENT_SERIAL_PORT).await?;
            server.add_listener(serial::listener(&port).with_context(|| format!("cannot open {}", port.display()))?)
        }
    };
    let mut server = server.register_service(service);
    server.start().await.context("cannot start the ttrpc server")?;
    tracing::info!("kata-agent ready");
    // Over vsock the host waits for a sign of life before it dials; over serial it just writes.
    if is_init && matches!(listen, Listen::Address(_)) {
        // Port-forward needs vsock: a VM reached over virtio-serial (a template clone) has none. Bound before
        // readiness is announced, so it listens by the time the host can ask.
        match forward::listen() {
            Ok(listener) => {
                tokio::spawn(forward::serve(listener));
            }
            Err(err) => tracing::warn!("port-forward is unavailable: {err}"),
        }
        tokio::spawn(announce_ready());
    }
    if is_init {
        std::future::pending::<()>().await;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    server.shutdown().await.context("ttrpc shutdown")?;
    Ok(())
}
