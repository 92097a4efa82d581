//! [`PortForwardSession`]: the client side of the kubelet port-forward protocol that containerd's CRI streaming
//! server speaks at the URL `PortForward` returns (what `kubectl port-forward` reaches through the API server),
//! and [`check_port_forward`], the check the runc and kata tests share.
//!
//! One websocket with subprotocol `v4.channel.k8s.io` per forwarded port; every binary message starts with its
//! channel byte: 0 carries the port's data both ways, 1 the server's error text. The first 2 bytes the server
//! sends on each channel are the port, little-endian (kubelet's `portforward/websocket.go`, which containerd 1.6
//! carries). The server dials the port when the websocket opens and closes the websocket when that connection
//! ends.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use super::stream::connect_websocket;
use super::{ContainerSpec, CriClient, StreamError};
use crate::checks::{error_chain, poll, Checks};

/// The subprotocol this client speaks (binary frames).
pub const PROTOCOL: &str = "v4.channel.k8s.io";

const DATA: u8 = 0;
const ERROR: u8 = 1;

/// The port [`port_forward_target`] listens on (not 8080: the runc test's pod serves HTTP there).
pub const ECHO_PORT: u16 = 9000;

/// A container whose server on [`ECHO_PORT`] (all addresses, so also the pod's loopback) sends back whatever
/// it is sent, a connection after another. SIGTERM ends it at once (PID 1 ignores it unless it handles it).
pub fn port_forward_target(name: &str, image: &str) -> ContainerSpec {
    let script = format!("trap 'exit 0' TERM; nc -ll -p {ECHO_PORT} -e cat & wait");
    ContainerSpec::new(name, image, &["sh", "-c", &script])
}

/// One forwarded connection to one port.
#[derive(Debug)]
pub struct PortForwardSession {
    ws: WebSocket<TcpStream>,
    port: u16,
    channels: Channels,
    closed: bool,
}

/// What arrived on the data and error channels: the port prefix of each, and what came after it.
#[derive(Debug, Default)]
struct Channels {
    prefix: [Vec<u8>; 2],
    received: [Vec<u8>; 2],
}

impl Channels {
    fn take(&mut self, message: &[u8]) {
        let Some((&channel, payload)) = message.split_first() else { return };
        let i = match channel {
            DATA => 0,
            ERROR => 1,
            _ => return,
        };
        // The port prefix may come in a message of its own or not; take exactly 2 bytes of it either way.
        let (prefix, rest) = payload.split_at((2 - self.prefix[i].len()).min(payload.len()));
        self.prefix[i].extend_from_slice(prefix);
        self.received[i].extend_from_slice(rest);
    }

    fn ports(&self) -> [Option<u16>; 2] {
        self.prefix.clone().map(|p| <[u8; 2]>::try_from(p.as_slice()).ok().map(u16::from_le_bytes))
    }
}

impl PortForwardSession {
    /// Opens the websocket at `url` (as returned by `PortForward` for `port`; a single-use token).
    pub fn connect(url: &str, port: u16) -> Result<Self, StreamError> {
        // containerd takes the ports from the request; newer kubelets from the query. Both name the same one.
        let url = format!("{url}?port={port}");
        let ws = connect_websocket(&url, PROTOCOL)?;
        Ok(Self { ws, port, channels: Channels::default(), closed: false })
    }

    /// Sends `data` to the forwarded port.
    pub fn send(&mut self, data: &[u8]) -> Result<(), StreamError> {
        let mut message = Vec::with_capacity(data.len() + 1);
        message.push(DATA);
        message.extend_from_slice(data);
        self.ws.send(Message::Binary(message.into())).map_err(|e| StreamError::Websocket(Box::new(e)))
    }

    /// What the port sent so far.
    pub fn data(&self) -> &[u8] {
        &self.channels.received[0]
    }

    /// The server's error text so far (lossy UTF-8).
    pub fn error(&self) -> String {
        String::from_utf8_lossy(&self.channels.received[1]).into_owned()
    }

    /// The port prefixes that arrived on the data and error channels, as ports (`None` while incomplete).
    pub fn announced_ports(&self) -> [Option<u16>; 2] {
        self.channels.ports()
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// What was received so far, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "port {}: announced {:?}, {} data bytes ({:?}...), error {:?}, closed {}",
            self.port,
            self.announced_ports(),
            self.data().len(),
            String::from_utf8_lossy(&self.data()[..self.data().len().min(80)]),
            self.error(),
            self.closed
        )
    }

    /// Reads messages until `done(self)` holds (`true`), or the server closed the websocket or `timeout`
    /// passed without it (`false`).
    pub fn read_until(&mut self, timeout: Duration, mut done: impl FnMut(&Self) -> bool) -> Result<bool, StreamError> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.closed || left.is_zero() {
                return Ok(false);
            }
            self.ws
                .get_mut()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| StreamError::Websocket(Box::new(e.into())))?;
            match self.ws.read() {
                Ok(Message::Binary(data)) => self.channels.take(&data),
                Ok(Message::Close(_)) => self.closed = true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => self.closed = true,
                Err(e) => return Err(StreamError::Websocket(Box::new(e))),
            }
        }
    }
}

impl Drop for PortForwardSession {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.ws.close(None);
            let _ = self.ws.flush();
        }
    }
}

/// `PortForward` to `port` of pod `pod_id`, then connect to its URL.
fn open(cri: &CriClient, pod_id: &str, port: u16) -> Result<PortForwardSession, String> {
    let url = cri.port_forward(pod_id, &[port]).map_err(|e| format!("PortForward {port}: {}", error_chain(&e)))?;
    PortForwardSession::connect(&url, port).map_err(|e| format!("connect to {url}: {}", error_chain(&e)))
}

/// Sends `messages` one after another through a new session to [`ECHO_PORT`], each read back before the next.
fn echo(cri: &CriClient, pod_id: &str, messages: &[Vec<u8>], timeout: Duration) -> Result<(), String> {
    let mut s = open(cri, pod_id, ECHO_PORT)?;
    let mut expected = Vec::new();
    for message in messages {
        s.send(message).map_err(|e| format!("send: {}; {}", error_chain(&e), s.describe()))?;
        expected.extend_from_slice(message);
        let back = s
            .read_until(timeout, |s| s.data().len() >= expected.len() || !s.error().is_empty())
            .map_err(|e| format!("read: {}; {}", error_chain(&e), s.describe()))?;
        if !back || s.data() != expected.as_slice() {
            return Err(format!("expected {} bytes echoed; {}", expected.len(), s.describe()));
        }
    }
    if s.announced_ports() != [Some(ECHO_PORT); 2] {
        return Err(format!("the server did not announce port {ECHO_PORT} on both channels: {}", s.describe()));
    }
    Ok(())
}

/// Port-forward into pod `pod_id`, whose [`port_forward_target`] container runs: bytes (a line, then 100 KB)
/// reach the pod's port and come back, another connection after that one is closed works too, and a port
/// nothing listens on gives an error on the error channel and no data.
pub fn check_port_forward(cri: &CriClient, pod_id: &str, timeout: Duration, checks: &mut Checks) {
    let line = format!("ping-{}\n", crate::unique_id("pf")).into_bytes();
    // The container may not listen yet: the first echo is retried for a while.
    let listening = poll(timeout, || echo(cri, pod_id, std::slice::from_ref(&line), timeout).ok());
    checks.check("PortForward reaches the pod's port", listening.is_some(), || {
        echo(cri, pod_id, std::slice::from_ref(&line), timeout).err().unwrap_or_default()
    });
    let bulk: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let first = echo(cri, pod_id, &[line.clone(), bulk], timeout);
    checks.check("PortForward carries bytes to the pod's port and back (a line, then 100 KB)", first.is_ok(), || {
        first.err().unwrap_or_default()
    });
    let second = echo(cri, pod_id, &[line], timeout);
    checks.check("another PortForward after the first ended works too", second.is_ok(), || {
        second.err().unwrap_or_default()
    });

    let closed_port = ECHO_PORT + 1;
    let refused = open(cri, pod_id, closed_port).and_then(|mut s| {
        s.read_until(timeout, |s| !s.error().is_empty() && s.is_closed())
            .map_err(|e| format!("read: {}; {}", error_chain(&e), s.describe()))?;
        Ok(s)
    });
    checks.check(
        "PortForward to a port nothing listens on reports an error and no data",
        refused.as_ref().is_ok_and(|s| !s.error().is_empty() && s.data().is_empty()),
        || match &refused {
            Ok(s) => s.describe(),
            Err(e) => e.clone(),
        },
    );
    if let Ok(s) = &refused {
        eprintln!("PortForward to closed port {closed_port}: {}", s.error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_prefix_is_taken_however_it_is_split() {
        let port = 8080u16.to_le_bytes();
        let mut alone = Channels::default();
        for message in [&[DATA][..], &[DATA, port[0], port[1]], &[ERROR, port[0], port[1]], &[DATA, b'h', b'i']] {
            alone.take(message);
        }
        let mut merged = Channels::default();
        merged.take(&[DATA, port[0], port[1], b'h']);
        merged.take(&[DATA, b'i']);
        merged.take(&[ERROR, port[0]]);
        merged.take(&[ERROR, port[1], b'e']);
        merged.take(&[7, b'x']);
        assert_eq!(alone.ports(), [Some(8080), Some(8080)]);
        assert_eq!(alone.received, [b"hi".to_vec(), vec![]]);
        assert_eq!(merged.ports(), [Some(8080), Some(8080)]);
        assert_eq!(merged.received, [b"hi".to_vec(), b"e".to_vec()]);
    }

    #[test]
    fn urls_must_be_http() {
        assert!(matches!(
            PortForwardSession::connect("https://127.0.0.1:1/portforward/x", 80),
            Err(StreamError::Url { .. })
        ));
    }
}
