//! The VM's host processes (QEMU and its helper daemons): spawning, signalling, reaping, and cleaning up after a
//! crash from persisted identities.
//!
//! Every child is owned by one reaper task, which alone calls `wait()`. Signals go through that task, so a signal
//! can never reach a PID that was already reaped and reused. A VM's processes outlive their handles: when the
//! owning `ManagedChild` is dropped the reaper keeps waiting for the child, and when this process exits the
//! children carry on (stopping a VM is always explicit, here or from its persisted identity elsewhere).
//!
//! A child's stdout and stderr go to one pipe we drain into a bounded ring ([`ProcessOutput`]), never to a file: a
//! guest can make QEMU or virtiofsd log without end (device errors, failed FUSE requests), and that must not grow
//! anything on the host.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{dup2, pipe2, Pid};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::console::{self, ConsoleEvent, ConsoleFollower, GuestConsole, RateLimit};
use crate::error::{Error, Result};

/// What a VM process is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessRole {
    /// The VMM itself (QEMU). Persisted state from before the name change says `qemu`.
    #[serde(alias = "qemu")]
    Vmm,
    Virtiofsd,
    VsockDaemon,
}

impl fmt::Display for ProcessRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProcessRole::Vmm => "the VMM",
            ProcessRole::Virtiofsd => "virtiofsd",
            ProcessRole::VsockDaemon => "vhost-device-vsock",
        })
    }
}

/// Enough to find a VM process again after the shim restarted, and to be sure it is still ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    pub role: ProcessRole,
    pub pid: u32,
    /// The full command line we started it with (`/proc/<pid>/cmdline`).
    pub argv: Vec<String>,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22), when it could be read.
    pub start_time: Option<u64>,
}

/// How a VM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl VmExit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<ExitStatus> for VmExit {
    fn from(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self { code: status.code(), signal: status.signal() }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// What a VM process wrote to stdout and stderr: its last lines, kept in memory with the guest console's bounds
/// ([`console::MAX_LINES`], [`console::MAX_BYTES`], [`console::MAX_LINE_BYTES`]) and escaped the same way.
/// Cheap to clone; outlives the process.
#[derive(Debug, Clone, Default)]
pub struct ProcessOutput {
    ring: GuestConsole,
}

/// What [`ProcessOutput::tail`] says when the process wrote nothing.
pub const NO_PROCESS_OUTPUT: &str = "(no output)";

impl ProcessOutput {
    /// The last `lines` lines, oldest first; [`NO_PROCESS_OUTPUT`] when there are none.
    pub fn tail(&self, lines: usize) -> String {
        self.ring.last_lines(lines).unwrap_or_else(|| NO_PROCESS_OUTPUT.to_string())
    }

    /// Resolves once the process and everything that shared its stdout and stderr are gone, and all they wrote
    /// was read.
    pub async fn closed(&self) {
        self.ring.closed().await
    }

    /// New lines as they come, at most `limit` of them.
    pub fn follow(&self, limit: RateLimit) -> ConsoleFollower {
        self.ring.follow(limit)
    }
}

/// A child process with its own reaper task.
#[derive(Debug)]
pub(crate) struct ManagedChild {
    info: VmProcess,
    output: ProcessOutput,
    exit: watch::Receiver<Option<VmExit>>,
    signals: mpsc::UnboundedSender<Signal>,
}

impl ManagedChild {
    /// Starts `program args`, stdout and stderr drained into its [`ProcessOutput`] and passed on to `tracing` at
    /// debug level, at most [`RateLimit::default`] lines a second. The child gets `inherit[i]` as fd
    /// `first_fd + i`; the caller's fds keep their close-on-exec flag (see [`dup_for_exec`]).
    pub(crate) fn spawn(
        role: ProcessRole,
        program: &Path,
        args: &[String],
        inherit: &[Arc<OwnedFd>],
        first_fd: RawFd,
        no_huge_pages: bool,
    ) -> Result<Self> {
        // One pipe for both streams, as one file was: their lines interleave whole, not byte by byte.
        // Close-on-exec, so no other child forked meanwhile keeps the write end and holds off end of file.
        let (output_rx, output_tx) = pipe2(OFlag::O_CLOEXEC)
            .map_err(std::io::Error::from)
            .map_err(Error::io(format!("cannot create a pipe for {role}'s output")))?;
        let stderr = output_tx.try_clone().map_err(Error::io(format!("cannot create a pipe for {role}'s output")))?;
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(output_rx)
            .map_err(Error::io(format!("cannot read {role}'s output")))?;
        let mut command = tokio::process::Command::new(program);
        command.args(args).stdin(Stdio::null()).stdout(output_tx).stderr(stderr);
        if !inherit.is_empty() {
            // The closure sees plain numbers; `inherit` keeps the fds open until `spawn` has returned.
            let sources: Vec<RawFd> = inherit.iter().map(|fd| fd.as_raw_fd()).collect();
            let mut staged = vec![0; sources.len()];
            // SAFETY: the closure runs in the child between fork and exec, and only calls fcntl and dup2, which
            // are async-signal-safe; it allocates nothing (both Vecs were built before the fork).
            unsafe {
                command.pre_exec(move || dup_for_exec(&sources, &mut staged, first_fd));
            }
        }
        // SAFETY: the closure runs in the child between fork and exec and only calls umask, which is
        // async-signal-safe. The shim keeps umask 077 for its own files; the VMM and its helpers create files
        // for the guest (9p, virtiofsd), which must keep the modes the guest asked for.
        unsafe {
            command.pre_exec(|| {
                nix::libc::umask(0o022);
                Ok(())
            });
        }
        if no_huge_pages {
            // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which is
            // async-signal-safe; the setting survives exec.
            unsafe {
                command.pre_exec(|| {
                    if nix::libc::prctl(nix::libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let spawned = command.spawn();
        // The command holds our copies of the pipe's write end: only the child may keep one, or the reader never
        // sees end of file.
        drop(command);
        let mut child = spawned.map_err(|source| Error::Spawn { role, program: program.to_owned(), source })?;
        let pid = child.id().ok_or_else(|| Error::Io {
            context: format!("{role} exited before its PID could be read"),
            source: std::io::Error::other("no pid"),
        })?;
        let mut argv = vec![program.to_string_lossy().into_owned()];
        argv.extend(args.iter().cloned());
        let info = VmProcess { role, pid, argv, start_time: proc_start_time(pid) };

        let output = ProcessOutput::default();
        console::drain(receiver, output.ring.clone(), format!("{role}'s output"));
        log_output(&output, role, pid);

        let (exit_tx, exit_rx) = watch::channel(None);
        let (signal_tx, mut signal_rx) = mpsc::unbounded_channel::<Signal>();
        let nix_pid = Pid::from_raw(pid as i32);
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    signal = signal_rx.recv() => match signal {
                        // Not yet reaped by us, so `pid` is still this child (at worst a zombie).
                        Some(signal) => { let _ = kill(nix_pid, signal); }
                        // The handle is gone but the process is not ended with it: keep reaping it.
                        None => break child.wait().await,
                    },
                }
            };
            let exit = status.map(VmExit::from).unwrap_or(VmExit { code: None, signal: None });
            tracing::debug!(%role, pid, %exit, "VM process exited");
            let _ = exit_tx.send(Some(exit));
        });
        tracing::debug!(%role, pid, "VM process started");
        Ok(Self { info, output, exit: exit_rx, signals: signal_tx })
    }

    pub(crate) fn info(&self) -> &VmProcess {
        &self.info
    }

    pub(crate) fn role(&self) -> ProcessRole {
        self.info.role
    }

    pub(crate) fn output(&self) -> &ProcessOutput {
        &self.output
    }

    /// `Some` once the process has exited and been reaped.
    pub(crate) fn exited(&self) -> Option<VmExit> {
        *self.exit.borrow()
    }

    /// A receiver that turns `Some` when the process exits.
    pub(crate) fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }

    pub(crate) async fn wait(&self) -> VmExit {
        wait_exit(self.exit.clone()).await
    }

    /// Waits at most `timeout` for the exit.
    pub(crate) async fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }

    pub(crate) fn signal(&self, signal: Signal) {
        // A closed channel means the reaper already finished: nothing left to signal.
        let _ = self.signals.send(signal);
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once reaped.
    pub(crate) async fn terminate(&self, grace: Duration) -> VmExit {
        if let Some(exit) = self.exited() {
            return exit;
        }
        self.signal(Signal::SIGTERM);
        if let Some(exit) = self.wait_timeout(grace).await {
            return exit;
        }
        self.kill().await
    }

    /// SIGKILL; returns once reaped.
    pub(crate) async fn kill(&self) -> VmExit {
        if let Some(exit) = self.exited() {
            return exit;
        }
        self.signal(Signal::SIGKILL);
        self.wait().await
    }
}

/// Passes a process's output on to `tracing` (debug level) at a bounded rate, until the process is gone.
fn log_output(output: &ProcessOutput, role: ProcessRole, pid: u32) {
    let mut follower = output.follow(RateLimit::default());
    tokio::spawn(async move {
        while let Some(event) = follower.next().await {
            match event {
                ConsoleEvent::Line(line) => tracing::debug!(%role, pid, "{line}"),
                ConsoleEvent::Dropped(n) => tracing::debug!(%role, pid, "{n} lines of output not logged"),
            }
        }
    });
}

/// In a forked child before exec: makes `sources[i]` available as fd `first + i` without close-on-exec.
///
/// Changing the flag in the parent instead would leak the fds into every other child it forks meanwhile. Each
/// source is first copied above the target range (`F_DUPFD_CLOEXEC` takes the lowest free number at or above
/// it), so moving one into place can never overwrite another that still has to move, whatever their numbers.
/// `staged` (as long as `sources`) is scratch space allocated before the fork.
fn dup_for_exec(sources: &[RawFd], staged: &mut [RawFd], first: RawFd) -> std::io::Result<()> {
    let above = first + sources.len() as RawFd;
    for (slot, &source) in staged.iter_mut().zip(sources) {
        *slot = fcntl(source, FcntlArg::F_DUPFD_CLOEXEC(above))?;
    }
    for (i, &fd) in staged.iter().enumerate() {
        // dup2 clears close-on-exec on the new fd; the staged copy still closes at exec.
        dup2(fd, first + i as RawFd)?;
    }
    Ok(())
}

pub(crate) async fn wait_exit(mut exit: watch::Receiver<Option<VmExit>>) -> VmExit {
    let unknown = VmExit { code: None, signal: None };
    // The reaper only drops its sender after publishing, or when the runtime shuts down.
    let published = exit.wait_for(Option::is_some).await.map(|exit| *exit).ok().flatten();
    published.or_else(|| *exit.borrow()).unwrap_or(unknown)
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot.
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

fn proc_argv(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut argv: Vec<String> = raw.split(|&b| b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect();
    if argv.last().is_some_and(String::is_empty) {
        argv.pop();
    }
    Some(argv)
}

/// Whether `pid` exists and is not a zombie (a zombie is dead; its parent reaps it). Not necessarily our child.
pub fn pid_alive(pid: u32) -> bool {
    !matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

impl VmProcess {
    /// Whether this process still runs and is still the one we started, not a newcomer that got its PID.
    pub fn is_running(&self) -> bool {
        pid_alive(self.pid) && still_ours(self)
    }
}

/// Whether `process` is still the process we started, not a newcomer that got its PID.
fn still_ours(process: &VmProcess) -> bool {
    let Some(argv) = proc_argv(process.pid) else {
        return false;
    };
    if argv != process.argv {
        return false;
    }
    match process.start_time {
        Some(start) => proc_start_time(process.pid) == Some(start),
        None => true,
    }
}

/// What [`cleanup_vm`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Processes that were still ours and got SIGKILL.
    pub killed: Vec<u32>,
    /// PIDs that were gone or now belong to someone else, left alone.
    pub skipped: Vec<u32>,
    /// Processes that were still there after the kill (e.g. stuck in uninterruptible sleep).
    pub survivors: Vec<u32>,
}

/// Cleans up after a VM whose owner died: kills the persisted processes that are still ours (the VMM first, then
/// its helpers) and removes `work_dir`. Processes whose command line no longer matches are left alone.
pub async fn cleanup_vm(processes: &[VmProcess], work_dir: &Path) -> Result<CleanupReport> {
    let mut ordered: Vec<&VmProcess> = processes.iter().collect();
    ordered.sort_by_key(|p| p.role != ProcessRole::Vmm);
    let mut report = CleanupReport::default();
    for process in ordered {
        if !still_ours(process) {
            report.skipped.push(process.pid);
            continue;
        }
        let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
        if wait_gone(process.pid, Duration::from_secs(5)).await {
            report.killed.push(process.pid);
        } else {
            report.survivors.push(process.pid);
        }
    }
    match std::fs::remove_dir_all(work_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Io { context: format!("cannot remove {}", work_dir.display()), source: e }),
    }
    Ok(report)
}

/// Waits up to `timeout` (for ever with `None`) for `process`, which is not our child, to exit; true once it has.
/// Woken by a pidfd the moment it exits (a zombie counts: its parent reaps it, not us); where pidfds are missing
/// (Linux before 5.3), by looking every `poll`.
pub async fn wait_for_exit(process: &VmProcess, timeout: Option<Duration>, poll: Duration) -> bool {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    if let Some(pidfd) = open_pidfd(process) {
        let exited = pidfd.readable();
        return match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, exited).await.is_ok(),
            None => exited.await.is_ok(),
        };
    }
    loop {
        if !process.is_running() {
            return true;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return false;
        }
        tokio::time::sleep(poll).await;
    }
}

/// A pidfd for `process`, checked after opening to still be the process started (so a reused PID is never
/// waited for); `None` when it is gone or pidfds are not available.
fn open_pidfd(process: &VmProcess) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, process.pid as nix::libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    if !process.is_running() {
        return None;
    }
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same fd until the AsyncFd is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// Waits until `pid` is gone or a zombie (a zombie is dead; its parent, not us, reaps it).
async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !pid_alive(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    /// Runs `script` under `/bin/sh` in `dir` and returns its output once it exited and all of it was read.
    async fn run_sh(dir: &Path, script: &str, inherit: &[Arc<OwnedFd>], first_fd: RawFd) -> (VmExit, ProcessOutput) {
        let child = ManagedChild::spawn(
            ProcessRole::Vmm,
            Path::new("/bin/sh"),
            &["-c".into(), format!("cd {} && {script}", dir.display())],
            inherit,
            first_fd,
            false,
        )
        .expect("spawn sh");
        let exit = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("sh exits");
        let output = child.output().clone();
        tokio::time::timeout(Duration::from_secs(10), output.closed()).await.expect("output ends");
        (exit, output)
    }

    #[tokio::test]
    async fn output_of_a_process_that_writes_without_end_stays_bounded_and_outlives_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        // About 7 MB of lines on stdout, 8 MB without a newline, then last words on stderr. A reader that fell
        // behind would stall the writer on a full pipe; the timeout in run_sh catches that.
        let script = "seq 1 1000000; head -c 8000000 /dev/zero | tr '\\0' x; echo; echo 'last words' >&2; exit 4";
        let (exit, output) = run_sh(dir.path(), script, &[], 3).await;
        assert_eq!(exit.code, Some(4));
        let (lines, bytes) = output.ring.held();
        assert!(lines <= console::MAX_LINES, "{lines} lines kept");
        assert!(bytes <= console::MAX_BYTES, "{bytes} bytes kept");
        let tail = output.tail(3);
        let expected_long = format!("{}{}", "x".repeat(console::MAX_LINE_BYTES), console::TRUNCATED_MARK);
        assert_eq!(tail, format!("1000000\n{expected_long}\nlast words"));
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0, "nothing was written to a file");

        let (_, silent) = run_sh(dir.path(), "true", &[], 3).await;
        assert_eq!(silent.tail(5), NO_PROCESS_OUTPUT);
    }

    #[test]
    fn exit_display() {
        assert_eq!(VmExit { code: Some(1), signal: None }.to_string(), "exit code 1");
        assert_eq!(VmExit { code: None, signal: Some(9) }.to_string(), "killed by SIGKILL");
    }

    #[tokio::test]
    async fn managed_child_is_killed_and_reaped() {
        let child =
            ManagedChild::spawn(ProcessRole::VsockDaemon, Path::new("/bin/sleep"), &["30".into()], &[], 3, false)
                .expect("spawn sleep");
        assert_eq!(child.info().argv, ["/bin/sleep", "30"]);
        assert!(child.info().start_time.is_some());
        assert!(child.exited().is_none());
        let exit = child.terminate(Duration::from_secs(2)).await;
        assert_eq!(exit.signal, Some(libc_sigterm()));
        assert!(proc_state(child.info().pid).is_none(), "child must be reaped");
    }

    #[tokio::test]
    async fn inherited_fds_reach_the_child_at_their_numbers_and_stay_cloexec_here() {
        use nix::fcntl::FdFlag;
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |name: &str, text: &str| -> Arc<OwnedFd> {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            Arc::new(File::open(&path).expect("open").into())
        };
        let a = open("a", "first");
        let b = open("b", "second");
        // Target range starts at b's own number: moving a into place first would clobber b if done naively.
        // (dash redirects only single-digit fds, hence /proc/self/fd.)
        let first = b.as_raw_fd();
        let script =
            format!("cat /proc/self/fd/{first}; echo; cat /proc/self/fd/{}; echo; ls -l /proc/self/fd", first + 1);
        let (exit, output) = run_sh(dir.path(), &script, &[a.clone(), b.clone()], first).await;
        let out = output.tail(console::MAX_LINES);
        assert!(exit.success(), "{exit}: {out}");
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("first"), "{out}");
        assert_eq!(lines.next(), Some("second"), "{out}");
        // Exactly the two target fds refer to the files: the staged copies closed at exec.
        let mut holding: Vec<(i32, String)> = lines
            .filter_map(|l| l.split_once(" -> "))
            .filter(|(_, target)| [dir.path().join("a"), dir.path().join("b")].iter().any(|p| Path::new(target) == p))
            .map(|(left, target)| {
                let fd = left.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("fd number");
                (fd, target.rsplit('/').next().unwrap_or_default().to_owned())
            })
            .collect();
        holding.sort();
        assert_eq!(holding, [(first, "a".to_owned()), (first + 1, "b".to_owned())], "{out}");
        for fd in [&a, &b] {
            let flags = FdFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD).expect("F_GETFD"));
            assert!(flags.contains(FdFlag::FD_CLOEXEC), "the parent's copy lost FD_CLOEXEC");
        }
    }

    /// A process as another process would persist it (by PID, argv and start time), once it has exec'd.
    fn adopted(child: &std::process::Child, argv: &[&str]) -> VmProcess {
        let pid = child.id();
        let process = VmProcess {
            role: ProcessRole::Vmm,
            pid,
            argv: argv.iter().map(|a| a.to_string()).collect(),
            start_time: proc_start_time(pid),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !process.is_running() {
            assert!(std::time::Instant::now() < deadline, "{argv:?} never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        process
    }

    #[tokio::test]
    async fn the_exit_of_a_process_we_do_not_reap_is_seen_at_once() {
        let mut child = std::process::Command::new("/bin/sleep").arg("0.3").spawn().expect("sleep");
        let process = adopted(&child, &["/bin/sleep", "0.3"]);
        let started = std::time::Instant::now();
        assert!(wait_for_exit(&process, Some(Duration::from_secs(10)), Duration::from_secs(5)).await);
        // Woken by the exit (a zombie until reaped below), not by the 5 s poll.
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let _ = child.wait();

        let mut long = std::process::Command::new("/bin/sleep").arg("30").spawn().expect("sleep");
        let process = adopted(&long, &["/bin/sleep", "30"]);
        assert!(!wait_for_exit(&process, Some(Duration::from_millis(100)), Duration::from_millis(20)).await);
        let _ = long.kill();
        let _ = long.wait();
        assert!(wait_for_exit(&process, Some(Duration::from_millis(100)), Duration::from_millis(20)).await, "gone");
    }

    #[tokio::test]
    async fn a_dropped_managed_child_keeps_running_and_is_still_reaped() {
        let child =
            ManagedChild::spawn(ProcessRole::Virtiofsd, Path::new("/bin/sleep"), &["0.5".into()], &[], 3, false)
                .expect("spawn sleep");
        let info = child.info().clone();
        let exit = child.exit_watch();
        drop(child);
        assert!(info.is_running(), "a VM process outlives its handle");
        let exit = tokio::time::timeout(Duration::from_secs(10), wait_exit(exit)).await.expect("sleep exits");
        assert_eq!(exit.code, Some(0));
        assert!(proc_state(info.pid).is_none(), "reaped, not left a zombie");
        assert!(!info.is_running());
    }

    #[tokio::test]
    async fn cleanup_kills_only_matching_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("vm");
        std::fs::create_dir(&work).expect("mkdir");
        std::fs::write(work.join("console.log"), "x").expect("write");

        let mut ours = spawn_sleep("30");
        let mut stranger = spawn_sleep("31");
        let persisted = [
            VmProcess {
                role: ProcessRole::Vmm,
                pid: ours.id(),
                argv: vec!["/bin/sleep".into(), "30".into()],
                start_time: proc_start_time(ours.id()),
            },
            // Same PID as a live process, but it is not what we started: pid reuse.
            VmProcess {
                role: ProcessRole::Virtiofsd,
                pid: stranger.id(),
                argv: vec!["/usr/libexec/virtiofsd".into()],
                start_time: None,
            },
        ];
        let report = cleanup_vm(&persisted, &work).await.expect("cleanup");
        assert_eq!(report.killed, [ours.id()]);
        assert_eq!(report.skipped, [stranger.id()]);
        assert!(!work.exists());
        assert!(ours.wait().expect("reap").code().is_none(), "ours was killed");
        assert!(stranger.try_wait().expect("try_wait").is_none(), "the stranger still runs");
        stranger.kill().expect("kill stranger");
        stranger.wait().expect("reap stranger");
    }

    /// `/bin/sleep <secs>`, returned once its command line shows it. `spawn` returns when the vfork'ed child
    /// has started exec, but the kernel sets the new argv range a moment later: until then
    /// /proc/<pid>/cmdline is empty and the process would not (yet) be recognised as ours.
    fn spawn_sleep(secs: &str) -> std::process::Child {
        let child = std::process::Command::new("/bin/sleep").arg(secs).spawn().expect("spawn");
        let want = vec!["/bin/sleep".to_string(), secs.to_string()];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while proc_argv(child.id()).as_ref() != Some(&want) {
            assert!(std::time::Instant::now() < deadline, "sleep {secs} never showed its argv");
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    fn libc_sigterm() -> i32 {
        Signal::SIGTERM as i32
    }
}
