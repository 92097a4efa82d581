//! VM templating through containerd: with `[factory] enable_template = true` (and 9p, as Kata requires), the
//! first pod makes the template, later pods are clones of it, and `kata-runtime factory` manages it. Needs
//! what `kata.rs` needs; skips with the reason when something is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use e2e::kata::{kata_parts, sandbox_state, KataParts, KATA_RUNTIME};
use e2e::{unique_id, Containerd, ContainerdOptions, OciImage, RunOptions, BUSYBOX_IMAGE};

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kata-runtime --config CONF factory ARGS`, from the directory that holds the shim.
fn factory(parts: &KataParts, conf: &Path, args: &[&str]) -> Output {
    Command::new(parts.shim_dir.join("kata-runtime"))
        .arg("--config")
        .arg(conf)
        .arg("factory")
        .args(args)
        .output()
        .expect("kata-runtime runs")
}

fn factory_ok(parts: &KataParts, conf: &Path, args: &[&str]) -> String {
    let out = factory(parts, conf, args);
    assert!(out.status.success(), "kata-runtime factory {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The QEMU command line of a running sandbox (its first recorded process).
fn qemu_cmdline(id: &str) -> Vec<String> {
    let state = sandbox_state(id).expect("the sandbox's state.json");
    let pid = state["processes"][0]["pid"].as_u64().expect("QEMU pid");
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU cmdline");
    raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// QEMU processes whose command line names a file under `dir`.
fn qemu_using(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    e2e::leaks::processes(|argv| {
        argv.first().is_some_and(|a| a.contains("qemu-system")) && argv.iter().any(|a| a.contains(&needle))
    })
    .into_iter()
    .map(|(pid, _)| pid)
    .collect()
}

#[test]
fn pods_are_clones_of_one_template() {
    let parts = testutil::skip_unless!(kata_parts());
    let no_kata_runtime = !parts.shim_dir.join("kata-runtime").is_file();
    testutil::skip_unless!(
        no_kata_runtime.then(|| format!("no kata-runtime beside the shim in {}", parts.shim_dir.display()))
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let templates: PathBuf = dir.path().join("templates");
    let conf = dir.path().join("configuration.toml");
    let text_conf = parts.configuration("").replace("shared_fs = \"virtio-fs\"", "shared_fs = \"virtio-9p\"")
        + &format!("[factory]\nenable_template = true\ntemplate_path = \"{}\"\n", templates.display());
    std::fs::write(&conf, text_conf).expect("write configuration");
    let containerd = Containerd::start(ContainerdOptions {
        shim_dir: Some(parts.shim_dir.clone()),
        env: vec![("KATA_CONF_FILE".into(), conf.display().to_string())],
        ctr_timeout: RUN_TIMEOUT,
        ..Default::default()
    })
    .expect("containerd starts");
    containerd.import(&OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image")).expect("import busybox");
    let run = |id: &str, cmd: &[&str]| {
        let opts = RunOptions { timeout: RUN_TIMEOUT, ..RunOptions::runtime(KATA_RUNTIME) };
        containerd.run(&opts, BUSYBOX_IMAGE, id, cmd).expect("ctr run")
    };

    // No template yet: the first pod makes it.
    assert!(factory_ok(&parts, &conf, &["status"]).starts_with("no VM template"));
    let first = unique_id("tmpl-first");
    let out = run(&first, &["echo", "hi"]);
    assert_eq!(text(&out.stdout), "hi\n", "{}\n{}", text(&out.stderr), containerd.log_tail(60));
    let status = factory_ok(&parts, &conf, &["status"]);
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(status.contains(" ready "), "{status}");
    assert!(qemu_using(&templates).is_empty(), "the template VM must be gone once saved");

    // Later pods are clones, each with its own hostname, clock and random state.
    let (a, b) = (unique_id("tmpl-a"), unique_id("tmpl-b"));
    let detached = RunOptions::detached(KATA_RUNTIME, RUN_TIMEOUT);
    for id in [&a, &b] {
        let out = containerd.run(&detached, BUSYBOX_IMAGE, id, &["sleep", "600"]).expect("ctr run -d");
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), containerd.log_tail(60));
        let cmdline = qemu_cmdline(id);
        assert!(cmdline.windows(2).any(|w| w[0] == "-incoming" && w[1] == "defer"), "{id} is a clone: {cmdline:?}");
        assert!(
            cmdline.iter().any(|a| a.contains("share=off") && a.contains(&templates.display().to_string())),
            "{cmdline:?}"
        );
    }
    let probe = |id: &str| {
        let out = containerd
            .ctr([
                "task",
                "exec",
                "--exec-id",
                "probe",
                id,
                "sh",
                "-c",
                "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s",
            ])
            .expect("ctr task exec");
        assert!(out.status.success(), "exec in {id}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let (pa, pb) = (probe(&a), probe(&b));
    assert_ne!(pa.lines().next(), pb.lines().next(), "clones share a random state: {pa} / {pb}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    for p in [&pa, &pb] {
        let guest: u64 = p.lines().nth(1).and_then(|s| s.parse().ok()).expect("date");
        assert!(now.abs_diff(guest) < 30, "guest clock {guest}, host {now}");
    }
    for id in [&a, &b] {
        containerd.ctr(["task", "kill", "-s", "KILL", id]).expect("kill");
    }
    for id in [&a, &b] {
        let deadline = std::time::Instant::now() + RUN_TIMEOUT;
        while !containerd.ctr(["task", "rm", id]).expect("task rm").status.success() {
            assert!(std::time::Instant::now() < deadline, "task {id} did not stop");
            std::thread::sleep(Duration::from_millis(200));
        }
        containerd.ctr(["container", "rm", id]).expect("container rm");
    }

    // Bulk output crosses the agent's virtio-serial port intact (1.3 MB, well past the port's buffers).
    let bulk = unique_id("tmpl-bulk");
    let out = run(&bulk, &["seq", "1", "200000"]);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 200000, "stderr: {}", text(&out.stderr));
    assert_eq!(stdout.lines().last(), Some("200000"));

    // An interactive tty (stdin and resize streams over the same port).
    let tty = unique_id("tmpl-tty");
    let opts = RunOptions { tty: true, timeout: RUN_TIMEOUT, ..RunOptions::runtime(KATA_RUNTIME) };
    let mut session = containerd.run_pty(&opts, BUSYBOX_IMAGE, &tty, &["sh"]).expect("ctr run -t");
    session.send_line("echo $((6*7))").expect("type");
    session.expect_line("42", RUN_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", containerd.log_tail(60)));
    session.send_line("exit").expect("type");
    let status = session.wait(Duration::from_secs(60)).expect("ctr exits");
    assert!(status.success(), "{status:?}: {}", session.transcript());

    // `factory destroy` removes it; `factory init` makes it ahead of the next pod.
    let removed = factory_ok(&parts, &conf, &["destroy"]);
    assert!(removed.starts_with("removed "), "{removed}");
    assert!(!templates.exists());
    // Two templates: for pods without a network and for pods with one interface.
    let made = factory_ok(&parts, &conf, &["init"]);
    assert_eq!(made.lines().count(), 2, "{made}");
    assert!(made.lines().all(|dir| Path::new(dir).join("state").is_file()), "{made}");
    assert_eq!(factory_ok(&parts, &conf, &["init"]), made, "init again makes nothing new");
    let again = unique_id("tmpl-again");
    let out = run(&again, &["echo", "again"]);
    assert_eq!(text(&out.stdout), "again\n", "{}", text(&out.stderr));

    // A template whose state does not load fails one pod with the reason and is removed, so the next pod
    // makes a new one instead of every pod failing.
    for dir in made.lines() {
        std::fs::write(Path::new(dir).join("state"), b"not a QEMU migration stream").expect("spoil the state");
    }
    let broken = unique_id("tmpl-broken");
    let out = run(&broken, &["echo", "hi"]);
    assert!(!out.status.success(), "a clone of a spoiled template ran: {}", text(&out.stdout));
    eprintln!("ctr run from a spoiled template: {}", text(&out.stderr));
    let why = format!("{}\n{}", text(&out.stderr), containerd.log_tail(80));
    assert!(why.contains("cannot load the VM template's state"), "{why}");
    let healed = unique_id("tmpl-healed");
    let out = run(&healed, &["echo", "healed"]);
    assert_eq!(text(&out.stdout), "healed\n", "{}\n{}", text(&out.stderr), containerd.log_tail(60));

    let ids = [
        first.as_str(),
        a.as_str(),
        b.as_str(),
        bulk.as_str(),
        tty.as_str(),
        again.as_str(),
        broken.as_str(),
        healed.as_str(),
    ];
    e2e::kata::assert_no_leaks(&containerd, &ids);
    factory_ok(&parts, &conf, &["destroy"]);
    assert!(qemu_using(dir.path()).is_empty());
    e2e::kata::assert_clean_shutdown(containerd);
}
