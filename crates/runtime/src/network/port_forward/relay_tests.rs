//! The relay against a fake hybrid vsock socket whose "guest" behaves or attacks; no VM, no namespace, no root.
//! The relay's listener is on the host's loopback and takes its own port as the original one.

use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::*;

/// What the fake guest does with a connection to the port-forward port.
#[derive(Debug, Clone, Copy)]
enum Guest {
    /// A well-behaved agent in front of an echo server that answers once its input has ended.
    EchoAtEnd,
    /// Answers `ERR`.
    Refuses,
    /// Takes the request and never answers.
    Silent,
    /// Answers with a line that never ends.
    EndlessLine,
    /// Answers `OK`, then claims a 4 GiB frame.
    HugeFrame,
    /// Answers `OK`, then nothing.
    SilentAfterOk,
}

/// A fake vhost-device-vsock socket in `dir`: `CONNECT 1026` is answered `OK`, then `guest` plays the agent.
/// Every request must name `expected_port`.
fn fake_guest(dir: &Path, guest: Guest, expected_port: u16) -> PathBuf {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).expect("bind the fake vsock socket");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(fake_agent(stream, guest, expected_port));
        }
    });
    path
}

async fn fake_agent(stream: UnixStream, guest: Guest, expected_port: u16) {
    let mut stream = BufReader::new(stream);
    let mut connect = String::new();
    stream.read_line(&mut connect).await.expect("CONNECT line");
    assert_eq!(connect, format!("CONNECT {}\n", protocols::PORT_FORWARD_VSOCK_PORT));
    stream.write_all(b"OK 1234\n").await.expect("handshake reply");
    let line = forward::read_line(&mut stream, forward::MAX_REQUEST).await.expect("request");
    assert_eq!(forward::parse_request(&line).expect("a valid request"), expected_port);
    match guest {
        Guest::EchoAtEnd => {
            let (server, client) = tokio::io::duplex(1024);
            tokio::spawn(echo_at_end(server));
            stream.write_all(&forward::reply(&Reply::Ok)).await.expect("OK");
            forward::splice(client, stream, None).await.expect("guest splice");
        }
        Guest::Refuses => {
            let reply = forward::reply(&Reply::Refused("connect to 127.0.0.1:1: Connection refused".into()));
            stream.write_all(&reply).await.expect("ERR");
        }
        Guest::Silent => std::future::pending().await,
        Guest::EndlessLine => {
            let junk = vec![b'x'; 4096];
            while stream.write_all(&junk).await.is_ok() {}
        }
        Guest::HugeFrame => {
            stream.write_all(b"OK\n").await.expect("OK");
            stream.write_all(&u32::MAX.to_be_bytes()).await.expect("frame header");
            std::future::pending().await
        }
        Guest::SilentAfterOk => {
            stream.write_all(b"OK\n").await.expect("OK");
            std::future::pending().await
        }
    }
}

/// Reads everything, then sends it back and closes: only a half-close lets it answer.
async fn echo_at_end(mut stream: tokio::io::DuplexStream) {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await.expect("echo reads");
    stream.write_all(&all).await.expect("echo writes");
    stream.shutdown().await.expect("echo closes");
}

/// A relay serving a loopback listener, with its own port taken as the original one.
struct Running {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn relay_to(guest: Guest, handshake_timeout: Duration) -> Running {
    relay_with(guest, handshake_timeout, Duration::from_secs(60)).await
}

async fn relay_with(guest: Guest, handshake_timeout: Duration, guest_idle: Duration) -> Running {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let uds = fake_guest(dir.path(), guest, addr.port());
    let relay = Relay {
        sandbox: "sb".into(),
        uds,
        original_port: |tcp| tcp.local_addr().map(|a| a.port()),
        handshake_timeout,
        guest_idle,
    };
    Running { addr, task: tokio::spawn(relay.serve(listener)), _dir: dir }
}

/// Reads until the end; the error kind if the connection was reset (or broke) instead.
async fn read_to_end(tcp: &mut TcpStream) -> Result<Vec<u8>, ErrorKind> {
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all)).await;
    match read.expect("the relay ends the connection in time") {
        Ok(_) => Ok(all),
        Err(e) => Err(e.kind()),
    }
}

#[tokio::test]
async fn bytes_cross_both_ways_and_a_half_close_reaches_the_guest() {
    let relay = relay_to(Guest::EchoAtEnd, Duration::from_secs(10)).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    let message = vec![42u8; 3 * forward::MAX_FRAME + 17];
    tcp.write_all(&message).await.expect("write");
    tcp.shutdown().await.expect("half-close");
    assert_eq!(read_to_end(&mut tcp).await.expect("the echo"), message);
}

#[tokio::test]
async fn a_refusal_resets_the_connection() {
    let relay = relay_to(Guest::Refuses, Duration::from_secs(10)).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    assert_eq!(read_to_end(&mut tcp).await, Err(ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn a_silent_agent_is_given_up_on() {
    let relay = relay_to(Guest::Silent, Duration::from_millis(300)).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    let started = Instant::now();
    assert_eq!(read_to_end(&mut tcp).await, Err(ErrorKind::ConnectionReset));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_endless_reply_is_cut_at_its_bound() {
    let relay = relay_to(Guest::EndlessLine, Duration::from_secs(60)).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    assert_eq!(read_to_end(&mut tcp).await, Err(ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn a_huge_frame_ends_the_connection() {
    let relay = relay_to(Guest::HugeFrame, Duration::from_secs(10)).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    // Refused before anything is allocated for it: the connection just ends.
    let ended = read_to_end(&mut tcp).await;
    assert!(matches!(ended, Ok(ref data) if data.is_empty()) || ended.is_err(), "{ended:?}");
}

#[tokio::test]
async fn connections_beyond_the_cap_are_reset_while_the_others_stay() {
    let relay = relay_with(Guest::SilentAfterOk, Duration::from_secs(10), Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..forward::MAX_CONNECTIONS {
        held.push(TcpStream::connect(relay.addr).await.expect("connect"));
    }
    // Let the relay accept all of them before the next one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(relay.addr).await.expect("connect");
    assert_eq!(read_to_end(&mut extra).await, Err(ErrorKind::ConnectionReset));
    let mut byte = [0u8; 1];
    let still_open = tokio::time::timeout(Duration::from_millis(200), held[0].read(&mut byte)).await;
    assert!(still_open.is_err(), "a connection within the cap ended: {still_open:?}");
    // A client that leaves frees its slot once the silent guest has had `guest_idle` to answer.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut again = TcpStream::connect(relay.addr).await.expect("connect");
    let room = tokio::time::timeout(Duration::from_millis(300), again.read(&mut byte)).await;
    assert!(room.is_err(), "a connection within the cap again was refused: {room:?}");
}

#[tokio::test]
async fn aborting_the_relay_closes_every_connection() {
    let relay = relay_to(Guest::SilentAfterOk, Duration::from_secs(10)).await;
    let mut tcp = TcpStream::connect(relay.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.task.abort();
    let _ = relay.task.await;
    let ended = read_to_end(&mut tcp).await;
    assert!(ended.is_ok() || ended == Err(ErrorKind::ConnectionReset), "{ended:?}");
    assert!(TcpStream::connect(relay.addr).await.is_err(), "the listener is still open");
}
