//! The CRI streaming checks the runc and kata tests share: `Exec` with stdin, with a tty (resize, exit
//! code) and with separate stderr, and `Attach` to a container's main process, each through the streaming
//! server's websocket as `crictl exec -it` and `crictl attach` use it.

use std::time::{Duration, Instant};

use k8s_cri::v1::ContainerState;

use super::{ContainerSpec, CriClient, StreamSession, StreamStatus, Streams};
use crate::checks::{poll, Checks};

/// A container for [`check_streaming`]'s attach: `sh` reading commands from its stdin, no tty.
pub fn attach_target(name: &str, image: &str) -> ContainerSpec {
    ContainerSpec {
        stdin: true,
        ..ContainerSpec::new(name, image, &["sh"])
    }
}

/// Streams through `Exec` in the running container `exec_in` and `Attach` to `attach_to` (made from
/// [`attach_target`], still running; it has exited when this returns). Every read waits at most
/// `timeout`.
pub fn check_streaming(
    cri: &CriClient,
    exec_in: &str,
    attach_to: &str,
    timeout: Duration,
    checks: &mut Checks,
) {
    exec_with_stdin(cri, exec_in, timeout, checks);
    exec_with_separate_stderr(cri, exec_in, timeout, checks);
    exec_with_tty(cri, exec_in, timeout, checks);
    attach(cri, attach_to, timeout, checks);
}

/// `Exec` then connect to its URL.
fn open_exec(
    cri: &CriClient,
    id: &str,
    cmd: &[&str],
    streams: Streams,
) -> Result<StreamSession, String> {
    let url = cri
        .exec(id, cmd, streams)
        .map_err(|e| format!("Exec {cmd:?}: {e}"))?;
    StreamSession::connect(&url).map_err(|e| format!("connect to {url}: {e}"))
}

fn exec_with_stdin(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    let streams = Streams {
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let result =
        open_exec(cri, id, &["sh", "-c", "read l; echo got:$l"], streams).and_then(|mut s| {
            s.send_stdin(b"hello-stream\n")
                .map_err(|e| format!("send stdin: {e}"))?;
            let end = s
                .wait_end(timeout)
                .map_err(|e| format!("read: {e}; {}", s.describe()))?;
            Ok((s.stdout(), s.stderr(), end))
        });
    checks.check(
        "streaming Exec without tty passes a stdin line to the process and its stdout back",
        result.as_ref().is_ok_and(|(out, _, end)| {
            out == "got:hello-stream\n" && *end == Some(StreamStatus::Exited(0))
        }),
        || {
            let want = "stdout \"got:hello-stream\\n\" and exit code 0";
            format!("expected {want} within {timeout:?}; got {result:?}")
        },
    );
}

fn exec_with_separate_stderr(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    let streams = Streams {
        stdin: false,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    let result = open_exec(cri, id, &cmd, streams).and_then(|mut s| {
        let end = s
            .wait_end(timeout)
            .map_err(|e| format!("read: {e}; {}", s.describe()))?;
        Ok((s.stdout(), s.stderr(), end))
    });
    checks.check(
        "streaming Exec keeps stderr apart from stdout and reports exit code 3",
        result.as_ref().is_ok_and(|(out, err, end)| {
            out == "out\n" && err == "err\n" && *end == Some(StreamStatus::Exited(3))
        }),
        || {
            let want = "stdout \"out\\n\", stderr \"err\\n\" and exit code 3";
            format!("expected {want} within {timeout:?}; got {result:?}")
        },
    );
}

fn exec_with_tty(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    let streams = Streams {
        stdin: true,
        stdout: true,
        stderr: false,
        tty: true,
    };
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
    let resized = session
        .resize(100, 40)
        .map_err(|e| e.to_string())
        .and_then(|()| loop {
            session
                .send_stdin(b"stty size\n")
                .map_err(|e| e.to_string())?;
            let seen = session
                .read_until(Duration::from_secs(2), |s| s.stdout().contains("40 100"))
                .map_err(|e| e.to_string())?;
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
        || {
            format!(
                "expected \"40 100\" within {timeout:?}: {resized:?}; {}",
                session.describe()
            )
        },
    );
    let end = session
        .send_stdin(b"exit 7\n")
        .and_then(|()| session.wait_end(timeout));
    checks.check(
        "streaming Exec with a tty: `exit 7` ends the stream with exit code 7",
        matches!(end, Ok(Some(StreamStatus::Exited(7)))),
        || {
            format!(
                "expected exit code 7 within {timeout:?}; got {end:?}; {}",
                session.describe()
            )
        },
    );
}

fn attach(cri: &CriClient, id: &str, timeout: Duration, checks: &mut Checks) {
    let streams = Streams {
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let session = cri
        .attach(id, streams)
        .map_err(|e| format!("Attach: {e}"))
        .and_then(|url| StreamSession::connect(&url).map_err(|e| format!("connect to {url}: {e}")));
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            checks.check("streaming Attach connects", false, || e);
            return;
        }
    };
    let echoed = session
        .send_stdin(b"echo attached\n")
        .and_then(|()| session.read_until(timeout, |s| s.stdout().contains("attached\n")));
    checks.check(
        "streaming Attach: a command sent to the main process's stdin answers on stdout",
        matches!(echoed, Ok(true)),
        || {
            format!(
                "expected stdout \"attached\\n\" within {timeout:?}: {echoed:?}; {}",
                session.describe()
            )
        },
    );
    let end = session
        .send_stdin(b"exit 5\n")
        .and_then(|()| session.wait_end(timeout));
    // containerd ends an attach with status Success whatever the exit code: that comes from
    // ContainerStatus below.
    checks.check(
        "streaming Attach ends when the main process exits",
        matches!(end, Ok(Some(_))) && session.is_closed(),
        || {
            format!(
                "expected a final status and a close within {timeout:?}; got {end:?}; {}",
                session.describe()
            )
        },
    );
    let mut last = None;
    let exited = poll(timeout, || {
        let status = cri.container_status(id);
        let done = status
            .as_ref()
            .is_ok_and(|s| s.state == ContainerState::ContainerExited as i32);
        last = Some(status);
        done.then_some(())
    });
    checks.check(
        "the attached container is reported exited with code 5",
        exited.is_some()
            && last
                .as_ref()
                .is_some_and(|s| s.as_ref().is_ok_and(|s| s.exit_code == 5)),
        || {
            format!(
                "expected CONTAINER_EXITED with exit code 5 within {timeout:?}; last \
                 ContainerStatus {last:?}"
            )
        },
    );
}
