//! Proves the harness with containerd's own `io.containerd.runc.v2` runtime. Needs root and the Debian
//! containerd, runc and busybox-static packages; skips with a reason otherwise.
//! Run with `cargo test -p e2e -- --test-threads=1` (parallel runs work too: ids are unique).

use std::time::{Duration, Instant};

use e2e::{
    skip_reason, unique_id, Containerd, ContainerdOptions, CriOptions, OciImage, RunOptions, BUSYBOX_IMAGE, PAUSE_IMAGE,
};

fn start_with_busybox() -> Containerd {
    let started = Instant::now();
    let containerd = Containerd::start(ContainerdOptions::default()).expect("containerd starts");
    eprintln!("containerd ready in {:?}", started.elapsed());
    let started = Instant::now();
    containerd.import(&OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image builds")).expect("busybox image imports");
    eprintln!("busybox image built and imported in {:?}", started.elapsed());
    containerd
}

fn assert_no_leaks(containerd: &Containerd, ids: &[&str]) {
    let report = containerd.leaks(ids).expect("leak check runs");
    assert!(report.is_empty(), "leaked:\n{report}");
}

fn assert_clean_shutdown(containerd: Containerd) {
    let started = Instant::now();
    let report = containerd.stop();
    eprintln!("containerd stopped and cleaned up in {:?}", started.elapsed());
    assert!(report.removed_containers.is_empty(), "{report:?}");
    assert!(!report.containerd_killed, "containerd needed SIGKILL");
    assert!(report.killed_processes.is_empty(), "{report:?}");
    assert!(report.remaining.is_empty(), "left after shutdown:\n{}", report.remaining);
}

#[test]
fn echo_prints_hi() {
    testutil::skip_unless!(skip_reason());
    let containerd = start_with_busybox();
    let images = containerd.ctr_ok(["images", "ls", "-q"]).expect("ctr images ls");
    assert!(images.lines().any(|l| l == BUSYBOX_IMAGE), "images: {images}");

    let id = unique_id("e2e-echo");
    let started = Instant::now();
    let out = containerd.run(&RunOptions::default(), BUSYBOX_IMAGE, &id, &["echo", "hi"]).expect("ctr run");
    eprintln!("ctr run --rm (runc) took {:?}", started.elapsed());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_no_leaks(&containerd, &[&id]);
    assert_clean_shutdown(containerd);
}

#[test]
fn exit_status_is_passed_through() {
    testutil::skip_unless!(skip_reason());
    let containerd = start_with_busybox();
    let id = unique_id("e2e-exit");
    let out = containerd.run(&RunOptions::default(), BUSYBOX_IMAGE, &id, &["sh", "-c", "exit 3"]).expect("ctr run");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_no_leaks(&containerd, &[&id]);
    assert_clean_shutdown(containerd);
}

#[test]
fn interactive_shell_on_a_tty() {
    testutil::skip_unless!(skip_reason());
    let containerd = start_with_busybox();
    let id = unique_id("e2e-tty");
    let opts = RunOptions { tty: true, ..RunOptions::default() };
    let mut session = containerd.run_pty(&opts, BUSYBOX_IMAGE, &id, &["sh"]).expect("ctr run -t starts");
    let timeout = Duration::from_secs(30);
    session.expect("# ", timeout).expect("shell prompt");
    session.send_line("echo $((6*7))").expect("type");
    session.expect_line("42", timeout).expect("arithmetic result");
    session.send_line("exit").expect("type");
    let status = session.wait(timeout).expect("ctr exits");
    assert!(status.success(), "{status}; terminal:\n{}", session.transcript());
    assert_no_leaks(&containerd, &[&id]);
    assert_clean_shutdown(containerd);
}

#[test]
fn leftovers_are_reported_and_cleaned_on_shutdown() {
    testutil::skip_unless!(skip_reason());
    let containerd = start_with_busybox();
    let id = unique_id("e2e-leak");
    containerd.ctr_ok(["run", "-d", BUSYBOX_IMAGE, &id, "sleep", "300"]).expect("detached ctr run");
    let report = containerd.leaks(&[&id]).expect("leak check runs");
    assert!(report.processes.iter().any(|p| p.cmdline.contains("containerd-shim-runc-v2")), "{report}");
    assert!(report.processes.iter().any(|p| p.cmdline == "sleep 300"), "{report}");
    assert!(!report.mounts.is_empty(), "{report}");
    assert!(report.paths.contains(&containerd.shim_socket(&id)), "{report}");
    assert!(report.containerd_objects.iter().any(|o| o == &format!("task {id}")), "{report}");

    let dir = containerd.dir().to_owned();
    let socket = containerd.shim_socket(&id);
    let shutdown = containerd.stop();
    assert_eq!(shutdown.removed_containers, vec![format!("default/{id}")]);
    assert!(shutdown.remaining.is_empty(), "{}", shutdown.remaining);
    assert!(!dir.exists() && !socket.exists());
}

#[test]
fn cri_plugin_loads_with_the_pause_image() {
    testutil::skip_unless!(skip_reason());
    let cni_conf = tempfile::tempdir().expect("temp dir");
    let containerd = Containerd::start(ContainerdOptions {
        cri: Some(CriOptions::new(cni_conf.path())),
        ..ContainerdOptions::default()
    })
    .expect("containerd with CRI starts");
    containerd.import(&OciImage::pause(PAUSE_IMAGE).expect("pause image builds")).expect("pause image imports");
    let plugins = containerd.ctr_ok(["plugins", "ls"]).expect("ctr plugins ls");
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.split_whitespace().nth(1) == Some("cri"))
        .unwrap_or_else(|| panic!("no CRI plugin line in:\n{plugins}"));
    assert!(cri.trim_end().ends_with("ok"), "{cri}\nlog:\n{}", containerd.log_tail(30));

    // The pause image's entrypoint keeps running until it is killed.
    let id = unique_id("e2e-pause");
    containerd.ctr_ok(["run", "-d", PAUSE_IMAGE, &id]).expect("pause container starts");
    std::thread::sleep(Duration::from_millis(300));
    let tasks = containerd.ctr_ok(["tasks", "ls"]).expect("ctr tasks ls");
    assert!(tasks.lines().any(|l| l.starts_with(&id) && l.contains("RUNNING")), "{tasks}");
    containerd.ctr_ok(["tasks", "kill", "-s", "SIGKILL", &id]).expect("kill");
    // Deleting needs the task to have stopped; retry briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    while containerd.ctr(["tasks", "delete", &id]).map(|o| !o.status.success()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "task did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    containerd.ctr_ok(["containers", "delete", &id]).expect("delete container");
    assert_no_leaks(&containerd, &[&id]);
    assert_clean_shutdown(containerd);
}

#[test]
fn a_hung_ctr_run_is_killed_and_cleaned_up() {
    testutil::skip_unless!(skip_reason());
    let containerd = start_with_busybox();
    let id = unique_id("e2e-hang");
    let opts = RunOptions { timeout: Duration::from_millis(1500), ..RunOptions::default() };
    let err = containerd.run(&opts, BUSYBOX_IMAGE, &id, &["sleep", "300"]).expect_err("ctr run must time out");
    assert!(err.to_string().contains("did not finish within"), "{err}");
    let report = containerd.leaks(&[&id]).expect("leak check runs");
    assert!(!report.is_empty(), "the container should still be there");

    let shutdown = containerd.stop();
    assert_eq!(shutdown.removed_containers, vec![format!("default/{id}")]);
    assert!(shutdown.remaining.is_empty(), "{}", shutdown.remaining);
}
