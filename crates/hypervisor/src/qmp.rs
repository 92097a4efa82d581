//! A small QMP client: JSON lines over QEMU's control socket. Commands carry an `id` so a reply that arrives
//! after its caller timed out is recognised and skipped; after any I/O error or timeout the connection is
//! dropped and the next command reconnects (QEMU accepts one QMP client at a time). A command can carry an open
//! file (SCM_RIGHTS), as `getfd` expects.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP command {command} got no reply within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    #[error("malformed QMP message: {line}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected reply to QMP command {command}")]
    Reply {
        command: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

/// `query-status` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QmpStatus {
    /// QEMU's run state, e.g. `running`, `paused`, `shutdown`, `internal-error`.
    pub status: String,
    pub running: bool,
}

#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    timeout: Duration,
    conn: Mutex<ConnState>,
}

#[derive(Debug, Default)]
struct ConnState {
    conn: Option<Conn>,
    next_id: u64,
}

#[derive(Debug)]
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// One line from QEMU. Field presence decides the kind, as the QMP spec describes.
#[derive(Debug, Deserialize)]
struct Message {
    #[serde(rename = "QMP")]
    greeting: Option<Value>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<ErrorBody>,
    event: Option<String>,
    id: Option<Value>,
}

impl QmpClient {
    /// Connects and negotiates capabilities. `timeout` bounds the handshake and every later command.
    pub async fn connect(path: impl Into<PathBuf>, timeout: Duration) -> Result<Self, QmpError> {
        let client = Self { path: path.into(), timeout, conn: Mutex::new(ConnState::default()) };
        {
            let mut state = client.conn.lock().await;
            let conn = client.handshake().await?;
            state.conn = Some(conn);
        }
        Ok(client)
    }

    pub fn socket(&self) -> &Path {
        &self.path
    }

    async fn handshake(&self) -> Result<Conn, QmpError> {
        let exchange = async {
            let stream = UnixStream::connect(&self.path)
                .await
                .map_err(|source| QmpError::Connect { path: self.path.clone(), source })?;
            let (read, writer) = stream.into_split();
            let mut conn = Conn { reader: BufReader::new(read), writer };
            let greeting = conn.read_message().await?;
            if greeting.greeting.is_none() {
                return Err(QmpError::Protocol("expected the QMP greeting first".into()));
            }
            conn.send(&json!({ "execute": "qmp_capabilities", "id": 0 })).await?;
            conn.read_reply("qmp_capabilities", &json!(0)).await?;
            Ok(conn)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout { command: "qmp_capabilities".into(), timeout: self.timeout })?
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.run(command, arguments, None).await
    }

    /// Runs one command with `fd` attached to it (SCM_RIGHTS), e.g. `getfd`, which keeps the fd in QEMU under
    /// a name. QEMU holds its own copy; the caller may close `fd` once this returns.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.run(command, arguments, Some(fd.as_raw_fd())).await
    }

    async fn run(&self, command: &str, arguments: Option<Value>, fd: Option<RawFd>) -> Result<Value, QmpError> {
        let mut state = self.conn.lock().await;
        state.next_id += 1;
        let id = json!(state.next_id);
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let exchange = async {
            if state.conn.is_none() {
                state.conn = Some(self.handshake().await?);
            }
            let conn = state.conn.as_mut().ok_or(QmpError::Closed)?;
            match fd {
                Some(fd) => conn.send_with_fd(&request, fd).await?,
                None => conn.send(&request).await?,
            }
            conn.read_reply(command, &id).await
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout { command: command.into(), timeout: self.timeout }),
        };
        if matches!(
            result,
            Err(QmpError::Io(_)
                | QmpError::Timeout { .. }
                | QmpError::Closed
                | QmpError::Protocol(_)
                | QmpError::Malformed { .. })
        ) {
            // The stream may hold half a reply; start afresh next time.
            state.conn = None;
        }
        result
    }

    pub async fn query_status(&self) -> Result<QmpStatus, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Reply { command: "query-status", source })
    }

    /// Pauses all vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes all vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// Asks the guest to power off (ACPI power button).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// Makes QEMU exit at once. QEMU may close the socket before or after replying; both mean success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if is_disconnect(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), BrokenPipe | ConnectionReset | UnexpectedEof)
}

impl Conn {
    async fn send(&mut self, request: &Value) -> Result<(), QmpError> {
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        Ok(())
    }

    /// Sends `request` with `fd` attached to its first byte, where QEMU picks it up for that command.
    async fn send_with_fd(&mut self, request: &Value, fd: RawFd) -> Result<(), QmpError> {
        let mut line = request.to_string();
        line.push('\n');
        let bytes = line.as_bytes();
        let stream: &UnixStream = self.writer.as_ref();
        let sent = loop {
            stream.writable().await?;
            let attempt = stream.try_io(Interest::WRITABLE, || {
                let fds = [fd];
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(sent) => break sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The fd went with the first bytes; the rest of the line, if the socket took only part, follows plainly.
        self.writer.write_all(&bytes[sent..]).await?;
        Ok(())
    }

    async fn read_message(&mut self) -> Result<Message, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|source| QmpError::Malformed { line: line.trim_end().to_owned(), source })
    }

    /// Reads until the reply carrying `id`, skipping events and stale replies.
    async fn read_reply(&mut self, command: &str, id: &Value) -> Result<Value, QmpError> {
        loop {
            let message = self.read_message().await?;
            if message.event.is_some() || message.id.as_ref() != Some(id) {
                continue;
            }
            if let Some(error) = message.error {
                return Err(QmpError::Command { command: command.into(), class: error.class, desc: error.desc });
            }
            return message.ret.ok_or_else(|| QmpError::Protocol(format!("reply to {command} has no return")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP server: sends the greeting, then for each request answers with `reply(request)`.
    async fn fake_qemu(
        listener: UnixListener,
        reply: impl Fn(&Value) -> Vec<Value> + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let greeting = json!({"QMP": {"version": {}, "capabilities": []}});
            write.write_all(format!("{greeting}\n").as_bytes()).await.expect("greet");
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).expect("json request");
                seen.push(request["execute"].as_str().unwrap_or_default().to_owned());
                for answer in reply(&request) {
                    write.write_all(format!("{answer}\n").as_bytes()).await.expect("answer");
                }
                if request["execute"] == "quit" {
                    break;
                }
            }
            seen
        })
    }

    fn ok(request: &Value, ret: Value) -> Value {
        json!({ "return": ret, "id": request["id"] })
    }

    #[tokio::test]
    async fn negotiates_and_runs_commands_skipping_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let server = fake_qemu(UnixListener::bind(&path).expect("bind"), |req| match req["execute"].as_str() {
            Some("query-status") => vec![
                json!({"event": "RESUME", "timestamp": {}}),
                json!({"return": {}, "id": 999}),
                ok(req, json!({"status": "paused", "running": false, "singlestep": false})),
            ],
            Some("cont") => vec![json!({"error": {"class": "GenericError", "desc": "nope"}, "id": req["id"]})],
            _ => vec![ok(req, json!({}))],
        })
        .await;

        let qmp = QmpClient::connect(&path, Duration::from_secs(5)).await.expect("connect");
        let status = qmp.query_status().await.expect("query-status");
        assert_eq!(status, QmpStatus { status: "paused".into(), running: false });
        qmp.stop().await.expect("stop");
        let err = qmp.cont().await.expect_err("cont fails");
        assert!(err.to_string().contains("GenericError: nope"), "{err}");
        qmp.quit().await.expect("quit");
        let seen = server.await.expect("server");
        assert_eq!(seen, ["qmp_capabilities", "query-status", "stop", "cont", "quit"]);
    }

    #[tokio::test]
    async fn a_reply_of_the_wrong_shape_names_the_command_and_keeps_the_cause_as_its_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let server = fake_qemu(UnixListener::bind(&path).expect("bind"), |req| match req["execute"].as_str() {
            Some("query-status") => vec![ok(req, json!({"status": 5}))],
            _ => vec![ok(req, json!({}))],
        })
        .await;
        let qmp = QmpClient::connect(&path, Duration::from_secs(5)).await.expect("connect");
        let err = qmp.query_status().await.expect_err("a number is not a status");
        assert_eq!(err.to_string(), "unexpected reply to QMP command query-status");
        let cause = std::error::Error::source(&err).expect("the JSON error").to_string();
        assert!(cause.contains("invalid type"), "{cause}");
        qmp.quit().await.expect("quit");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn quit_tolerates_close_without_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let server = fake_qemu(UnixListener::bind(&path).expect("bind"), |req| match req["execute"].as_str() {
            Some("quit") => vec![],
            _ => vec![ok(req, json!({}))],
        })
        .await;
        let qmp = QmpClient::connect(&path, Duration::from_secs(5)).await.expect("connect");
        qmp.quit().await.expect("quit without a reply is still a quit");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn missing_reply_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let _server = fake_qemu(UnixListener::bind(&path).expect("bind"), |req| match req["execute"].as_str() {
            Some("qmp_capabilities") => vec![ok(req, json!({}))],
            _ => vec![],
        })
        .await;
        let qmp = QmpClient::connect(&path, Duration::from_millis(300)).await.expect("connect");
        let err = qmp.system_powerdown().await.expect_err("no reply");
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn getfd_carries_the_file_to_qemu() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned};
        use std::io::{Read, Write};
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // A fake QEMU on a plain thread, reading with recvmsg so it sees the attached fd like QEMU does.
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            stream.write_all(b"{\"QMP\": {}}\n").expect("greet");
            let mut received = Vec::new();
            for _ in 0..2 {
                let mut buf = [0u8; 512];
                let mut space = nix::cmsg_space!([RawFd; 1]);
                let (len, fds) = {
                    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                        .expect("recvmsg");
                    let fds: Vec<RawFd> = msg
                        .cmsgs()
                        .expect("cmsgs")
                        .filter_map(|c| match c {
                            ControlMessageOwned::ScmRights(fds) => Some(fds),
                            _ => None,
                        })
                        .flatten()
                        .collect();
                    (msg.bytes, fds)
                };
                let request: Value = serde_json::from_slice(&buf[..len]).expect("one request");
                // SAFETY: recvmsg just created these fds in this process; nothing else owns them.
                let fds: Vec<OwnedFd> = fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
                stream
                    .write_all(format!("{}\n", json!({"return": {}, "id": request["id"]})).as_bytes())
                    .expect("reply");
                received.push((request["execute"].as_str().unwrap_or_default().to_owned(), fds));
            }
            received
        });

        let qmp = QmpClient::connect(&path, Duration::from_secs(5)).await.expect("connect");
        let file_path = dir.path().join("state");
        std::fs::write(&file_path, b"device state").expect("write");
        let file = std::fs::File::open(&file_path).expect("open");
        qmp.execute_with_fd("getfd", Some(json!({"fdname": "migration"})), file.as_fd()).await.expect("getfd");
        drop(file);
        let received = tokio::task::spawn_blocking(move || server.join().expect("server")).await.expect("join");
        assert_eq!(received[0].0, "qmp_capabilities");
        assert!(received[0].1.is_empty(), "no fd with a plain command");
        assert_eq!(received[1].0, "getfd");
        assert_eq!(received[1].1.len(), 1, "exactly one fd with getfd");
        let mut text = String::new();
        std::fs::File::from(received[1].1[0].try_clone().expect("dup"))
            .read_to_string(&mut text)
            .expect("read through the passed fd");
        assert_eq!(text, "device state");
    }

    #[tokio::test]
    async fn connect_to_missing_socket_names_the_path() {
        let err = QmpClient::connect("/nonexistent/qmp.sock", Duration::from_secs(1)).await.expect_err("no socket");
        assert!(err.to_string().contains("/nonexistent/qmp.sock"), "{err}");
    }
}
