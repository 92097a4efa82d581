//! A real sandbox (QEMU under TCG, virtio-fs, hybrid vsock, real mounts) found again by id after the value that
//! started it is gone: `Sandbox::connect` attaches to QEMU over QMP and to the agent over vsock, and drives the
//! running container to the end.
//!
//! Needs root (mounts) and KATA_TEST_KERNEL, KATA_TEST_INITRD, KATA_TEST_VSOCK_DAEMON, KATA_TEST_VIRTIOFSD.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use runtime::io::IoPaths;
use runtime::{Host, Rootfs, Sandbox, SandboxOptions, Status};

const TIMEOUT: Duration = Duration::from_secs(120);

fn options(root: &Path, kernel: &Path, initrd: &Path, vsock: &Path, virtiofsd: &Path) -> SandboxOptions {
    let text = format!(
        "[hypervisor.qemu]\nkernel = {kernel:?}\ninitrd = {initrd:?}\nvirtio_fs_daemon = {virtiofsd:?}\n\
         vsock_daemon = {vsock:?}\naccel = \"tcg\"\n"
    );
    let config = types::config::LoadedConfig::from_sources(&[("test.toml".into(), text)]).expect("config").config;
    SandboxOptions {
        id: "reconnect".into(),
        config,
        root: root.to_path_buf(),
        hostname: "r".into(),
        dns: vec![],
        netns: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_is_driven_by_id_after_its_starter_let_go() {
    let [kernel, initrd, vsock, virtiofsd] = testutil::skip_unless!(env_paths([
        "KATA_TEST_KERNEL",
        "KATA_TEST_INITRD",
        "KATA_TEST_VSOCK_DAEMON",
        "KATA_TEST_VIRTIOFSD"
    ]));
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { nix::libc::geteuid() } == 0;
    testutil::skip_unless!((!root_user).then_some("needs root to mount container filesystems"));
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("run");
    let rootfs = dir.path().join("rootfs");
    make_rootfs(&rootfs);

    let sandbox = Sandbox::start(options(&root, &kernel, &initrd, &vsock, &virtiofsd), Host::real())
        .await
        .unwrap_or_else(|e| panic!("sandbox starts: {}", runtime::error_chain(&e)));
    let pids = sandbox.vmm_pid();
    let spec = host_spec(&["sleep", "1000"], false, serde_json::json!({}));
    sandbox.create("c1", &spec, &Rootfs::Dir(rootfs), "/bundle", IoPaths::default(), false).await.expect("create");
    sandbox.start_process("c1", "", |_| {}).await.expect("start");
    // Everything the starter knew, gone but for the state file; QEMU, its helpers and the container keep running.
    drop(sandbox);
    assert!(running(pids), "the VM outlives the value that started it");

    let sandbox = tokio::time::timeout(TIMEOUT, Sandbox::connect(&root, "reconnect", Host::real(), TIMEOUT))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect: {}", runtime::error_chain(&e)));
    assert_eq!(sandbox.vmm_pid(), pids, "the same QEMU");
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
    while running(pids) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!running(pids), "QEMU {pids} still runs after stop");
    assert!(!root.join("reconnect").exists(), "the sandbox directory is removed");
}
