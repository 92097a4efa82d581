//! Port-forward's host side against the real kernel: a private network namespace (as CNI leaves a pod's), the
//! real iptables redirect and `SO_ORIGINAL_DST`, and a fake guest behind a fake hybrid vsock socket that echoes
//! through a server on the host's loopback. Needs root and iptables; skips otherwise.
//!
//! Network safety: traffic stays on loopback, in the test's own namespace and in the host's.

// The helpers below are test code too (clippy only exempts `#[test]` functions): a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hypervisor::AgentEndpoint;
use nix::sched::{setns, CloneFlags};
use protocols::forward::{self, Reply};
use runtime::network::port_forward::{PortForward, IPTABLES};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

/// The port the "pod" dials, as containerd dials the port it forwards.
const POD_PORT: u16 = 8080;

fn missing_part() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { nix::libc::geteuid() } != 0 {
        return Some("needs root to create a network namespace and add iptables rules".into());
    }
    if !Path::new(IPTABLES).exists() {
        return Some(format!("{IPTABLES} is missing (Debian package iptables)"));
    }
    None
}

/// A network namespace of ours with its loopback up (CNI's loopback plugin does that for a pod), deleted on
/// drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("kpf-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let netns = Netns { name };
        run("ip", &["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn nat_rules(&self) -> String {
        run("ip", &["netns", "exec", &self.name, IPTABLES, "-t", "nat", "-S", "OUTPUT"])
    }
}

/// Connects to 127.0.0.1:`port` from inside the namespace `netns` (as containerd does), sends `message`, closes
/// the sending side and reads the answer to its end. Blocks: on a thread of its own, which enters the namespace.
fn exchange(netns: &Path, port: u16, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(netns)?;
    let message = message.to_vec();
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
        tcp.write_all(&message)?;
        tcp.shutdown(std::net::Shutdown::Write)?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer)?;
        Ok(answer)
    })
    .join()
    .unwrap()
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An echo server on the host's loopback that answers once its input ended.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                tcp.read_to_end(&mut all).await.unwrap();
                tcp.write_all(&all).await.unwrap();
            });
        }
    });
    addr
}

/// A fake vhost-device-vsock socket whose "agent" sends each requested port to `ports` and connects the stream
/// to `echo` (the agent would connect to that port on the guest's loopback).
fn fake_guest(uds: &Path, echo: SocketAddr, ports: tokio::sync::mpsc::UnboundedSender<u16>) {
    let listener = UnixListener::bind(uds).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ports = ports.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut connect = String::new();
                stream.read_line(&mut connect).await.unwrap();
                assert_eq!(connect, format!("CONNECT {}\n", protocols::PORT_FORWARD_VSOCK_PORT));
                stream.write_all(b"OK 1\n").await.unwrap();
                let line = forward::read_line(&mut stream, forward::MAX_REQUEST).await.unwrap();
                ports.send(forward::parse_request(&line).unwrap()).unwrap();
                let target = tokio::net::TcpStream::connect(echo).await.unwrap();
                stream.write_all(&forward::reply(&Reply::Ok)).await.unwrap();
                forward::splice(target, stream, None).await.unwrap();
            });
        }
    });
}

#[tokio::test]
async fn a_connection_to_localhost_in_the_pod_namespace_reaches_the_guest_port() {
    testutil::skip_unless!(missing_part());
    let netns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let (ports_tx, mut ports) = tokio::sync::mpsc::unbounded_channel();
    fake_guest(&uds, echo_server().await, ports_tx);

    let forward = PortForward::start("sb", &netns.path(), &AgentEndpoint::HybridVsock(uds))
        .await
        .unwrap_or_else(|e| panic!("start: {}", runtime::error_chain(&e)));
    let rule = format!("-A OUTPUT -d 127.0.0.1/32 -p tcp -j REDIRECT --to-ports {}", forward.port());
    assert!(netns.nat_rules().contains(&rule), "{}", netns.nat_rules());

    let message = b"through the redirect and the guest".repeat(5000);
    let path = netns.path();
    let sent = message.clone();
    let answer = tokio::task::spawn_blocking(move || exchange(&path, POD_PORT, &sent)).await.unwrap().unwrap();
    assert!(answer == message, "the echo came back whole ({} of {} bytes)", answer.len(), message.len());
    assert_eq!(ports.recv().await, Some(POD_PORT), "SO_ORIGINAL_DST names the port the pod dialled");

    forward.stop().await.unwrap_or_else(|e| panic!("stop: {}", runtime::error_chain(&e)));
    assert!(!netns.nat_rules().contains("REDIRECT"), "{}", netns.nat_rules());
    let path = netns.path();
    let after = tokio::task::spawn_blocking(move || exchange(&path, POD_PORT, b"x")).await.unwrap();
    assert_eq!(after.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionRefused), "nothing listens any more");
}
