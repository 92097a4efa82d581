//! [`StreamSession`]: the client side of the kubelet streaming protocol that containerd's CRI streaming
//! server speaks at the URLs `Exec` and `Attach` return (what `crictl exec -it` and `crictl attach` use).
//! One websocket with subprotocol `v4.channel.k8s.io`; every binary message starts with its channel byte
//! (0 stdin, 1 stdout, 2 stderr, 3 status, 4 resize). At the end the server sends a `metav1.Status` as
//! JSON on channel 3 and closes. v4 cannot half-close stdin: commands must end on their own.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

/// The only subprotocol this client speaks (binary frames, status as `metav1.Status`).
pub const PROTOCOL: &str = "v4.channel.k8s.io";

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;

/// Which streams an `Exec` or `Attach` asks for. With `tty`, stderr is merged into stdout and must be off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// Errors of the streaming client.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("streaming URL {url:?} is not http://HOST:PORT/PATH")]
    Url { url: String },
    #[error("could not connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("websocket handshake with {url} failed")]
    Handshake {
        url: String,
        #[source]
        source: Box<tungstenite::Error>,
    },
    #[error("the server chose subprotocol {chosen:?} instead of {expected}")]
    Subprotocol { expected: &'static str, chosen: Option<String> },
    #[error("websocket read or write failed")]
    Websocket(#[source] Box<tungstenite::Error>),
    #[error("channel 3 carried no metav1.Status: {text:?}")]
    Status { text: String },
}

/// How the streamed process ended, from the `metav1.Status` on channel 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamStatus {
    /// `Success` (exit code 0), or `Failure` with reason `NonZeroExitCode` and its `ExitCode` cause.
    Exited(i32),
    /// Any other `Failure`: the runtime could not run or stream the process.
    Failed { reason: String, message: String },
}

impl StreamStatus {
    /// Parses the JSON the server sends on channel 3.
    pub fn parse(json: &[u8]) -> Result<Self, StreamError> {
        let bad = || StreamError::Status { text: String::from_utf8_lossy(json).into_owned() };
        let status: serde_json::Value = serde_json::from_slice(json).map_err(|_| bad())?;
        let field = |name: &str| status[name].as_str().unwrap_or_default().to_owned();
        match (field("status").as_str(), field("reason").as_str()) {
            ("Success", _) => Ok(Self::Exited(0)),
            ("Failure", "NonZeroExitCode") => status["details"]["causes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["reason"] == "ExitCode")
                .and_then(|c| c["message"].as_str()?.parse().ok())
                .map(Self::Exited)
                .ok_or_else(bad),
            ("Failure", reason) => Ok(Self::Failed { reason: reason.to_owned(), message: field("message") }),
            _ => Err(bad()),
        }
    }
}

/// One streaming session: what arrived so far on stdout and stderr, and the final status once sent.
/// Every wait is bounded; reads that time out leave the session usable.
#[derive(Debug)]
pub struct StreamSession {
    ws: WebSocket<TcpStream>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<StreamStatus>,
    closed: bool,
}

impl StreamSession {
    /// Opens the websocket at `url` (as returned by `Exec` or `Attach`; a single-use token).
    pub fn connect(url: &str) -> Result<Self, StreamError> {
        let ws = connect_websocket(url, PROTOCOL)?;
        Ok(Self { ws, stdout: Vec::new(), stderr: Vec::new(), status: None, closed: false })
    }

    /// Sends `data` to the process's stdin.
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.send(STDIN, data)
    }

    /// Tells the server the terminal is now `width` columns by `height` rows (tty sessions only).
    pub fn resize(&mut self, width: u16, height: u16) -> Result<(), StreamError> {
        let size = serde_json::json!({ "Width": width, "Height": height });
        self.send(RESIZE, size.to_string().as_bytes())
    }

    fn send(&mut self, channel: u8, data: &[u8]) -> Result<(), StreamError> {
        let mut message = Vec::with_capacity(data.len() + 1);
        message.push(channel);
        message.extend_from_slice(data);
        self.ws.send(Message::Binary(message.into())).map_err(|e| StreamError::Websocket(Box::new(e)))
    }

    /// Everything received on stdout so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Everything received on stderr so far (lossy UTF-8).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The final status, once the server has sent it.
    pub fn status(&self) -> Option<&StreamStatus> {
        self.status.as_ref()
    }

    /// Whether the server has closed the websocket.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// What was received so far, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "stdout {:?}, stderr {:?}, status {:?}, closed {}",
            self.stdout(),
            self.stderr(),
            self.status,
            self.closed
        )
    }

    /// Reads messages until `done(self)` holds (`true`), or the server closed the websocket or
    /// `timeout` passed without it (`false`).
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
                Ok(message) => self.take(message)?,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    self.closed = true;
                }
                Err(e) => return Err(StreamError::Websocket(Box::new(e))),
            }
        }
    }

    /// Reads until the server has sent the final status and closed the websocket, or `timeout` passes;
    /// returns the status if it came.
    pub fn wait_end(&mut self, timeout: Duration) -> Result<Option<StreamStatus>, StreamError> {
        self.read_until(timeout, |s| s.closed)?;
        Ok(self.status.clone())
    }

    fn take(&mut self, message: Message) -> Result<(), StreamError> {
        match message {
            Message::Binary(data) => {
                let Some((&channel, payload)) = data.split_first() else {
                    return Ok(());
                };
                match channel {
                    STDOUT => self.stdout.extend_from_slice(payload),
                    STDERR => self.stderr.extend_from_slice(payload),
                    // The server opens each channel with an empty message: only a payload is a status.
                    STATUS if !payload.is_empty() => {
                        self.status = Some(StreamStatus::parse(payload)?);
                    }
                    _ => {}
                }
            }
            Message::Close(_) => self.closed = true,
            // Pings are answered by tungstenite on the next read or write.
            _ => {}
        }
        Ok(())
    }
}

/// Opens a websocket to a streaming server `url` (`http://HOST:PORT/PATH`), asking for subprotocol `protocol`,
/// which the server must choose. The handshake is bounded; reads and writes later set their own timeouts.
pub(crate) fn connect_websocket(url: &str, protocol: &'static str) -> Result<WebSocket<TcpStream>, StreamError> {
    let bad_url = || StreamError::Url { url: url.to_owned() };
    let ws_url = url.strip_prefix("http://").ok_or_else(bad_url)?;
    let mut request = format!("ws://{ws_url}").into_client_request().map_err(|_| bad_url())?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    let authority = request.uri().authority().ok_or_else(bad_url)?.as_str().to_owned();
    let connect_error = |source| StreamError::Connect { url: url.to_owned(), source };
    let addr = authority.to_socket_addrs().map_err(connect_error)?.next().ok_or_else(bad_url)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(connect_error)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .and_then(|()| tcp.set_write_timeout(Some(Duration::from_secs(30))))
        .map_err(connect_error)?;
    let (ws, response) = tungstenite::client(request, tcp).map_err(|e| StreamError::Handshake {
        url: url.to_owned(),
        source: Box::new(match e {
            tungstenite::HandshakeError::Failure(e) => e,
            // Only a non-blocking stream can be interrupted; ours blocks or times out.
            tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::Io(io::ErrorKind::TimedOut.into()),
        }),
    })?;
    let chosen = response.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok());
    if chosen != Some(protocol) {
        return Err(StreamError::Subprotocol { expected: protocol, chosen: chosen.map(str::to_owned) });
    }
    Ok(ws)
}

impl Drop for StreamSession {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.ws.close(None);
            let _ = self.ws.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_is_exit_code_zero() {
        let status = StreamStatus::parse(br#"{"metadata":{},"status":"Success"}"#).expect("parse");
        assert_eq!(status, StreamStatus::Exited(0));
    }

    #[test]
    fn non_zero_exit_code_comes_from_the_exit_code_cause() {
        let json = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 7], exit code 7","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"7"}]}}"#;
        assert_eq!(StreamStatus::parse(json).expect("parse"), StreamStatus::Exited(7));
    }

    #[test]
    fn other_failures_keep_reason_and_message() {
        let json = br#"{"metadata":{},"status":"Failure","message":"no such container","reason":"InternalError"}"#;
        assert_eq!(
            StreamStatus::parse(json).expect("parse"),
            StreamStatus::Failed { reason: "InternalError".to_owned(), message: "no such container".to_owned() }
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(StreamStatus::parse(b"not json").is_err());
        assert!(StreamStatus::parse(br#"{"status":"Failure","reason":"NonZeroExitCode"}"#).is_err());
    }

    #[test]
    fn urls_must_be_http() {
        assert!(matches!(StreamSession::connect("https://127.0.0.1:1/exec/x"), Err(StreamError::Url { .. })));
    }
}
