//! A real sandbox (QEMU under TCG, virtio-fs, hybrid vsock, real mounts) started by one process, which then exits,
//! and found and driven by id from another: `Sandbox::connect` attaches to QEMU over QMP and to the agent over
//! vsock, runs an exec in the running container, ends it and stops the sandbox, leaving nothing behind.
//!
//! The test runs itself as the first process (this test binary with [`STARTER`] set). Needs root (mounts) and
//! KATA_TEST_KERNEL, KATA_TEST_INITRD, KATA_TEST_VSOCK_DAEMON, KATA_TEST_VIRTIOFSD.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use runtime::io::IoPaths;
use runtime::{Host, Rootfs, Sandbox, SandboxOptions, Status};

const TIMEOUT: Duration = Duration::from_secs(120);
const TEST: &str = "a_sandbox_started_by_a_process_that_exited_is_driven_by_id";
/// Set for the starting process: the sandbox root it starts the sandbox in.
const STARTER: &str = "KATA_TEST_RECONNECT_STARTER_ROOT";
const ID: &str = "reconnect";

fn options(root: &Path, [kernel, initrd, vsock, virtiofsd]: &[PathBuf; 4]) -> SandboxOptions {
    let text = format!(
        "[hypervisor.qemu]\nkernel = {kernel:?}\ninitrd = {initrd:?}\nvirtio_fs_daemon = {virtiofsd:?}\n\
         vsock_daemon = {vsock:?}\naccel = \"tcg\"\n"
    );
    let config = types::config::LoadedConfig::from_sources(&[("test.toml".into(), text)]).expect("config").config;
    SandboxOptions {
        id: ID.into(),
        config,
        root: root.to_path_buf(),
        hostname: "r".into(),
        dns: vec![],
        netns: None,
        resources: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_started_by_a_process_that_exited_is_driven_by_id() {
    let parts = testutil::skip_unless!(env_paths([
        "KATA_TEST_KERNEL",
        "KATA_TEST_INITRD",
        "KATA_TEST_VSOCK_DAEMON",
        "KATA_TEST_VIRTIOFSD"
    ]));
    if let Some(root) = std::env::var_os(STARTER) {
        return start(Path::new(&root), &parts).await;
    }
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { nix::libc::geteuid() } == 0;
    testutil::skip_unless!((!root_user).then_some("needs root to mount container filesystems"));
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("run");
    let _cleanup = CleanupOnDrop { root: root.clone(), id: ID.into() };

    let starter = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(STARTER, &root)
        .output()
        .expect("run the starting process");
    let said = String::from_utf8_lossy(&starter.stdout).into_owned() + &String::from_utf8_lossy(&starter.stderr);
    assert!(starter.status.success(), "the starting process failed:\n{said}");
    // The test harness prints its own words on the same line.
    let pid: u32 = said
        .split("VMM PID ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the starting process did not say its VMM's PID:\n{said}"));
    assert!(running(pid), "the VM outlives the process that started it");

    let sandbox = tokio::time::timeout(TIMEOUT, Sandbox::connect(&root, ID, Host::real(), TIMEOUT))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect: {}", runtime::error_chain(&e)));
    assert_eq!(sandbox.vmm_pid(), pid, "the same QEMU");
    assert_eq!(sandbox.state("c1", "").expect("c1").status, Status::Running);
    let exec = serde_json::to_vec(&process_json(&["true"], false)).expect("json");
    sandbox.exec("c1", "e1", exec, IoPaths::default()).expect("exec");
    sandbox.start_process("c1", "e1", |_| {}).await.expect("exec starts");
    let exit = tokio::time::timeout(TIMEOUT, sandbox.wait("c1", "e1")).await.expect("exec exits").expect("wait");
    assert_eq!(exit.map(|e| e.status), Some(0));
    sandbox.kill("c1", "", 9, false).await.expect("kill");
    let exit = tokio::time::timeout(TIMEOUT, sandbox.wait("c1", "")).await.expect("c1 exits").expect("wait");
    assert_eq!(exit.map(|e| e.status), Some(137));
    sandbox.delete("c1", "").await.expect("delete");
    sandbox.stop().await.unwrap_or_else(|e| panic!("stop: {}", runtime::error_chain(&e)));

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!running(pid), "QEMU {pid} still runs after stop");
    assert!(!root.join(ID).exists(), "the sandbox directory is removed");
}

/// The starting process: a sandbox with one running container, left as it is.
async fn start(root: &Path, parts: &[PathBuf; 4]) {
    let rootfs = root.with_file_name("rootfs");
    make_rootfs(&rootfs);
    let sandbox = Sandbox::start(options(root, parts), Host::real())
        .await
        .unwrap_or_else(|e| panic!("sandbox starts: {}", runtime::error_chain(&e)));
    let spec = host_spec(&["sleep", "1000"], false, serde_json::json!({}));
    sandbox.create("c1", &spec, &Rootfs::Dir(rootfs), "/bundle", IoPaths::default(), false).await.expect("create");
    sandbox.start_process("c1", "", |_| {}).await.expect("start");
    println!("VMM PID {}", sandbox.vmm_pid());
}
