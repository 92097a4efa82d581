//! The virtio-serial agent transport (see `protocols::AGENT_SERIAL_PORT`).
//!
//! A port is one byte stream that the host side connects to and leaves. Each time the host connects, the
//! agent hands the ttrpc server a fresh connection and pumps bytes between it and the port; when the host
//! leaves, reads return 0 and that connection ends, so a new host never sees the rest of an old reply.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::r#async::transport::Listener;

/// How often the port is looked at while no host is connected (a closed port reports hang-up at once, so
/// there is nothing to sleep on). Only a template and a clone before its shim connects are in that state.
const NO_HOST_POLL: Duration = Duration::from_millis(5);

/// How long the agent waits for the port to appear: the driver adds ports once the device asks, shortly
/// after boot.
const PORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The device node of the virtio-serial port called `name` (`/dev/vportNpM`), once the driver has added it.
pub async fn find_port(name: &str) -> io::Result<PathBuf> {
    let deadline = tokio::time::Instant::now() + PORT_TIMEOUT;
    loop {
        if let Some(path) = port_by_name(Path::new("/sys/class/virtio-ports"), name) {
            return Ok(Path::new("/dev").join(path));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name} after {PORT_TIMEOUT:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The entry of `class_dir` (`vport0p1`) whose `name` file holds `name`.
fn port_by_name(class_dir: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(class_dir).ok()?.flatten().find_map(|entry| {
        let found = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (found.trim() == name).then(|| PathBuf::from(entry.file_name()))
    })
}

/// A ttrpc listener that yields one connection per host session on the port at `path`.
pub fn listener(path: &Path) -> io::Result<Listener> {
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<UnixStream>(1);
    let name = path.display().to_string();
    // A task on the agent's one runtime thread, not a thread of its own: see container.rs on why the agent
    // has no other threads.
    tokio::spawn(async move {
        if let Err(err) = serve(port, tx).await {
            tracing::error!("agent serial port {name}: {err}");
        }
    });
    let incoming = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (Ok(s), rx)) });
    Ok(Listener::new(incoming))
}

/// Serves one host after another. A closed port reports hang-up at once and for good as far as tokio's
/// readiness goes, so while nobody is connected the port is looked at with plain reads, and it is registered
/// with the reactor afresh for each host.
async fn serve(mut port: File, tx: tokio::sync::mpsc::Sender<UnixStream>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut first = Vec::new();
        loop {
            match (&port).read(&mut buf) {
                Ok(0) => tokio::time::sleep(NO_HOST_POLL).await,
                Ok(n) => {
                    first.extend_from_slice(&buf[..n]);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break, // connected, nothing sent yet
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // SAFETY: the File owns its fd, which stays open and unchanged until `into_inner` gives it back.
        let registered = unsafe { AsyncFd::register(port) }.map_err(io::Error::from)?;
        let result = session(&registered, first, &tx, &mut buf).await;
        port = registered.into_inner();
        result?;
    }
}

/// One host session: from its first bytes until the host leaves (reads return 0).
async fn session(
    port: &AsyncFd<File>,
    mut first: Vec<u8>,
    tx: &tokio::sync::mpsc::Sender<UnixStream>,
    buf: &mut [u8],
) -> io::Result<()> {
    if first.is_empty() {
        let n = read_port(port, buf).await?;
        if n == 0 {
            return Ok(());
        }
        first.extend_from_slice(&buf[..n]);
    }
    let (mut ours, theirs) = UnixStream::pair()?;
    tx.send(theirs).await.map_err(|_| io::Error::other("the ttrpc server is gone"))?;
    tracing::debug!("host connected on the agent serial port");
    ours.write_all(&first).await?;
    let (mut from_server, mut to_server) = ours.into_split();
    let inbound = async {
        loop {
            let n = read_port(port, buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            to_server.write_all(&buf[..n]).await?;
        }
    };
    let outbound = async {
        let mut out = vec![0u8; 64 * 1024];
        loop {
            let n = from_server.read(&mut out).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            write_port(port, &out[..n]).await?;
        }
    };
    let ended = tokio::select! {
        r = inbound => r,
        r = outbound => r,
    };
    if let Err(err) = ended {
        tracing::warn!("agent serial session ended: {err}");
    }
    tracing::debug!("host left the agent serial port");
    Ok(())
}

/// What the host sent; `Ok(0)` once it has left.
async fn read_port(port: &AsyncFd<File>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = port.readable().await?;
        if let Ok(result) = guard.try_io(|fd| fd.get_ref().read(buf)) {
            return result;
        }
    }
}

async fn write_port(port: &AsyncFd<File>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = port.writable().await?;
        if let Ok(result) = guard.try_io(|fd| fd.get_ref().write(data)) {
            data = &data[result?..];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_port_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        for (entry, name) in [("vport0p0", "other\n"), ("vport0p1", "agent.channel.0\n")] {
            std::fs::create_dir(dir.path().join(entry)).unwrap();
            std::fs::write(dir.path().join(entry).join("name"), name).unwrap();
        }
        assert_eq!(port_by_name(dir.path(), "agent.channel.0"), Some(PathBuf::from("vport0p1")));
        assert_eq!(port_by_name(dir.path(), "missing"), None);
        assert_eq!(port_by_name(&dir.path().join("absent"), "agent.channel.0"), None);
    }
}
