//! The CRI streaming checks the runc and kata tests share ([`check_exec_streams`], [`check_attach`]):
//! `Exec` with stdin, with a tty (resize, exit code) and with separate stderr, and `Attach` to a
//! container's main process with and without a tty, each through the streaming server's websocket as
//! `crictl exec -it` and `crictl attach` use it.

use std::time::{Duration, Instant};

use k8s_cri::v1::ContainerState;

use super::{ContainerSpec, CriClient, StreamSession, StreamStatus, Streams};
use crate::checks::{error_chain, poll, Checks};

/// A container for [`check_attach`]: `sh` reading commands from its stdin, on a
/// terminal if `tty`.
pub fn attach_target(name: &str, image: &str, tty: bool) -> ContainerSpec {
    ContainerSpec { stdin: true, tty, ..ContainerSpec::new(name, image, &["sh"]) }
}

/// Streams through `Exec` in the running container `id`: stdin, stderr apart, a tty. Every read waits
/// at most `timeout`.
pub fn check_exec_streams(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    exec_with_stdin(cri, id, timeout, checks);
    exec_with_separate_stderr(cri, id, timeout, checks);
    exec_with_tty(cri, id, timeout, checks);
}

/// `Exec` then connect to its URL.
fn open_exec(cri: &CriClient, id: &str, cmd: &[&str], streams: Streams) -> Result<StreamSession, String> {
    let url = cri.exec(id, cmd, streams).map_err(|e| format!("Exec {cmd:?}: {}", error_chain(&e)))?;
    StreamSession::connect(&url).map_err(|e| format!("connect to {url}: {}", error_chain(&e)))
}

/// What a stream carried: stdout, stderr and the final status.
type Ended = (String, String, Option<StreamStatus>);

/// Runs `cmd` through a streaming `Exec`, sends `input` on its stdin if given and reads to the end.
fn exec_to_end(
    cri: &CriClient,
    id: &str,
    cmd: &[&str],
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Ended, String> {
    let streams = Streams { stdin: input.is_some(), stdout: true, stderr: true, tty: false };
    let mut s = open_exec(cri, id, cmd, streams)?;
    if let Some(input) = input {
        s.send_stdin(input).map_err(|e| format!("send stdin: {}", error_chain(&e)))?;
    }
    let end = s.wait_end(timeout).map_err(|e| format!("read: {}; {}", error_chain(&e), s.describe()))?;
    Ok((s.stdout(), s.stderr(), end))
}

fn exec_with_stdin(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    let cmd = ["sh", "-c", "read l; echo got:$l"];
    let result = exec_to_end(cri, id, &cmd, Some(b"hello-stream\n"), timeout);
    checks.check(
        "streaming Exec without tty passes a stdin line to the process and its stdout back",
        result.as_ref().is_ok_and(|(out, _, end)| out == "got:hello-stream\n" && *end == Some(StreamStatus::Exited(0))),
        || {
            let want = "stdout \"got:hello-stream\\n\" and exit code 0";
            format!("expected {want} within {timeout:?}; got {result:?}")
        },
    );
}

fn exec_with_separate_stderr(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    let result = exec_to_end(cri, id, &cmd, None, timeout);
    checks.check(
        "streaming Exec keeps stderr apart from stdout and reports exit code 3",
        result
            .as_ref()
            .is_ok_and(|(out, err, end)| out == "out\n" && err == "err\n" && *end == Some(StreamStatus::Exited(3))),
        || {
            let want = "stdout \"out\\n\", stderr \"err\\n\" and exit code 3";
            format!("expected {want} within {timeout:?}; got {result:?}")
        },
    );
}

fn exec_with_tty(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    let streams = Streams { stdin: true, stdout: true, stderr: false, tty: true };
    let mut session = match open_exec(cri, id, &["sh"], streams) {
        Ok(s) => s,
        Err(e) => {
            checks.check("streaming Exec with a tty starts", false, || e);
            return;
        }
    };
    // The resize travels apart from stdin (containerd -> shim ResizePty -> guest), so the shell may see
    // it after its first commands: poll the terminal's size until it has changed, asking again each time.
    let deadline = Instant::now() + timeout;
    let resized = session.resize(100, 40).map_err(|e| error_chain(&e)).and_then(|()| loop {
        session.send_stdin(b"stty size\n").map_err(|e| error_chain(&e))?;
        let seen = session
            .read_until(Duration::from_secs(2), |s| s.stdout().contains("40 100"))
            .map_err(|e| error_chain(&e))?;
        if seen {
            break Ok(());
        }
        if session.is_closed() || Instant::now() >= deadline {
            break Err("no \"40 100\"".to_owned());
        }
    });
    checks.check(
        "streaming Exec with a tty: a resize to 100x40 reaches the terminal (stty size)",
        resized.is_ok(),
        || format!("expected \"40 100\" within {timeout:?}: {resized:?}; {}", session.describe()),
    );
    let end = session.send_stdin(b"exit 7\n").and_then(|()| session.wait_end(timeout));
    checks.check(
        "streaming Exec with a tty: `exit 7` ends the stream with exit code 7",
        matches!(end, Ok(Some(StreamStatus::Exited(7)))),
        || format!("expected exit code 7 within {timeout:?}; got {end:?}; {}", session.describe()),
    );
}

/// Attaches to `sh` in the running container `id` (made from [`attach_target`] with the same `tty`), runs
/// a command and `exit 5`; the container has exited when this returns. Every read waits at most
/// `timeout`.
pub fn check_attach(cri: &CriClient, id: &str, tty: bool, timeout: Duration, checks: &mut Checks) {
    let streams = Streams { stdin: true, stdout: true, stderr: !tty, tty };
    let session = cri
        .attach(id, streams)
        .map_err(|e| format!("Attach: {}", error_chain(&e)))
        .and_then(|url| StreamSession::connect(&url).map_err(|e| format!("connect to {url}: {}", error_chain(&e))));
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            checks.check("streaming Attach connects", false, || format!("tty {tty}: {e}"));
            return;
        }
    };
    // A terminal echoes the command line: only the shell's arithmetic makes "attached-42".
    let echoed = session
        .send_stdin(b"echo attached-$((40+2))\n")
        .and_then(|()| session.read_until(timeout, |s| s.stdout().contains("attached-42")));
    checks.check(
        pick(
            tty,
            "streaming Attach: a command sent to the main process's stdin answers on stdout",
            "streaming Attach on a tty: a command sent to the main process answers",
        ),
        matches!(echoed, Ok(true)),
        || format!("tty {tty}: expected stdout \"attached-42\" within {timeout:?}: {echoed:?}; {}", session.describe()),
    );
    let end = session.send_stdin(b"exit 5\n").and_then(|()| session.wait_end(timeout));
    // containerd ends an attach with status Success whatever the exit code: that comes from
    // ContainerStatus below.
    checks.check(
        pick(
            tty,
            "streaming Attach ends when the main process exits",
            "streaming Attach on a tty ends when the main process exits",
        ),
        matches!(end, Ok(Some(_))) && session.is_closed(),
        || {
            format!(
                "tty {tty}: expected a final status and a close within {timeout:?}; got {end:?}; {}",
                session.describe()
            )
        },
    );
    let mut last = None;
    let exited = poll(timeout, || {
        let status = cri.container_status(id);
        let done = status.as_ref().is_ok_and(|s| s.state == ContainerState::ContainerExited as i32);
        last = Some(status);
        done.then_some(())
    });
    checks.check(
        pick(
            tty,
            "the attached container is reported exited with code 5",
            "the attached tty container is reported exited with code 5",
        ),
        exited.is_some() && last.as_ref().is_some_and(|s| s.as_ref().is_ok_and(|s| s.exit_code == 5)),
        || {
            format!(
                "tty {tty}: expected CONTAINER_EXITED with exit code 5 within {timeout:?}; last \
                 ContainerStatus {last:?}"
            )
        },
    );
}

/// The check name for the case at hand.
fn pick(tty: bool, without_tty: &'static str, with_tty: &'static str) -> &'static str {
    if tty {
        with_tty
    } else {
        without_tty
    }
}
