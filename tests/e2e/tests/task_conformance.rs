//! What containerd's Task API clients expect of a runtime, checked side by side with runc on one private
//! containerd (issue #13): stdin that survives a client detaching and attaching again, `/dev/null` as the stdin
//! of a process started without one, exec ids used again after delete, `Pids` with the task's own pid, and a
//! terminal-less `ResizePty` ignored. Every check runs against runc first, which proves the expectation, then
//! against kata-rs.
//!
//! Needs root, containerd, runc and the parts `scripts/test.sh` exports; skips with the reason otherwise.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use e2e::checks::{poll, Checks};
use e2e::kata::{kata_parts, KATA_RUNTIME};
use e2e::{unique_id, Containerd, ContainerdOptions, OciImage, BUSYBOX_IMAGE};

const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// A VM boot under TCG takes seconds; leave room for a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(180);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Starts a ctr command with a stdin pipe the test holds, so ctr never reads end of file and never sends
/// CloseIO: what a client that detaches does.
fn spawn_holding_stdin(containerd: &Containerd, args: &[&str]) -> (Child, std::process::ChildStdin) {
    let mut child = containerd
        .ctr_command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ctr");
    let stdin = child.stdin.take().expect("stdin pipe");
    (child, stdin)
}

/// Waits for a detached ctr (`run -d`, `task exec -d`) to return.
fn wait_detached(mut child: Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    match e2e::process::wait_until(&mut child, deadline).expect("wait ctr") {
        Some(status) if status.success() => Ok(()),
        Some(status) => {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            Err(format!("{what}: {status}: {err}"))
        }
        None => {
            e2e::process::kill_and_reap(&mut child);
            Err(format!("{what}: ctr did not return"))
        }
    }
}

/// The FIFO ctr made for process `id` under `dir` (`<dir>/<random>/<id>-<stream>`).
fn fifo(dir: &Path, id: &str, stream: &str) -> Option<PathBuf> {
    let name = format!("{id}-{stream}");
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path().join(&name)).find(|p| p.exists())
}

/// A client attaching to stdin: opens the FIFO without waiting (fails when nobody reads it any more), writes,
/// closes: the detach.
fn attach_and_write(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("open {} for writing: {e}", path.display()))?;
    f.write_all(data).map_err(|e| format!("write {}: {e}", path.display()))
}

/// Reads the output FIFO until it holds `want` or the timeout passes; returns what was read.
fn read_until(path: &Path, want: &str, timeout: Duration) -> String {
    let mut f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) => return format!("<cannot open {}: {e}>", path.display()),
    };
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !text(&got).contains(want) {
        match f.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    text(&got)
}

/// stdin of a task and of an exec: written, detached, attached again and written again, the process gets both.
fn check_reattach(containerd: &Containerd, runtime: &str, checks: &mut Checks) {
    let fifo_dir = tempfile::tempdir().expect("fifo dir");
    let dir = fifo_dir.path().to_str().expect("utf-8").to_string();
    let id = unique_id("reattach");
    let (child, held) = spawn_holding_stdin(
        containerd,
        &["run", "-d", "--runtime", runtime, "--fifo-dir", &dir, BUSYBOX_IMAGE, &id, "cat"],
    );
    let started = wait_detached(child, "ctr run -d");
    drop(held);
    if let Err(e) = started {
        checks.check("task stdin survives a detach", false, || e);
        return;
    }
    for (process, detached) in [(id.clone(), None), ("reexec".to_string(), Some(()))] {
        let name = if detached.is_none() { "task stdin survives a detach" } else { "exec stdin survives a detach" };
        if detached.is_some() {
            let (child, held) = spawn_holding_stdin(
                containerd,
                &["task", "exec", "-d", "--fifo-dir", &dir, "--exec-id", &process, &id, "cat"],
            );
            let started = wait_detached(child, "ctr task exec -d");
            drop(held);
            if let Err(e) = started {
                checks.check(name, false, || e);
                continue;
            }
        }
        let (Some(stdin), Some(stdout)) =
            (fifo(fifo_dir.path(), &process, "stdin"), fifo(fifo_dir.path(), &process, "stdout"))
        else {
            checks.check(name, false, || format!("no FIFOs for {process} under {dir}"));
            continue;
        };
        let first = attach_and_write(&stdin, b"hello\n");
        let seen = read_until(&stdout, "hello\n", Duration::from_secs(60));
        let second = attach_and_write(&stdin, b"hello\n");
        let seen = seen + &read_until(&stdout, "hello\n", Duration::from_secs(60));
        checks.check(name, first.is_ok() && second.is_ok() && seen == "hello\nhello\n", || {
            format!("{runtime}: writes {first:?} then {second:?}; the process echoed {seen:?}")
        });
    }
    let _ = containerd.ctr(["task", "kill", "-s", "SIGKILL", &id]);
    let _ = poll(TIMEOUT, || containerd.ctr(["task", "delete", &id]).ok().filter(|o| o.status.success()));
    let _ = containerd.ctr(["container", "rm", &id]);
}

/// A task started without stdin (`--null-io`) reads /dev/null: `cat` ends at once.
fn check_null_stdin(containerd: &Containerd, runtime: &str, checks: &mut Checks) {
    let id = unique_id("nullio");
    let script = r#"[ "$(readlink /proc/self/fd/0)" = /dev/null ] || exit 9; cat; echo done > /dev/null"#;
    let out = containerd
        .ctr_with_timeout(
            ["run", "--rm", "--null-io", "--runtime", runtime, BUSYBOX_IMAGE, &id, "sh", "-c", script],
            TIMEOUT,
        )
        .expect("ctr run");
    checks.check("a task without stdin reads /dev/null", out.status.code() == Some(0), || {
        format!("{runtime}: {:?}: {}", out.status, text(&out.stderr))
    });
}

/// Runs a detached `sleep`-style task for the checks that need one running; returns its id.
fn run_detached(containerd: &Containerd, runtime: &str, prefix: &str, cmd: &[&str]) -> String {
    let id = unique_id(prefix);
    let mut args = vec!["run", "-d", "--null-io", "--runtime", runtime, BUSYBOX_IMAGE, &id];
    args.extend_from_slice(cmd);
    let out = containerd.ctr_with_timeout(args, TIMEOUT).expect("ctr run -d");
    assert!(out.status.success(), "{runtime}: ctr run -d: {}\n{}", text(&out.stderr), containerd.log_tail(40));
    id
}

/// An exec id can be used again once its process exited and was deleted (`ctr task exec` deletes it).
fn check_exec_id_reuse(containerd: &Containerd, runtime: &str, id: &str, checks: &mut Checks) {
    let mut outputs = Vec::new();
    for word in ["one", "two"] {
        let out = containerd
            .ctr_with_timeout(["task", "exec", "--exec-id", "same", id, "echo", word], TIMEOUT)
            .expect("ctr task exec");
        outputs.push((out.status.code(), text(&out.stdout), text(&out.stderr)));
    }
    let ok = outputs.iter().zip(["one\n", "two\n"]).all(|((code, out, _), want)| *code == Some(0) && out == want);
    checks.check("an exec id is free again after its exec was deleted", ok, || format!("{runtime}: {outputs:?}"));
}

/// `ctr task ps` lists every process of the container, the task's own pid among them.
fn check_pids(containerd: &Containerd, runtime: &str, id: &str, checks: &mut Checks) {
    let ls = containerd.ctr_ok(["task", "ls"]).expect("ctr task ls");
    let task_pid = ls
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    let ps = containerd.ctr_ok(["task", "ps", id]).expect("ctr task ps");
    let pids: Vec<&str> = ps.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    checks.check(
        "Pids lists every process, the task's pid among them",
        pids.len() == 2 && pids.contains(&task_pid.as_str()),
        || format!("{runtime}: task pid {task_pid}, ctr task ps:\n{ps}"),
    );
}

fn check_runtime(containerd: &Containerd, runtime: &str, checks: &mut Checks) {
    check_null_stdin(containerd, runtime, checks);
    check_reattach(containerd, runtime, checks);
    // Two processes: the init and a child it keeps.
    let id = run_detached(containerd, runtime, "pids", &["sh", "-c", "sleep 300 & exec sleep 301"]);
    check_exec_id_reuse(containerd, runtime, &id, checks);
    let pids_ready = poll(Duration::from_secs(30), || {
        let ps = containerd.ctr_ok(["task", "ps", &id]).ok()?;
        (ps.lines().count() >= 3).then_some(())
    });
    if pids_ready.is_none() {
        eprintln!("{runtime}: the child did not show up in ctr task ps within 30 s");
    }
    check_pids(containerd, runtime, &id, checks);
    let _ = containerd.ctr(["task", "kill", "-s", "SIGKILL", &id]);
    let _ = poll(TIMEOUT, || containerd.ctr(["task", "delete", &id]).ok().filter(|o| o.status.success()));
    let _ = containerd.ctr(["container", "rm", &id]);
}

#[test]
fn task_api_behaves_as_with_runc() {
    let parts = testutil::skip_unless!(kata_parts());
    let conf = tempfile::tempdir().expect("temp dir");
    let conf_file = conf.path().join("configuration.toml");
    std::fs::write(&conf_file, parts.configuration("")).expect("write configuration");
    let containerd = Containerd::start(ContainerdOptions {
        shim_dir: Some(parts.shim_dir.clone()),
        env: vec![("KATA_CONF_FILE".into(), conf_file.display().to_string())],
        ctr_timeout: TIMEOUT,
        ..Default::default()
    })
    .expect("containerd starts");
    containerd.import(&OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image")).expect("import busybox");

    let mut runc = Checks::default();
    check_runtime(&containerd, RUNC_RUNTIME, &mut runc);
    runc.finish();
    let mut kata = Checks::default();
    check_runtime(&containerd, KATA_RUNTIME, &mut kata);
    kata.finish();
    e2e::kata::assert_clean_shutdown(containerd);
}
