//! The port-forward stream between the host and the agent, beside ttrpc (so forwarding needs no change to
//! `agent.proto`, and a forwarded byte never waits behind an RPC).
//!
//! The host connects to the agent's vsock port [`crate::PORT_FORWARD_VSOCK_PORT`], one connection per forwarded TCP
//! connection, and sends one request line, `FORWARD <port>\n`. The agent connects to that port on the guest's
//! loopback and answers `OK\n`, or `ERR <reason>\n` and closes. After `OK` both directions are framed
//! ([`splice`]): a frame is a 4-byte big-endian length and that many bytes, and an empty frame ends its
//! direction. The framing is what carries a half-close: vhost-device-vsock turns the host closing its write side
//! into a full shutdown of the guest's socket, and ignores the guest shutting down only its write side, so the
//! transport's own end of stream cannot say "no more data this way".
//!
//! The guest is untrusted: every line and frame read here has a fixed upper bound, and a frame that claims more
//! is an error before anything is allocated for it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest request line, newline included (`FORWARD 65535\n` is 14 bytes).
pub const MAX_REQUEST: usize = 32;

/// The longest reply line, newline included; the agent cuts its reasons to fit.
pub const MAX_REPLY: usize = 256;

/// The largest frame payload either side sends or accepts.
pub const MAX_FRAME: usize = 32 * 1024;

/// At most this many forwarded connections are open at once per sandbox, on either side.
pub const MAX_CONNECTIONS: usize = 64;

const FRAME_HEADER: usize = 4;

/// A request or reply line that breaks the protocol.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the line is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("the stream ended before the end of the line")]
    Truncated,
    #[error("not a port-forward request: {0:?}")]
    BadRequest(String),
    #[error("not a port-forward reply: {0:?}")]
    BadReply(String),
    #[error("reading the line")]
    Io(#[from] io::Error),
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Connected: framed data follows.
    Ok,
    /// Not connected, and why (printable ASCII only).
    Refused(String),
}

/// The request line for `port`.
pub fn request(port: u16) -> Vec<u8> {
    format!("FORWARD {port}\n").into_bytes()
}

/// The port of a request line (without its newline): 1 to 65535, decimal, no sign, no leading zeros.
pub fn parse_request(line: &[u8]) -> Result<u16, HeaderError> {
    let bad = || HeaderError::BadRequest(String::from_utf8_lossy(line).into_owned());
    let digits = line.strip_prefix(b"FORWARD ").ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 5 || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let port: u32 = digits.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0'));
    u16::try_from(port).map_err(|_| bad())
}

/// The reply line for `reply`. A reason is cut to fit [`MAX_REPLY`], and anything but printable ASCII in it
/// becomes `?`, so it can neither end the line early nor put control characters into the host's log.
pub fn reply(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::Ok => b"OK\n".to_vec(),
        Reply::Refused(reason) => {
            let mut line = b"ERR ".to_vec();
            let room = MAX_REPLY - line.len() - 1;
            line.extend(reason.bytes().take(room).map(|b| if b == b' ' || b.is_ascii_graphic() { b } else { b'?' }));
            line.push(b'\n');
            line
        }
    }
}

/// A reply line (without its newline).
pub fn parse_reply(line: &[u8]) -> Result<Reply, HeaderError> {
    if line == b"OK" {
        return Ok(Reply::Ok);
    }
    match line.strip_prefix(b"ERR ") {
        Some(reason) if reason.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) => {
            Ok(Reply::Refused(String::from_utf8_lossy(reason).into_owned()))
        }
        _ => Err(HeaderError::BadReply(String::from_utf8_lossy(line).into_owned())),
    }
}

/// Reads one line of at most `max` bytes (newline included) and returns it without the newline. Reads no
/// further than the newline: what follows stays in `reader`'s buffer.
pub async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, max: usize) -> Result<Vec<u8>, HeaderError> {
    let mut line = Vec::with_capacity(max);
    (&mut *reader).take(max as u64).read_until(b'\n', &mut line).await?;
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(line);
    }
    Err(if line.len() >= max { HeaderError::TooLong { max } } else { HeaderError::Truncated })
}

/// Carries bytes both ways between `raw` (a TCP connection) and `framed` (the other side's framed stream) until
/// both directions have ended. The end of `raw`'s input becomes an empty frame; an empty frame from `framed`
/// shuts down `raw`'s write side, and the other direction goes on. An error in either direction ends both.
/// Each direction holds one buffer of at most [`MAX_FRAME`] bytes; nothing is read ahead of what was written.
///
/// With `framed_idle`, once `raw`'s input has ended, `framed` must deliver a frame at least that often or the
/// splice ends with [`io::ErrorKind::TimedOut`]: the host's bound on a guest that keeps a connection open after
/// its client has gone (the client may have closed only its write side, so it gets that long to be answered).
pub async fn splice<T, F>(raw: T, framed: F, framed_idle: Option<Duration>) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite,
    F: AsyncRead + AsyncWrite,
{
    let (mut raw_in, mut raw_out) = tokio::io::split(raw);
    let (mut framed_in, mut framed_out) = tokio::io::split(framed);
    let frames_in = AtomicU64::new(0);
    let outbound = async {
        let mut buf = vec![0u8; FRAME_HEADER + MAX_FRAME];
        loop {
            let n = raw_in.read(&mut buf[FRAME_HEADER..]).await?;
            // n <= MAX_FRAME, which fits.
            buf[..FRAME_HEADER].copy_from_slice(&(n as u32).to_be_bytes());
            framed_out.write_all(&buf[..FRAME_HEADER + n]).await?;
            if n == 0 {
                return framed_out.flush().await;
            }
        }
    };
    let inbound = async {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let n = read_frame(&mut framed_in, &mut buf).await?;
            frames_in.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                return raw_out.shutdown().await;
            }
            raw_out.write_all(&buf[..n]).await?;
        }
    };
    tokio::pin!(outbound, inbound);
    tokio::select! {
        ended = &mut inbound => {
            ended?;
            return outbound.await;
        }
        ended = &mut outbound => ended?,
    }
    let Some(idle) = framed_idle else {
        return inbound.await;
    };
    loop {
        let seen = frames_in.load(Ordering::Relaxed);
        tokio::select! {
            ended = &mut inbound => return ended,
            () = tokio::time::sleep(idle) => {
                if frames_in.load(Ordering::Relaxed) == seen {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing came back within {idle:?} after the input ended"),
                    ));
                }
            }
        }
    }
}

/// Reads one frame into `buf` (at least [`MAX_FRAME`] long) and returns its length. A stream that ends
/// between frames has ended too early: the other side says so with an empty frame.
async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut header = [0u8; FRAME_HEADER];
    reader.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME || len > buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    reader.read_exact(&mut buf[..len]).await?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, BufReader};

    #[test]
    fn requests_round_trip() {
        for port in [1, 80, 8080, 65535] {
            let line = request(port);
            assert_eq!(line.last(), Some(&b'\n'));
            assert!(line.len() <= MAX_REQUEST);
            assert_eq!(parse_request(&line[..line.len() - 1]).expect("parses"), port);
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        for line in [
            &b"FORWARD 0"[..],
            b"FORWARD 65536",
            b"FORWARD 123456",
            b"FORWARD 080",
            b"FORWARD +80",
            b"FORWARD -1",
            b"FORWARD ",
            b"FORWARD 80 ",
            b"forward 80",
            b"FORWARD\t80",
            b"",
        ] {
            assert!(parse_request(line).is_err(), "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn replies_round_trip() {
        assert_eq!(parse_reply(b"OK").expect("ok"), Reply::Ok);
        let refused = Reply::Refused("connect to 127.0.0.1:81: Connection refused (os error 111)".into());
        let line = reply(&refused);
        assert_eq!(parse_reply(&line[..line.len() - 1]).expect("err"), refused);
    }

    #[test]
    fn a_reason_cannot_break_the_line_or_the_bound() {
        let line = reply(&Reply::Refused(format!("a\nb\x1b[31m{}", "x".repeat(1000))));
        assert_eq!(line.len(), MAX_REPLY);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(line.starts_with(b"ERR a?b?[31m"), "{:?}", String::from_utf8_lossy(&line));
        assert!(parse_reply(&line[..line.len() - 1]).is_ok());
    }

    #[test]
    fn bad_replies_are_refused() {
        for line in [&b"OK "[..], b"ok", b"ERR", b"ERR \x07bell", b"", b"YES"] {
            assert!(parse_reply(line).is_err(), "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[tokio::test]
    async fn a_line_is_bounded_and_leaves_what_follows() {
        let mut reader = BufReader::new(&b"OK\nframes"[..]);
        assert_eq!(read_line(&mut reader, MAX_REPLY).await.expect("line"), b"OK");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"frames");

        let endless = vec![b'x'; 10 * MAX_REPLY];
        let err = read_line(&mut BufReader::new(&endless[..]), MAX_REPLY).await.expect_err("too long");
        assert!(matches!(err, HeaderError::TooLong { max: MAX_REPLY }), "{err:?}");
        let err = read_line(&mut BufReader::new(&b"OK"[..]), MAX_REPLY).await.expect_err("no newline");
        assert!(matches!(err, HeaderError::Truncated), "{err:?}");
        let exact = [vec![b'x'; MAX_REQUEST - 1], vec![b'\n']].concat();
        assert_eq!(read_line(&mut BufReader::new(&exact[..]), MAX_REQUEST).await.expect("fits").len(), MAX_REQUEST - 1);
    }

    /// Two splices back to back, as host and agent run them: bytes cross both ways and a half-close travels
    /// as an empty frame while the other direction keeps going.
    #[tokio::test]
    async fn splices_carry_data_and_half_close() {
        let (mut client, host_raw) = duplex(64);
        let (host_framed, guest_framed) = duplex(64);
        let (guest_raw, mut server) = duplex(64);
        let host = tokio::spawn(splice(host_raw, host_framed, Some(Duration::from_secs(10))));
        let guest = tokio::spawn(splice(guest_raw, guest_framed, None));

        let big = vec![7u8; 3 * MAX_FRAME + 5];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                client.write_all(&big).await.expect("client writes");
                client.shutdown().await.expect("client half-closes");
                let mut answer = Vec::new();
                client.read_to_end(&mut answer).await.expect("client reads");
                answer
            })
        };
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.expect("server reads to the half-close");
        assert_eq!(received.len(), big.len());
        server.write_all(b"answer after the half-close").await.expect("server writes");
        server.shutdown().await.expect("server closes");
        assert_eq!(writer.await.expect("client"), b"answer after the half-close");
        host.await.expect("host task").expect("host splice");
        guest.await.expect("guest task").expect("guest splice");
    }

    #[tokio::test]
    async fn an_oversized_frame_ends_the_splice_unread() {
        let (_client, raw) = duplex(64);
        let (framed, mut peer) = duplex(64);
        let task = tokio::spawn(splice(raw, framed, None));
        peer.write_all(&u32::MAX.to_be_bytes()).await.expect("claim 4 GiB");
        let err = task.await.expect("task").expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_stream_that_ends_between_frames_is_an_error() {
        let (_client, raw) = duplex(64);
        let (framed, peer) = duplex(64);
        let task = tokio::spawn(splice(raw, framed, None));
        drop(peer);
        let err = task.await.expect("task").expect_err("early end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;
    use tokio::io::{duplex, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_left_once_the_input_ended() {
        let (mut client, raw) = duplex(64);
        let (framed, _silent_peer) = duplex(64);
        let task = tokio::spawn(splice(raw, framed, Some(Duration::from_secs(60))));
        client.shutdown().await.expect("the client's input ends");
        let err = task.await.expect("task").expect_err("given up");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_keeps_sending_is_not_cut() {
        let (mut client, raw) = duplex(1 << 20);
        let (framed, mut peer) = duplex(1 << 20);
        let task = tokio::spawn(splice(raw, framed, Some(Duration::from_secs(60))));
        client.shutdown().await.expect("the client's input ends");
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            peer.write_all(&[0, 0, 0, 1, b'x']).await.expect("a frame");
        }
        peer.write_all(&[0, 0, 0, 0]).await.expect("the end");
        task.await.expect("task").expect("a clean end after 250 s");
    }
}
