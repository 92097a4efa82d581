//! Drives a real kata-agent in a real VM through `AgentClient`.
//!
//! Needs KATA_TEST_KERNEL (vmlinux), KATA_TEST_INITRD (initrd with kata-agent as /init) and
//! KATA_TEST_VSOCK_DAEMON (vhost-device-vsock); skips with a message when any is unset.
//! Runs under TCG; one VM boot serves every step, each printed as it passes.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use hypervisor::{AgentTransport, Hypervisor, Qemu, SharedFs, Vm, VmConfig};
use runtime::agent::{ProcessRef, RpcCode, SandboxSetup, SharedFsMount, SharedFsType};
use runtime::boot::{boot_and_connect, BootError, Booted};

/// The VM under test: QEMU (microvm, virtio-fs, hybrid vsock) booted as the shim boots it.
struct TestVm {
    vm: Arc<dyn Vm>,
    booted: Result<Booted, BootError>,
}

impl TestVm {
    fn print_console(&self) {
        eprintln!("--- guest console (last lines) ---\n{}", self.vm.console().tail(80));
    }
}

async fn start_vm(
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    vsock_daemon: &Path,
    virtiofsd: &Path,
    share: &Path,
) -> TestVm {
    let mut config = VmConfig::new("agent-vm-test", kernel, dir.join("vm"));
    config.initrd = Some(initrd.to_path_buf());
    config.agent = Some(AgentTransport::HybridVsock);
    config.qemu.vsock_daemon = Some(vsock_daemon.to_path_buf());
    config.kernel_params = vec!["agent.debug".into()];
    config.shared_fs =
        SharedFs::VirtioFs { daemon: virtiofsd.to_path_buf(), extra_args: vec![], shared_dir: share.to_path_buf() };
    let vm = Qemu.vm(config);
    let booted = boot_and_connect(&vm, Duration::from_secs(60), |_| {}).await;
    TestVm { vm, booted }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_containers_in_a_vm() {
    let [kernel, initrd, daemon, virtiofsd] = testutil::skip_unless!(env_paths([
        "KATA_TEST_KERNEL",
        "KATA_TEST_INITRD",
        "KATA_TEST_VSOCK_DAEMON",
        "KATA_TEST_VIRTIOFSD"
    ]));
    let dir = tempfile::tempdir().expect("tempdir");
    let share = dir.path().join("shared");
    make_rootfs(&share.join("rootfs"));
    let vm = start_vm(dir.path(), &kernel, &initrd, &daemon, &virtiofsd, &share).await;
    let pids: Vec<u32> = vm.vm.pids().iter().map(|p| p.pid).collect();
    let result = tokio::time::timeout(Duration::from_secs(600), scenario(&vm)).await;
    if !matches!(result, Ok(Ok(()))) {
        vm.print_console();
    }
    vm.vm.stop().await.expect("VM stops");
    for pid in pids {
        assert!(!running(pid), "VM process {pid} still running after stop");
    }
    assert!(!dir.path().join("vm").exists(), "the VM's work dir must be removed by stop");
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("scenario timed out"),
    }
}

async fn scenario(vm: &TestVm) -> Result<(), String> {
    let t0 = Instant::now();
    let agent = vm.booted.as_ref().map_err(|e| protocols::error_chain(e))?.agent.clone();
    step("connect (boot + Check)", t0);
    let details = agent.guest_details().await.map_err(|e| e.to_string())?;
    println!("guest kernel {} agent {} boot {}", details.kernel_release, details.agent_version, details.boot_id);

    let t = Instant::now();
    agent
        .create_sandbox(&SandboxSetup {
            sandbox_id: "sb1".into(),
            hostname: "kata-sandbox".into(),
            dns: vec!["nameserver 10.0.2.3".into()],
            shared_fs: Some(SharedFsMount {
                fs_type: SharedFsType::VirtioFs,
                tag: "kataShared".into(),
                mount_point: None,
            }),
            host_time: Some(SystemTime::now()),
            entropy: vec![0x5a; 32],
        })
        .await
        .map_err(|e| e.to_string())?;
    step("create_sandbox (virtio-fs share, hostname, clock, dns)", t);

    let t = Instant::now();
    let (code, out, err) = run_container(&agent, "echo", &["echo", "hi"]).await;
    assert_eq!((code, out.as_str(), err.as_str()), (0, "hi\n", ""), "echo hi");
    step("echo hi -> stdout 'hi', exit 0", t);

    let t = Instant::now();
    let (code, _, err) = run_container(&agent, "exit3", &["sh", "-c", "echo oops >&2; exit 3"]).await;
    assert_eq!((code, err.as_str()), (3, "oops\n"));
    step("exit 3 + stderr", t);

    let t = Instant::now();
    // A plain container's device cgroup: mknod is allowed (runc's default rules), opening a device the spec does
    // not allow is not. 4:64 is the guest's ttyS0; the containers share one rootfs, hence the rm. Loading the
    // device program must not leak a raised RLIMIT_MEMLOCK into the container: 8192 KiB is the kernel's default,
    // which the agent (PID 1) has.
    let mknod_write =
        "rm -f /tmp/c; mknod /tmp/c c 4 64 && echo x > /tmp/c; echo c=$?; echo x > /dev/null && echo null=ok; ulimit -l";
    for (id, resources) in [("devices", containerd_devices()), ("devices-unlisted", serde_json::json!({}))] {
        let spec = spec_json_with(id, &["sh", "-c", mknod_write], false, resources);
        let (code, out, err) = run_spec(&agent, id, &spec).await;
        assert_eq!(
            (code, out.as_str()),
            (0, "c=1\nnull=ok\n8192\n"),
            "{id}: the write to 4:64 must fail; stderr {err:?}"
        );
        assert!(err.contains("Operation not permitted"), "{id}: stderr {err:?}");
    }
    step("device cgroup: write to a mknod'ed 4:64 -> EPERM, /dev/null works", t);

    let t = Instant::now();
    // An update without devices (`ctr task update --memory-limit`) keeps the rules the container was created with.
    let all = serde_json::json!({"devices": [{"allow": true, "access": "rwm"}]});
    let spec = spec_json_with("priv", &["sleep", "1000"], false, all);
    agent.create_container("priv", &spec, "rootfs", true).await.map_err(|e| e.to_string())?;
    agent.start_container("priv").await.map_err(|e| e.to_string())?;
    let limit = serde_json::json!({"memory": {"limit": 64 * 1024 * 1024}});
    agent.update_container("priv", &serde_json::to_vec(&limit).expect("json")).await.map_err(|e| e.to_string())?;
    let proc = process_json(&["sh", "-c", mknod_write], false);
    agent
        .exec_process("priv", "w", &serde_json::to_vec(&proc).expect("json"), true)
        .await
        .map_err(|e| e.to_string())?;
    let p = ProcessRef::exec("priv", "w");
    let mut out = agent.read_stdout(&p).await.map_err(|e| e.to_string())?;
    let exit = agent.wait_process(&p).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.read_to_end().await.map_err(|e| e.to_string())?).into_owned();
    assert_eq!((exit.status, text.as_str()), (0, "c=0\nnull=ok\n8192\n"), "allow-all container after an update");
    agent.signal_process(&ProcessRef::init("priv"), 9, false).await.map_err(|e| e.to_string())?;
    agent.wait_process(&ProcessRef::init("priv")).await.map_err(|e| e.to_string())?;
    agent.remove_container("priv").await.map_err(|e| e.to_string())?;
    step("device cgroup: an allow-all container keeps its devices across an update", t);

    // A long-running container for signals, exec, tty and stats.
    let t = Instant::now();
    agent
        .create_container("long", &spec_json("long", &["sleep", "1000"], false), "rootfs", true)
        .await
        .map_err(|e| e.to_string())?;
    agent.start_container("long").await.map_err(|e| e.to_string())?;
    let exec_out = {
        let proc = process_json(&["sh", "-c", "echo from-exec; hostname; exit 5"], false);
        agent
            .exec_process("long", "e1", &serde_json::to_vec(&proc).expect("json"), true)
            .await
            .map_err(|e| e.to_string())?;
        let p = ProcessRef::exec("long", "e1");
        let mut out = agent.read_stdout(&p).await.map_err(|e| e.to_string())?;
        let exit = agent.wait_process(&p).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.read_to_end().await.map_err(|e| e.to_string())?).into_owned();
        (exit.status, text)
    };
    assert_eq!(exec_out, (5, "from-exec\nkata-test\n".to_string()), "exec");
    step("exec in running container -> output, exit 5", t);

    let t = Instant::now();
    let proc = process_json(&["sh", "-c", "read line; stty size; exit 0"], true);
    agent
        .exec_process("long", "tty1", &serde_json::to_vec(&proc).expect("json"), true)
        .await
        .map_err(|e| e.to_string())?;
    let p = ProcessRef::exec("long", "tty1");
    agent.resize_tty(&p, 40, 100).await.map_err(|e| e.to_string())?;
    let mut out = agent.read_stdout(&p).await.map_err(|e| e.to_string())?;
    let stdin = agent.stdin(&p).await.map_err(|e| e.to_string())?;
    stdin.write(b"go\n").await.map_err(|e| e.to_string())?;
    stdin.finish().await.map_err(|e| e.to_string())?;
    let exit = agent.wait_process(&p).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.read_to_end().await.map_err(|e| e.to_string())?).into_owned();
    assert_eq!(exit.status, 0);
    assert!(text.contains("40 100"), "tty output was {text:?}");
    step("tty exec + resize -> 'stty size' = 40 100", t);

    let t = Instant::now();
    let stats = agent.stats("long").await.map_err(|e| e.to_string())?;
    println!("stats: cpu {:?} mem usage {} pids {:?} io {:?}", stats.cpu, stats.memory.usage, stats.pids, stats.io);
    assert!(stats.pids.current >= 1, "pids {:?}", stats.pids);
    assert!(stats.memory.usage > 0 && !stats.memory.stat.is_empty());
    let pids = agent.list_processes("long").await.map_err(|e| e.to_string())?;
    assert!(!pids.pids.is_empty() && pids.init.is_some(), "{pids:?}");
    step("stats + list_processes", t);

    let t = Instant::now();
    let proc = process_json(&["cat"], false);
    agent
        .exec_process("long", "cat1", &serde_json::to_vec(&proc).expect("json"), true)
        .await
        .map_err(|e| e.to_string())?;
    let p = ProcessRef::exec("long", "cat1");
    let mut out = agent.read_stdout(&p).await.map_err(|e| e.to_string())?;
    let stdin = agent.stdin(&p).await.map_err(|e| e.to_string())?;
    stdin.write(b"piped\n").await.map_err(|e| e.to_string())?;
    stdin.finish().await.map_err(|e| e.to_string())?;
    // cat ends only when its stdin pipe is closed in the guest.
    agent.close_stdin(&p).await.map_err(|e| e.to_string())?;
    let exit = agent.wait_process(&p).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.read_to_end().await.map_err(|e| e.to_string())?).into_owned();
    assert_eq!((exit.status, text.as_str()), (0, "piped\n"), "cat after CloseStdin");
    step("stdin pipe + CloseStdin -> cat echoes and exits 0", t);

    let t = Instant::now();
    let init = ProcessRef::init("long");
    agent.signal_process(&init, 9, false).await.map_err(|e| e.to_string())?;
    let exit = agent.wait_process(&init).await.map_err(|e| e.to_string())?;
    assert_eq!(exit.status, 137);
    agent.remove_container("long").await.map_err(|e| e.to_string())?;
    step("SIGKILL -> exit 137", t);

    let t = Instant::now();
    let mut ooms = agent.oom_events().await.map_err(|e| e.to_string())?;
    // A 64 MiB dd buffer in a 16 MiB cgroup: the guest kernel OOM-kills it.
    let limit = serde_json::json!({"memory": {"limit": 16 * 1024 * 1024}});
    let spec = spec_json_with("oom", &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], false, limit);
    agent.create_container("oom", &spec, "rootfs", true).await.map_err(|e| e.to_string())?;
    agent.start_container("oom").await.map_err(|e| e.to_string())?;
    let exit = agent.wait_process(&ProcessRef::init("oom")).await.map_err(|e| e.to_string())?;
    assert_eq!(exit.status, 137, "dd over the memory limit must be killed");
    let event = tokio::time::timeout(Duration::from_secs(30), ooms.next()).await;
    assert!(matches!(&event, Ok(Ok(Some(id))) if id == "oom"), "OOM event: {event:?}");
    agent.remove_container("oom").await.map_err(|e| e.to_string())?;
    step("memory limit exceeded -> killed (137) and an OOM event names the container", t);

    let t = Instant::now();
    let err = agent
        .create_container("missing", &spec_json("missing", &["no-such-binary", "x"], false), "rootfs", true)
        .await
        .expect_err("missing binary must fail");
    let msg = err.to_string();
    assert_eq!(err.code(), Some(RpcCode::FailedPrecondition), "{msg}");
    assert!(msg.contains("no-such-binary"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "missing binary took {:?}", t.elapsed());
    println!("missing binary error: {msg}");
    step("missing binary fails fast naming it", t);

    let t = Instant::now();
    agent.destroy_sandbox().await.map_err(|e| e.to_string())?;
    step("destroy_sandbox", t);
    Ok(())
}

/// The device rules containerd puts in a spec: deny all, then allow null, zero, full, random, urandom, tty,
/// ptmx and the pts.
fn containerd_devices() -> serde_json::Value {
    let allow = |major: i64, minor: Option<i64>| serde_json::json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"});
    serde_json::json!({"devices": [
        {"allow": false, "access": "rwm"},
        allow(1, Some(3)), allow(1, Some(5)), allow(1, Some(7)), allow(1, Some(8)), allow(1, Some(9)),
        allow(5, Some(0)), allow(5, Some(2)), allow(136, None),
    ]})
}
