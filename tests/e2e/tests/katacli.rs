//! `kata-runtime` behind containerd's runc shims (`katacli`): `containerd-shim-runc-v2` with `--runc-binary`
//! and `containerd-shim-runc-v1` finding it as `runc` on its PATH drive it exactly as they drive runc, and
//! every container runs in its own VM. Needs root, containerd, and the parts `scripts/test.sh` exports (kernel,
//! initrd, helper daemons, the shim dir holding `kata-runtime`); skips with the reason when one is missing.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use e2e::kata::{kata_parts, KataParts};
use e2e::{unique_id, Containerd, ContainerdOptions, OciImage, RunOptions, BUSYBOX_IMAGE};

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const RUNC_V2: &str = "io.containerd.runc.v2";
const RUNC_V1: &str = "io.containerd.runc.v1";

struct Katacli {
    containerd: Containerd,
    parts: KataParts,
    kata_runtime: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// containerd whose runc shims find `kata-runtime` as `runc` on their PATH (what `BinaryName` does for CRI).
fn start(parts: KataParts) -> Katacli {
    let kata_runtime = parts.shim_dir.join("kata-runtime");
    assert!(kata_runtime.is_file(), "{} missing: cargo build --release -p kata-runtime", kata_runtime.display());
    let conf = tempfile::tempdir().expect("temp dir");
    let conf_file = conf.path().join("configuration.toml");
    std::fs::write(&conf_file, parts.configuration("")).expect("write configuration");
    let bin = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(&kata_runtime, bin.path().join("runc")).expect("runc symlink");
    let containerd = Containerd::start(ContainerdOptions {
        shim_dir: Some(bin.path().to_path_buf()),
        env: vec![("KATA_CONF_FILE".into(), conf_file.display().to_string())],
        ctr_timeout: RUN_TIMEOUT,
        ..Default::default()
    })
    .expect("containerd starts");
    containerd.import(&OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image")).expect("import busybox");
    Katacli { containerd, parts, kata_runtime, _dirs: (conf, bin) }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(k: &Katacli, runtime: &str, id: &str, extra: &[&str], cmd: &[&str]) -> Output {
    let mut extra_flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if runtime == RUNC_V2 {
        extra_flags.extend(["--runc-binary".to_string(), k.kata_runtime.display().to_string()]);
    }
    let opts = RunOptions { timeout: RUN_TIMEOUT, extra_flags, ..RunOptions::runtime(runtime) };
    let started = Instant::now();
    let out = k.containerd.run(&opts, BUSYBOX_IMAGE, id, cmd).expect("ctr run");
    eprintln!("ctr run --runtime {runtime} {cmd:?}: {:?} in {:?}", out.status, started.elapsed());
    out
}

/// `ctr run -d ... sleep 1000` through the v2 runc shim with kata-runtime as its runc.
fn run_detached(k: &Katacli, id: &str) {
    let opts = RunOptions {
        rm: false,
        timeout: RUN_TIMEOUT,
        extra_flags: vec!["-d".into(), "--runc-binary".into(), k.kata_runtime.display().to_string()],
        ..RunOptions::runtime(RUNC_V2)
    };
    let out = k.containerd.run(&opts, BUSYBOX_IMAGE, id, &["sleep", "1000"]).expect("ctr run -d");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), k.containerd.log_tail(60));
}

/// The container's directory under the runc shim's `--root`.
fn oci_dir(id: &str) -> PathBuf {
    Path::new("/run/containerd/runc/default").join(id)
}

fn assert_no_leaks(k: &Katacli, ids: &[&str]) {
    e2e::kata::assert_no_leaks(&k.containerd, ids);
    let standins = e2e::kata::standins(ids);
    assert!(standins.is_empty(), "stand-ins left: {standins:?}");
    for id in ids {
        assert!(!oci_dir(id).exists(), "{} left behind", oci_dir(id).display());
    }
}

#[test]
fn runc_shims_run_containers_in_vms() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let release = k.parts.kernel_release().expect("kernel has a version banner");
    let host = text(&std::process::Command::new("uname").arg("-r").output().expect("uname").stdout);
    assert_ne!(release, host.trim());

    let v2 = unique_id("cli-v2");
    let out = run(&k, RUNC_V2, &v2, &[], &["uname", "-r"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), k.containerd.log_tail(60));
    assert_eq!(text(&out.stdout).trim(), release, "the container must see the guest kernel");

    let v1 = unique_id("cli-v1");
    let out = run(&k, RUNC_V1, &v1, &[], &["uname", "-r"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), k.containerd.log_tail(60));
    assert_eq!(text(&out.stdout).trim(), release, "runc v1 shim: the container must see the guest kernel");

    let exit3 = unique_id("cli-exit3");
    let out = run(&k, RUNC_V2, &exit3, &[], &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let timed = unique_id("cli-true");
    let started = Instant::now();
    let out = run(&k, RUNC_V2, &timed, &[], &["true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    eprintln!("katacli start time: ctr run --runc-binary kata-runtime true took {:?}", started.elapsed());

    assert_no_leaks(&k, &[&v2, &v1, &exit3, &timed]);
    e2e::kata::assert_clean_shutdown(k.containerd);
}

#[test]
fn runc_shim_kills_execs_and_pauses_a_detached_container() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let id = unique_id("cli-detached");
    run_detached(&k, &id);
    let ctr = |args: &[&str]| {
        let out = k.containerd.ctr(args).expect("ctr runs");
        assert!(out.status.success(), "ctr {args:?}: {}\n{}", text(&out.stderr), k.containerd.log_tail(40));
        text(&out.stdout)
    };
    let kata_runtime = |args: &[&str]| {
        let out = std::process::Command::new(&k.kata_runtime)
            .args(["--root", "/run/containerd/runc/default"])
            .args(args)
            .output()
            .expect("kata-runtime runs");
        assert!(out.status.success(), "kata-runtime {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let state: serde_json::Value = serde_json::from_str(&kata_runtime(&["state", &id])).expect("state is JSON");
    assert_eq!(state["status"], "running", "{state}");

    // runc's stats event, from the container's cgroup in the guest; `update` with runc's flags changes it.
    let stats = || -> serde_json::Value {
        serde_json::from_str(&kata_runtime(&["events", "--stats", &id])).expect("events --stats prints JSON")
    };
    let before = stats();
    assert_eq!((&before["type"], &before["id"]), (&"stats".into(), &id.as_str().into()), "{before}");
    assert!(before["data"]["pids"]["current"].as_u64().is_some_and(|n| n >= 1), "{before}");
    assert!(before["data"]["memory"]["usage"]["usage"].as_u64().is_some_and(|n| n > 0), "{before}");
    kata_runtime(&["update", "--pids-limit", "77", "--memory", "200m", &id]);
    let after = stats();
    assert_eq!(after["data"]["pids"]["limit"], 77, "{after}");
    assert_eq!(after["data"]["memory"]["usage"]["limit"], 200 << 20, "{after}");

    let out = ctr(&["task", "exec", "--exec-id", "e1", &id, "echo", "exec"]);
    assert_eq!(out, "exec\n");
    let exec = k.containerd.ctr(["task", "exec", "--exec-id", "e2", &id, "sh", "-c", "exit 4"]).expect("ctr");
    assert_eq!(exec.status.code(), Some(4));

    // An exec with a terminal: the pty kata-runtime sends over the console socket is the exec's.
    let exec_tty = k.containerd.ctr_command(["task", "exec", "-t", "--exec-id", "t1", &id, "sh"]);
    let mut session = e2e::PtySession::spawn(exec_tty).expect("ctr task exec -t");
    session.send_line("echo $((6*7))").expect("type");
    session.expect_line("42", RUN_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", k.containerd.log_tail(60)));
    session.send_line("tty").expect("type");
    session.expect("/dev/pts/", RUN_TIMEOUT).unwrap_or_else(|e| panic!("the exec has no terminal: {e}"));
    session.send_line("exit 5").expect("type");
    let status = session.wait(Duration::from_secs(60)).expect("ctr exits");
    assert_eq!(status.code(), Some(5), "{}", session.transcript());

    ctr(&["task", "pause", &id]);
    assert!(ctr(&["task", "ls"]).lines().any(|l| l.starts_with(&id) && l.contains("PAUSED")));
    ctr(&["task", "resume", &id]);
    assert!(ctr(&["task", "ls"]).lines().any(|l| l.starts_with(&id) && l.contains("RUNNING")));
    assert!(!ctr(&["task", "ps", &id]).trim().is_empty());

    ctr(&["task", "kill", "--signal", "SIGKILL", &id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ctr(&["task", "ls"]).lines().any(|l| l.starts_with(&id) && l.contains("STOPPED")) {
        assert!(Instant::now() < deadline, "task did not stop:\n{}", ctr(&["task", "ls"]));
        std::thread::sleep(Duration::from_millis(200));
    }
    ctr(&["task", "delete", &id]);
    ctr(&["container", "delete", &id]);
    assert_no_leaks(&k, &[&id]);
    e2e::kata::assert_clean_shutdown(k.containerd);
}

/// `kill -9` of the stand-in ends the task (137) and `ctr task delete` still removes the VM; `kill -9` of the
/// runc shim itself makes containerd clean up through `kata-runtime delete --force`. Nothing is left either way.
#[test]
fn killed_stand_ins_and_shims_leave_nothing() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let find = |id: &str, what: &str| -> u32 {
        let found =
            e2e::leaks::processes(|argv| argv.iter().any(|a| a.ends_with(what)) && argv.iter().any(|a| a.contains(id)));
        found.first().map(|(pid, _)| *pid).unwrap_or_else(|| panic!("no {what} process for {id}"))
    };
    let kill9 = |pid: u32| {
        let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
        assert!(status.success());
    };
    let task_ls = || text(&k.containerd.ctr(["task", "ls"]).expect("ctr task ls").stdout);

    let standin = unique_id("cli-kill-standin");
    run_detached(&k, &standin);
    kill9(find(&standin, "__standin"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !task_ls().lines().any(|l| l.starts_with(&standin) && l.contains("STOPPED")) {
        assert!(Instant::now() < deadline, "task did not stop:\n{}", task_ls());
        std::thread::sleep(Duration::from_millis(200));
    }
    let delete = k.containerd.ctr(["task", "delete", &standin]).expect("ctr task delete");
    assert!(delete.status.success(), "{}", text(&delete.stderr));
    k.containerd.ctr(["container", "delete", &standin]).expect("ctr container delete");

    let shim = unique_id("cli-kill-shim");
    run_detached(&k, &shim);
    kill9(find(&shim, "containerd-shim-runc-v2"));
    let deadline = Instant::now() + Duration::from_secs(60);
    // containerd cleans up after a dead shim on its own (`containerd-shim-runc-v2 delete`, which runs
    // `kata-runtime delete --force`), after the task has left its list: wait for that to finish too.
    let _ = k.containerd.ctr(["task", "delete", "--force", &shim]);
    loop {
        let busy = e2e::leaks::processes(|argv| argv.iter().any(|a| a.contains(shim.as_str())));
        if busy.is_empty() && !task_ls().lines().any(|l| l.starts_with(&shim)) {
            break;
        }
        assert!(Instant::now() < deadline, "not cleaned up:\n{}\n{busy:?}", task_ls());
        std::thread::sleep(Duration::from_millis(500));
    }
    k.containerd.ctr(["container", "delete", &shim]).expect("ctr container delete");
    // The killed runc shim's own socket stays behind (it does under runc as well: containerd 1.6 does not
    // remove a dead shim's socket); it is not kata-runtime's to remove.
    let _ = std::fs::remove_file(k.containerd.shim_socket(&shim));
    assert_no_leaks(&k, &[&standin, &shim]);
    e2e::kata::assert_clean_shutdown(k.containerd);
}

/// The how-to's `runtime_engine` configuration: containerd's v1 runtime (`io.containerd.runtime.v1.linux`)
/// with `kata-runtime` as its engine, driven through the v1 `containerd-shim`, runs the container in a VM.
#[test]
fn the_v1_linux_runtime_runs_kata_runtime_as_its_engine() {
    let parts = testutil::skip_unless!(kata_parts());
    testutil::skip_unless!((!Path::new("/usr/bin/containerd-shim").is_file())
        .then_some("containerd's v1 shim /usr/bin/containerd-shim is missing (Debian package containerd)"));
    let kata_runtime = parts.shim_dir.join("kata-runtime");
    let conf = tempfile::tempdir().expect("temp dir");
    let conf_file = conf.path().join("configuration.toml");
    std::fs::write(&conf_file, parts.configuration("")).expect("write configuration");
    let containerd = Containerd::start(ContainerdOptions {
        env: vec![("KATA_CONF_FILE".into(), conf_file.display().to_string())],
        extra_config: format!(
            "[plugins.\"io.containerd.runtime.v1.linux\"]\n  shim = \"containerd-shim\"\n  runtime = \"{}\"\n",
            kata_runtime.display()
        ),
        ctr_timeout: RUN_TIMEOUT,
        ..Default::default()
    })
    .expect("containerd starts");
    containerd.import(&OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image")).expect("import busybox");
    let id = unique_id("cli-v1-linux");
    let opts = RunOptions { timeout: RUN_TIMEOUT, ..RunOptions::runtime("io.containerd.runtime.v1.linux") };
    let out = containerd.run(&opts, BUSYBOX_IMAGE, &id, &["uname", "-r"]).expect("ctr run");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), containerd.log_tail(60));
    assert_eq!(text(&out.stdout).trim(), parts.kernel_release().expect("kernel version banner"));
    e2e::kata::assert_no_leaks(&containerd, &[&id]);
    e2e::kata::assert_clean_shutdown(containerd);
}

/// `ctr run -t` through the runc shim: the pty kata-runtime sends over the console socket is the container's
/// terminal (a shell in the guest answers, `exit` ends `ctr`), and nothing is left after.
#[test]
fn an_interactive_terminal_through_the_console_socket() {
    let k = start(testutil::skip_unless!(kata_parts()));
    let id = unique_id("cli-tty");
    let opts = RunOptions {
        tty: true,
        timeout: RUN_TIMEOUT,
        extra_flags: vec!["--runc-binary".into(), k.kata_runtime.display().to_string()],
        ..RunOptions::runtime(RUNC_V2)
    };
    let mut session = k.containerd.run_pty(&opts, BUSYBOX_IMAGE, &id, &["sh"]).expect("ctr run -t");
    session.send_line("echo $((6*7))").expect("type");
    session.expect_line("42", RUN_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", k.containerd.log_tail(60)));
    session.send_line("tty").expect("type");
    session.expect("/dev/pts/", RUN_TIMEOUT).unwrap_or_else(|e| panic!("the shell has no terminal: {e}"));
    session.send_line("exit").expect("type");
    let status = session.wait(Duration::from_secs(60)).expect("ctr exits");
    assert!(status.success(), "{status:?}: {}", session.transcript());
    assert_no_leaks(&k, &[&id]);
    e2e::kata::assert_clean_shutdown(k.containerd);
}
