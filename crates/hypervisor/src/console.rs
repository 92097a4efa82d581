//! The guest's serial console as the host keeps it: a bounded ring of its last lines, fed by the backend while
//! the guest writes, so no guest can grow a host file or host memory by writing to its console.
//!
//! Nothing here knows which VMM produced the bytes. A backend creates a [`GuestConsole`], feeds it with
//! [`GuestConsole::push`] from a reader that drains the VMM's console channel continuously (so the VMM never
//! blocks on it), and calls [`GuestConsole::close`] when the channel ends. Readers take the last lines for error
//! messages ([`GuestConsole::tail`], also after the VM exited) or follow new ones ([`GuestConsole::follow`]) at a
//! bounded rate.
//!
//! The same ring keeps the VMM's and its helpers' own stdout and stderr ([`crate::process::ProcessOutput`]): a
//! guest can make them log too (device errors, failed FUSE requests).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Bytes of one line that are kept, both of what the guest wrote and of the text made of it (escapes take
/// more room than the control characters they stand for); the rest of the line is dropped and the line marked.
pub const MAX_LINE_BYTES: usize = 1024;
/// Lines the ring keeps.
pub const MAX_LINES: usize = 200;
/// Bytes of text the ring keeps (after escaping), whatever the number of lines.
pub const MAX_BYTES: usize = 64 * 1024;
/// Appended to a line cut at [`MAX_LINE_BYTES`].
pub const TRUNCATED_MARK: &str = " [line truncated]";
/// What [`GuestConsole::tail`] says when the guest wrote nothing.
pub const NO_OUTPUT: &str = "(no console output)";

/// A VM's console: cheap to clone, every clone sees the same ring.
#[derive(Debug, Clone)]
pub struct GuestConsole {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ring: Mutex<Ring>,
    /// Bumped whenever a line completes or the console closes; followers wait on it.
    changes: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<String>,
    /// Bytes of text in `lines`.
    bytes: usize,
    /// Sequence number of `lines[0]`; the next line gets `first + lines.len()`.
    first: u64,
    /// The line being written: raw bytes, at most [`MAX_LINE_BYTES`].
    partial: Vec<u8>,
    partial_truncated: bool,
    closed: bool,
}

impl Default for GuestConsole {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestConsole {
    pub fn new() -> Self {
        Self { inner: Arc::new(Inner { ring: Mutex::new(Ring::default()), changes: watch::Sender::new(0) }) }
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        // The ring is plain data: a panic elsewhere while holding the lock leaves nothing half-done that matters.
        self.inner.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds what the guest wrote. Lines end at `\n`; a trailing `\r` is dropped; control characters are escaped
    /// (`\x1b`), so console text cannot drive a terminal that shows a log.
    pub fn push(&self, bytes: &[u8]) {
        let completed = {
            let mut ring = self.ring();
            if ring.closed {
                return;
            }
            let before = ring.next_seq();
            for chunk in bytes.split_inclusive(|&b| b == b'\n') {
                let (text, ends_line) = match chunk.split_last() {
                    Some((b'\n', text)) => (text, true),
                    _ => (chunk, false),
                };
                ring.append_partial(text);
                if ends_line {
                    ring.finish_line();
                }
            }
            ring.next_seq() != before
        };
        if completed {
            self.inner.changes.send_modify(|n| *n += 1);
        }
    }

    /// The console channel ended (the VM exited): an unfinished last line becomes a line, and followers end
    /// once they have read everything.
    pub fn close(&self) {
        {
            let mut ring = self.ring();
            if ring.closed {
                return;
            }
            if !ring.partial.is_empty() || ring.partial_truncated {
                ring.finish_line();
            }
            ring.closed = true;
        }
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// The last `lines` lines, oldest first, with a line still being written last; [`NO_OUTPUT`] when there are
    /// none. Works the same after the VM exited.
    pub fn tail(&self, lines: usize) -> String {
        self.last_lines(lines).unwrap_or_else(|| NO_OUTPUT.to_string())
    }

    /// [`tail`](Self::tail) without the placeholder: `None` when the last lines are blank or there are none.
    pub(crate) fn last_lines(&self, lines: usize) -> Option<String> {
        let ring = self.ring();
        let mut out: Vec<String> = Vec::new();
        let partial = (!ring.partial.is_empty()).then(|| render(&ring.partial, ring.partial_truncated));
        let keep = lines.saturating_sub(usize::from(partial.is_some()));
        out.extend(ring.lines.iter().skip(ring.lines.len().saturating_sub(keep)).cloned());
        out.extend(partial);
        if out.iter().all(|l| l.trim().is_empty()) {
            return None;
        }
        Some(out.join("\n"))
    }

    /// Lines and bytes of text held, the line being written included: what the bounds limit.
    #[cfg(test)]
    pub(crate) fn held(&self) -> (usize, usize) {
        let ring = self.ring();
        (ring.lines.len() + usize::from(!ring.partial.is_empty()), ring.bytes + ring.partial.len())
    }

    /// Resolves once the console channel has ended (the VM exited and everything it wrote was read).
    pub async fn closed(&self) {
        let mut changes = self.inner.changes.subscribe();
        while !self.ring().closed {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Follows the console from the oldest line it still holds, passing at most `limit` lines.
    pub fn follow(&self, limit: RateLimit) -> ConsoleFollower {
        let changes = self.inner.changes.subscribe();
        let cursor = self.ring().first;
        ConsoleFollower {
            console: self.clone(),
            changes,
            cursor,
            limiter: Limiter::new(limit, Instant::now()),
            ready: VecDeque::new(),
        }
    }

    /// Complete lines from sequence number `cursor` on (moving it past them), how many lines between `cursor` and
    /// the oldest kept one were lost to the ring's bounds, and whether the console is closed.
    fn since(&self, cursor: &mut u64) -> (Vec<String>, u64, bool) {
        let ring = self.ring();
        let missed = ring.first.saturating_sub(*cursor);
        let start = (*cursor).max(ring.first);
        let lines: Vec<String> = ring.lines.iter().skip((start - ring.first) as usize).cloned().collect();
        *cursor = ring.next_seq();
        (lines, missed, ring.closed)
    }
}

/// Reads `source` into `ring` until end of file, on a task of its own, then closes the ring. The writer never
/// blocks on us for long: we read as fast as it writes and the ring drops what it cannot keep.
pub(crate) fn drain(mut source: impl AsyncRead + Unpin + Send + 'static, ring: GuestConsole, what: String) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            match source.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => ring.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading {what} failed");
                    break;
                }
            }
        }
        ring.close();
    });
}

impl Ring {
    fn next_seq(&self) -> u64 {
        self.first + self.lines.len() as u64
    }

    fn append_partial(&mut self, text: &[u8]) {
        let room = MAX_LINE_BYTES - self.partial.len();
        if text.len() > room {
            self.partial_truncated = true;
        }
        self.partial.extend_from_slice(&text[..text.len().min(room)]);
    }

    fn finish_line(&mut self) {
        let line = render(&self.partial, self.partial_truncated);
        self.partial.clear();
        self.partial_truncated = false;
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > MAX_LINES || self.bytes > MAX_BYTES {
            match self.lines.pop_front() {
                Some(old) => {
                    self.bytes -= old.len();
                    self.first += 1;
                }
                None => break,
            }
        }
    }
}

/// A console line as text: invalid UTF-8 replaced, a trailing `\r` dropped, control characters escaped, at most
/// [`MAX_LINE_BYTES`] (plus a few for the last escape) before the mark.
fn render(raw: &[u8], mut truncated: bool) -> String {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let mut line = String::with_capacity(raw.len().min(MAX_LINE_BYTES) + TRUNCATED_MARK.len());
    for c in String::from_utf8_lossy(raw).chars() {
        if line.len() >= MAX_LINE_BYTES {
            truncated = true;
            break;
        }
        if c.is_control() && c != '\t' {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    if truncated {
        line.push_str(TRUNCATED_MARK);
    }
    line
}

/// How many console lines a follower passes on: a token bucket of `burst` lines refilled at `lines_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub lines_per_sec: u32,
    pub burst: u32,
}

impl Default for RateLimit {
    /// 50 lines a second; a burst as large as the ring, so a boot log already held is passed on whole.
    fn default() -> Self {
        Self { lines_per_sec: 50, burst: MAX_LINES as u32 }
    }
}

/// What a follower yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    Line(String),
    /// This many lines were not passed on: over the rate limit, or overwritten before they were read.
    Dropped(u64),
}

/// New console lines as they come, at most [`RateLimit`] of them. Ends when the console closes.
#[derive(Debug)]
pub struct ConsoleFollower {
    console: GuestConsole,
    changes: watch::Receiver<u64>,
    cursor: u64,
    limiter: Limiter,
    ready: VecDeque<ConsoleEvent>,
}

impl ConsoleFollower {
    /// The next line or drop notice; `None` once the console is closed and everything was yielded.
    pub async fn next(&mut self) -> Option<ConsoleEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            // Mark what is read now as seen before reading, so a line completed in between wakes us again.
            self.changes.borrow_and_update();
            let (lines, missed, closed) = self.console.since(&mut self.cursor);
            let now = Instant::now();
            self.limiter.lost(missed);
            for line in lines {
                match self.limiter.admit(now) {
                    Admit::Pass => self.ready.push_back(ConsoleEvent::Line(line)),
                    Admit::PassAfterDropped(n) => {
                        self.ready.push_back(ConsoleEvent::Dropped(n));
                        self.ready.push_back(ConsoleEvent::Line(line));
                    }
                    Admit::Drop => {}
                }
            }
            if !self.ready.is_empty() {
                continue;
            }
            if closed {
                return self.limiter.take_dropped().map(ConsoleEvent::Dropped);
            }
            // Wait for new lines, or until the drop notice is due even if the guest has gone quiet.
            match self.limiter.notice_due() {
                Some(at) => {
                    tokio::select! {
                        changed = self.changes.changed() => if changed.is_err() { return None },
                        () = tokio::time::sleep_until(at) => {
                            if let Some(n) = self.limiter.notice(Instant::now()) {
                                self.ready.push_back(ConsoleEvent::Dropped(n));
                            }
                        }
                    }
                }
                None => {
                    if self.changes.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Pass,
    /// Pass, after telling how many lines were dropped before this one.
    PassAfterDropped(u64),
    Drop,
}

/// The token bucket, with time passed in so it is tested without waiting.
///
/// Once it drops a line it keeps dropping until half the burst has come back, then reports the count once: a
/// guest that floods the console gets a steady trickle of lines and one notice per refill, not a notice per
/// token.
#[derive(Debug, Clone)]
struct Limiter {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl Limiter {
    fn new(limit: RateLimit, now: Instant) -> Self {
        Self { limit, tokens: f64::from(limit.burst.max(1)), last: now, dropped: 0 }
    }

    fn capacity(&self) -> f64 {
        f64::from(self.limit.burst.max(1))
    }

    /// Tokens needed to resume passing lines after drops.
    fn resume_at(&self) -> f64 {
        (self.capacity() / 2.0).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(self.limit.lines_per_sec)).min(self.capacity());
        self.last = now;
    }

    fn admit(&mut self, now: Instant) -> Admit {
        self.refill(now);
        let needed = if self.dropped > 0 { self.resume_at() } else { 1.0 };
        if self.tokens < needed {
            self.dropped += 1;
            return Admit::Drop;
        }
        self.tokens -= 1.0;
        match std::mem::take(&mut self.dropped) {
            0 => Admit::Pass,
            n => Admit::PassAfterDropped(n),
        }
    }

    /// Lines lost before they could be admitted count as dropped.
    fn lost(&mut self, lines: u64) {
        self.dropped += lines;
    }

    /// When the pending drop notice may go out, if one is pending.
    fn notice_due(&self) -> Option<Instant> {
        if self.dropped == 0 {
            return None;
        }
        let missing = (self.resume_at() - self.tokens).max(0.0);
        let rate = f64::from(self.limit.lines_per_sec.max(1));
        Some(self.last + Duration::from_secs_f64(missing / rate))
    }

    /// The drop count, if it is due by `now`.
    fn notice(&mut self, now: Instant) -> Option<u64> {
        self.refill(now);
        (self.dropped > 0 && self.tokens >= self.resume_at()).then(|| std::mem::take(&mut self.dropped))
    }

    /// The drop count, due or not (the console closed).
    fn take_dropped(&mut self) -> Option<u64> {
        (self.dropped > 0).then(|| std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize, prefix: &str) -> Vec<u8> {
        (0..n).flat_map(|i| format!("{prefix}{i}\r\n").into_bytes()).collect()
    }

    #[test]
    fn tail_keeps_the_last_lines_across_pushes_and_after_close() {
        let console = GuestConsole::new();
        assert_eq!(console.tail(5), NO_OUTPUT);
        console.push(b"Linux version 6.1\r\nfirst ha");
        console.push(b"lf, second half\r\nunfinished");
        assert_eq!(console.tail(10), "Linux version 6.1\nfirst half, second half\nunfinished");
        assert_eq!(console.tail(1), "unfinished");
        console.close();
        assert_eq!(console.tail(2), "first half, second half\nunfinished");
        console.push(b"after close\n");
        assert_eq!(console.tail(1), "unfinished", "nothing is added once closed");
    }

    #[test]
    fn ring_is_bounded_in_lines_and_bytes() {
        let console = GuestConsole::new();
        console.push(&lines(MAX_LINES * 3, "line "));
        let ring = console.ring();
        assert_eq!(ring.lines.len(), MAX_LINES);
        assert_eq!(ring.lines.back().map(String::as_str), Some(format!("line {}", MAX_LINES * 3 - 1).as_str()));
        assert_eq!(ring.first, (MAX_LINES * 2) as u64);
        drop(ring);

        // Long lines: the byte bound bites before the line bound.
        let console = GuestConsole::new();
        let long = format!("{}\n", "y".repeat(MAX_LINE_BYTES - 1));
        for _ in 0..MAX_LINES {
            console.push(long.as_bytes());
        }
        let ring = console.ring();
        assert!(ring.bytes <= MAX_BYTES, "{} bytes kept", ring.bytes);
        assert_eq!(ring.bytes, ring.lines.iter().map(String::len).sum::<usize>());
        assert_eq!(ring.lines.len(), MAX_BYTES / (MAX_LINE_BYTES - 1));
    }

    #[test]
    fn long_lines_are_cut_and_marked_and_endless_ones_stay_bounded() {
        let console = GuestConsole::new();
        let mut line = vec![b'x'; 10 * MAX_LINE_BYTES];
        line.extend_from_slice(b"tail-of-the-line\nnext\n");
        console.push(&line);
        let tail = console.tail(2);
        let (first, second) = tail.split_once('\n').expect("two lines");
        assert_eq!(first, format!("{}{TRUNCATED_MARK}", "x".repeat(MAX_LINE_BYTES)));
        assert_eq!(second, "next");

        // A guest that never writes a newline: memory stays at one line.
        let console = GuestConsole::new();
        for _ in 0..1000 {
            console.push(&[b'z'; 4096]);
        }
        assert_eq!(console.ring().partial.len(), MAX_LINE_BYTES);
        assert!(console.tail(1).ends_with(TRUNCATED_MARK));
    }

    #[test]
    fn control_characters_are_escaped_within_the_line_cap() {
        let console = GuestConsole::new();
        console.push(b"\x1b[2Jcleared\ttab\x07\xff\n");
        assert_eq!(console.tail(1), "\\u{1b}[2Jcleared\ttab\\u{7}\u{fffd}");

        // Escapes are six times longer than what they stand for: the text is cut, not the raw bytes only.
        console.push(&[0x1b; MAX_LINE_BYTES]);
        console.push(b"\n");
        let line = console.tail(1);
        assert!(line.ends_with(TRUNCATED_MARK), "{line}");
        assert!(line.len() <= MAX_LINE_BYTES + 6 + TRUNCATED_MARK.len(), "{} bytes", line.len());
    }

    #[test]
    fn limiter_passes_a_burst_then_the_rate_and_reports_drops_once() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(RateLimit { lines_per_sec: 50, burst: 10 }, t0);
        for _ in 0..10 {
            assert_eq!(limiter.admit(t0), Admit::Pass);
        }
        for _ in 0..90 {
            assert_eq!(limiter.admit(t0), Admit::Drop);
        }
        // Half the burst (5 tokens) comes back after 100 ms at 50/s; one token is not enough to resume.
        assert_eq!(limiter.admit(t0 + Duration::from_millis(20)), Admit::Drop);
        let due = limiter.notice_due().expect("a notice is pending");
        assert!(due > t0 && due <= t0 + Duration::from_millis(101), "{:?}", due - t0);
        assert_eq!(limiter.notice(t0 + Duration::from_millis(50)), None, "not due yet");
        assert_eq!(limiter.admit(t0 + Duration::from_millis(100)), Admit::PassAfterDropped(91));
        assert_eq!(limiter.admit(t0 + Duration::from_millis(100)), Admit::Pass);
        assert_eq!(limiter.notice_due(), None);

        // Sustained flood: over 10 s at 1000 lines/s, about 50 lines/s pass, and notices are few.
        let mut limiter = Limiter::new(RateLimit { lines_per_sec: 50, burst: 100 }, t0);
        let (mut passed, mut notices, mut reported) = (0u64, 0u64, 0u64);
        for ms in 0..10_000u64 {
            match limiter.admit(t0 + Duration::from_millis(ms)) {
                Admit::Pass => passed += 1,
                Admit::PassAfterDropped(n) => {
                    passed += 1;
                    notices += 1;
                    reported += n;
                }
                Admit::Drop => {}
            }
        }
        reported += limiter.take_dropped().unwrap_or(0);
        assert!((500..=650).contains(&passed), "{passed} lines passed");
        assert!(notices <= 10, "{notices} drop notices");
        assert_eq!(passed + reported, 10_000, "every line is passed or counted");
    }

    #[tokio::test(start_paused = true)]
    async fn follower_yields_lines_then_a_drop_notice_and_ends_on_close() {
        let console = GuestConsole::new();
        console.push(b"boot 1\nboot 2\n");
        let mut follower = console.follow(RateLimit { lines_per_sec: 10, burst: 4 });
        assert_eq!(follower.next().await, Some(ConsoleEvent::Line("boot 1".into())));
        assert_eq!(follower.next().await, Some(ConsoleEvent::Line("boot 2".into())));

        // A flood: two more tokens, the rest dropped.
        console.push(&lines(100, "flood "));
        assert_eq!(follower.next().await, Some(ConsoleEvent::Line("flood 0".into())));
        assert_eq!(follower.next().await, Some(ConsoleEvent::Line("flood 1".into())));
        // The guest goes quiet: the notice still comes once half the burst is back (200 ms at 10/s).
        let before = Instant::now();
        assert_eq!(follower.next().await, Some(ConsoleEvent::Dropped(98)));
        let waited = before.elapsed();
        assert!(waited >= Duration::from_millis(150) && waited <= Duration::from_millis(250), "{waited:?}");

        let next = tokio::spawn(async move { (follower.next().await, follower) });
        tokio::task::yield_now().await;
        console.push(b"later\n");
        let (event, mut follower) = next.await.expect("follower task");
        assert_eq!(event, Some(ConsoleEvent::Line("later".into())));
        console.push(b"last words");
        console.close();
        assert_eq!(follower.next().await, Some(ConsoleEvent::Line("last words".into())));
        assert_eq!(follower.next().await, None);
        assert_eq!(console.tail(1), "last words", "the tail outlives the channel");
    }

    #[tokio::test]
    async fn a_slow_follower_counts_lines_the_ring_overwrote() {
        let console = GuestConsole::new();
        let mut follower = console.follow(RateLimit { lines_per_sec: 1000, burst: 1000 });
        console.push(&lines(MAX_LINES + 30, "l"));
        console.close();
        let mut events = Vec::new();
        while let Some(event) = follower.next().await {
            events.push(event);
        }
        assert_eq!(events.first(), Some(&ConsoleEvent::Dropped(30)));
        assert_eq!(events.get(1), Some(&ConsoleEvent::Line("l30".into())));
        assert_eq!(events.len(), MAX_LINES + 1);
    }
}
