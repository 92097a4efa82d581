//! `ctr` against containerd with the kata-rs shim: every container runs in its own VM (QEMU under TCG here).
//! Needs root, containerd, and the parts `scripts/test.sh` exports (kernel, initrd, helper daemons, the shim);
//! skips with the reason when one is missing.

use std::process::Output;
use std::time::{Duration, Instant};

use e2e::kata::{kata_parts, sandbox_dir, KataParts, KATA_RUNTIME, KATA_RUN_RUNTIME};
use e2e::{unique_id, Containerd, ContainerdOptions, OciImage, RunOptions, BUSYBOX_IMAGE};

/// A VM boot under TCG takes seconds; leave room for a loaded machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

struct Kata {
    containerd: Containerd,
    parts: KataParts,
    _conf: tempfile::TempDir,
}

fn start(parts: KataParts) -> Kata {
    let conf = tempfile::tempdir().expect("temp dir");
    let conf_file = conf.path().join("configuration.toml");
    std::fs::write(&conf_file, parts.configuration("")).expect("write configuration");
    let containerd = Containerd::start(ContainerdOptions {
        shim_dir: Some(parts.shim_dir.clone()),
        env: vec![("KATA_CONF_FILE".into(), conf_file.display().to_string())],
        ctr_timeout: RUN_TIMEOUT,
        ..Default::default()
    })
    .expect("containerd starts");
    containerd.import(&OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image")).expect("import busybox");
    Kata { containerd, parts, _conf: conf }
}

fn run(k: &Kata, runtime: &str, id: &str, cmd: &[&str]) -> Output {
    let opts = RunOptions { timeout: RUN_TIMEOUT, ..RunOptions::runtime(runtime) };
    let started = Instant::now();
    let out = k.containerd.run(&opts, BUSYBOX_IMAGE, id, cmd).expect("ctr run");
    eprintln!("ctr run {cmd:?}: {:?} in {:?}", out.status, started.elapsed());
    out
}

fn run_detached(k: &Kata, id: &str, cmd: &[&str]) {
    let opts = RunOptions::detached(KATA_RUNTIME, RUN_TIMEOUT);
    let out = k.containerd.run(&opts, BUSYBOX_IMAGE, id, cmd).expect("ctr run -d");
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", text(&out.stderr), k.containerd.log_tail(40));
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ctr(k: &Kata, args: &[&str]) -> Output {
    k.containerd.ctr(args).expect("ctr runs")
}

fn ctr_ok(k: &Kata, args: &[&str]) -> String {
    let out = ctr(k, args);
    assert!(out.status.success(), "ctr {args:?} failed: {}\n{}", text(&out.stderr), k.containerd.log_tail(40));
    text(&out.stdout)
}

/// The task's STATUS column in `ctr task ls`.
fn task_status(k: &Kata, id: &str) -> Option<String> {
    let out = ctr_ok(k, &["task", "ls"]);
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .map(str::to_string)
}

fn wait_status(k: &Kata, id: &str, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = task_status(k, id);
        if status.as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} is {status:?}, expected {want}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn state_json(id: &str) -> serde_json::Value {
    let path = sandbox_dir(id).join("state.json");
    serde_json::from_slice(&std::fs::read(&path).expect("sandbox state exists")).expect("state is JSON")
}

fn assert_no_leaks(k: &Kata, ids: &[&str]) {
    e2e::kata::assert_no_leaks(&k.containerd, ids);
}

fn shutdown(k: Kata) {
    e2e::kata::assert_clean_shutdown(k.containerd);
}

#[test]
fn run_prints_output_guest_kernel_and_exit_codes() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let release = k.parts.kernel_release().expect("kernel has a version banner");
    let host = text(&std::process::Command::new("uname").arg("-r").output().expect("uname").stdout);

    let id = unique_id("uname");
    let out = run(&k, KATA_RUNTIME, &id, &["uname", "-r"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), k.containerd.log_tail(60));
    assert_eq!(text(&out.stdout).trim(), release, "the container must see the guest kernel");
    assert_ne!(release, host.trim());

    let echo = unique_id("echo");
    let out = run(&k, KATA_RUNTIME, &echo, &["echo", "hi"]);
    assert_eq!(text(&out.stdout), "hi\n", "stderr: {}", text(&out.stderr));

    let exit3 = unique_id("exit3");
    let out = run(&k, KATA_RUNTIME, &exit3, &["sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));

    let alias = unique_id("alias");
    let out = run(&k, KATA_RUN_RUNTIME, &alias, &["echo", "hi"]);
    assert_eq!(text(&out.stdout), "hi\n", "io.containerd.run.kata.v2: {}", text(&out.stderr));

    assert_no_leaks(&k, &[&id, &echo, &exit3, &alias]);
    shutdown(k);
}

#[test]
fn missing_binary_fails_fast_with_its_name() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let id = unique_id("nobin");
    let started = Instant::now();
    let out = run(&k, KATA_RUNTIME, &id, &["/no/such/binary"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/no/such/binary"), "stderr: {}", text(&out.stderr));
    eprintln!("failed in {:?}", started.elapsed());
    let _ = ctr(&k, &["container", "rm", &id]);
    assert_no_leaks(&k, &[&id]);
    shutdown(k);
}

#[test]
fn interactive_tty_shell() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let id = unique_id("tty");
    let opts = RunOptions { tty: true, timeout: RUN_TIMEOUT, ..RunOptions::runtime(KATA_RUNTIME) };
    let mut session = k.containerd.run_pty(&opts, BUSYBOX_IMAGE, &id, &["sh"]).expect("ctr run -t");
    session.send_line("echo $((6*7))").expect("type");
    session.expect_line("42", RUN_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", k.containerd.log_tail(60)));
    session.send_line("exit").expect("type");
    let status = session.wait(Duration::from_secs(60)).expect("ctr exits");
    assert!(status.success(), "{status:?}: {}", session.transcript());
    assert_no_leaks(&k, &[&id]);
    shutdown(k);
}

#[test]
fn task_exec_ps_metrics_pause_resume_kill_and_containerd_restart() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let id = unique_id("tasks");
    // PID 1 of a PID namespace only gets signals it handles: trap TERM so SIGTERM ends it with 143.
    run_detached(&k, &id, &["sh", "-c", "trap 'exit 143' TERM; while :; do sleep 1; done"]);
    wait_status(&k, &id, "RUNNING", RUN_TIMEOUT);

    let out = ctr_ok(&k, &["task", "exec", "--exec-id", "e1", &id, "sh", "-c", "echo from-exec; exit 0"]);
    assert_eq!(out, "from-exec\n");
    let out = ctr(&k, &["task", "exec", "--exec-id", "e2", &id, "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));

    let ps = ctr_ok(&k, &["task", "ps", &id]);
    assert!(ps.lines().count() >= 2, "ctr task ps shows the container's processes: {ps}");

    let metrics = ctr_ok(&k, &["task", "metrics", &id]);
    assert!(metrics.contains("memory"), "metrics: {metrics}");

    ctr_ok(&k, &["task", "pause", &id]);
    wait_status(&k, &id, "PAUSED", Duration::from_secs(30));
    ctr_ok(&k, &["task", "resume", &id]);
    wait_status(&k, &id, "RUNNING", Duration::from_secs(30));

    ctr_ok(&k, &["task", "kill", "-s", "SIGTERM", &id]);
    wait_status(&k, &id, "STOPPED", Duration::from_secs(60));
    assert_deleted_with_status(&k, &id, 143);
    ctr_ok(&k, &["container", "rm", &id]);

    let killed = unique_id("sigkill");
    run_detached(&k, &killed, &["sleep", "300"]);
    wait_status(&k, &killed, "RUNNING", RUN_TIMEOUT);
    // A containerd restart leaves the task running, and containerd reconnects to its shim.
    let mut k = k;
    k.containerd.restart().expect("containerd restarts");
    wait_status(&k, &killed, "RUNNING", Duration::from_secs(30));
    let out = ctr_ok(&k, &["task", "exec", "--exec-id", "after-restart", &killed, "echo", "still-here"]);
    assert_eq!(out, "still-here\n");
    ctr_ok(&k, &["task", "kill", "-s", "SIGKILL", &killed]);
    wait_status(&k, &killed, "STOPPED", Duration::from_secs(60));
    assert_deleted_with_status(&k, &killed, 137);
    ctr_ok(&k, &["container", "rm", &killed]);

    assert_no_leaks(&k, &[&id, &killed]);
    shutdown(k);
}

/// PIDs of `containerd-shim-kata-v2 ... -id ID ... delete` processes.
fn shim_delete_pids(id: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_delete = args.iter().any(|a| a == "delete") && args.windows(2).any(|w| w[0] == "-id" && w[1] == id);
        if is_delete && args.first().is_some_and(|a| a.ends_with("containerd-shim-kata-v2")) {
            pids.push(pid);
        }
    }
    pids
}

/// `ctr task delete` (containerd 1.6) succeeds and reports a non-zero exit status as a warning.
fn assert_deleted_with_status(k: &Kata, id: &str, status: u32) {
    let out = ctr(k, &["task", "delete", id]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "ctr task delete {id}: {stderr}");
    assert!(
        stderr.contains(&format!("exit with non-zero exit code {status}")),
        "expected exit status {status}: {stderr}"
    );
    assert_eq!(task_status(k, id), None, "task {id} still listed after delete");
}

fn kill9(pid: u64) {
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
    assert!(status.success());
}

#[test]
fn killed_qemu_ends_the_task_and_killed_shim_is_cleaned_up() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let id = unique_id("qemukill");
    run_detached(&k, &id, &["sleep", "300"]);
    wait_status(&k, &id, "RUNNING", RUN_TIMEOUT);
    let qemu = state_json(&id)["processes"][0]["pid"].as_u64().expect("QEMU pid in state");
    kill9(qemu);
    wait_status(&k, &id, "STOPPED", Duration::from_secs(60));
    assert_deleted_with_status(&k, &id, 255);
    ctr_ok(&k, &["container", "rm", &id]);
    assert_no_leaks(&k, &[&id]);

    let shim_id = unique_id("shimkill");
    run_detached(&k, &shim_id, &["sleep", "300"]);
    wait_status(&k, &shim_id, "RUNNING", RUN_TIMEOUT);
    let state = state_json(&shim_id);
    let shim = state["shim_pid"].as_u64().expect("shim pid in state");
    let vm_pids: Vec<u32> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .map(|p| u32::try_from(p).unwrap())
        .collect();
    kill9(shim);
    let _ = ctr(&k, &["task", "delete", &shim_id]);
    let out = ctr(&k, &["task", "ls"]);
    assert!(!text(&out.stdout).contains(&shim_id), "task still listed: {}", text(&out.stdout));
    ctr_ok(&k, &["container", "rm", &shim_id]);
    // containerd cleans up after a dead shim in the background by running `containerd-shim-kata-v2 delete`;
    // wait for that process before looking for leftovers.
    let deletes = shim_delete_pids(&shim_id);
    let still = e2e::process::wait_gone(&deletes, Duration::from_secs(30));
    assert!(still.is_empty(), "shim delete for {shim_id} still running after 30 s");
    // Killed by `delete`; their new parent reaps them, so a zombie counts as gone.
    let alive = e2e::process::wait_gone(&vm_pids, Duration::from_secs(10));
    assert!(alive.is_empty(), "VM processes {alive:?} survived their shim");
    assert_no_leaks(&k, &[&shim_id]);
    shutdown(k);
}
