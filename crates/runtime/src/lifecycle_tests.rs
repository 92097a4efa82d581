//! The sandbox lifecycle against a fake VMM and a fake agent: unprivileged, in milliseconds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use oci_spec::runtime::Spec;
use tokio::sync::mpsc;

use crate::agent::fake::{Call, FakeAgent};
use crate::agent::{AgentError, ProcessRef, Timeouts};
use crate::fake_vm::FakeHypervisor;
use crate::io::IoPaths;
use crate::lifecycle::{ErrorKind, LifecycleError, Status};
use crate::mounts::test_double::RecordingSyscalls;
use crate::process::VM_DIED_STATUS;
use crate::{Exit, Host, Rootfs, Sandbox, SandboxOptions};

/// Short, so a silent agent fails a test in well under a second.
const CALL_TIMEOUT: Duration = Duration::from_millis(300);
/// Bound on every wait in these tests: nothing here should take long.
const WAIT: Duration = Duration::from_secs(10);

struct Pod {
    sandbox: Sandbox,
    agent: FakeAgent,
    hv: Arc<FakeHypervisor>,
    dir: tempfile::TempDir,
}

pub(crate) fn host(agent: &FakeAgent, hv: &Arc<FakeHypervisor>) -> Host {
    Host {
        hypervisor: hv.clone(),
        mounts: Arc::new(RecordingSyscalls::default()),
        agent_dialer: Some(agent.dialer()),
        agent_timeouts: Timeouts { call: CALL_TIMEOUT, container: CALL_TIMEOUT },
        host_cgroups: false,
    }
}

pub(crate) fn options(dir: &Path) -> SandboxOptions {
    let config = types::config::LoadedConfig::from_sources(&[(
        "c.toml".into(),
        types::config::DEFAULT_CONFIGURATION.to_string(),
    )])
    .expect("the shipped configuration loads")
    .config;
    SandboxOptions {
        id: "pod".into(),
        config,
        root: dir.join("run"),
        hostname: "pod".into(),
        dns: Vec::new(),
        netns: None,
        resources: Default::default(),
    }
}

async fn pod() -> Pod {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = FakeAgent::start().await;
    let hv = Arc::new(FakeHypervisor::default());
    let sandbox = Sandbox::start(options(dir.path()), host(&agent, &hv)).await.expect("the sandbox starts");
    Pod { sandbox, agent, hv, dir }
}

impl Pod {
    async fn create(&self, id: &str) {
        let rootfs = self.dir.path().join(id);
        std::fs::create_dir_all(&rootfs).expect("rootfs dir");
        let spec = Spec::default();
        self.sandbox
            .create(id, &spec, &Rootfs::Dir(rootfs), "/bundle", IoPaths::default(), false)
            .await
            .expect("container created");
    }

    /// Starts the process; returns a receiver of the exit `on_exit` got.
    async fn start(&self, id: &str, exec_id: &str) -> mpsc::UnboundedReceiver<Exit> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sandbox
            .start_process(id, exec_id, move |exit| {
                let _ = tx.send(exit);
            })
            .await
            .expect("process starts");
        rx
    }

    async fn exit_of(&self, id: &str, exec_id: &str) -> Exit {
        let exit = tokio::time::timeout(WAIT, self.sandbox.wait(id, exec_id)).await.expect("wait ends");
        exit.expect("wait").expect("an exit, not a delete")
    }
}

fn exec_ref(id: &str, exec_id: &str) -> ProcessRef {
    ProcessRef::exec(id, exec_id)
}

#[tokio::test]
async fn exit_statuses_reach_wait_state_and_on_exit_once() {
    let pod = pod().await;
    pod.create("c1").await;
    assert_eq!(pod.sandbox.state("c1", "").expect("state").status, Status::Created);
    let mut on_exit = pod.start("c1", "").await;
    assert_eq!(pod.sandbox.state("c1", "").expect("state").status, Status::Running);
    let again = pod.sandbox.start_process("c1", "", |_| {}).await.expect_err("started twice");
    assert_eq!(again.kind(), ErrorKind::FailedPrecondition, "{again}");

    pod.agent.exit(&ProcessRef::init("c1"), 3);
    assert_eq!(pod.exit_of("c1", "").await.status, 3);
    let reported = tokio::time::timeout(WAIT, on_exit.recv()).await.expect("on_exit").expect("an exit");
    assert_eq!(reported.status, 3);
    assert!(on_exit.recv().await.is_none(), "on_exit is called once");
    let state = pod.sandbox.state("c1", "").expect("state");
    assert_eq!((state.status, state.exit.map(|e| e.status)), (Status::Stopped, Some(3)));
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn an_exec_id_is_free_again_once_its_process_was_deleted() {
    let pod = pod().await;
    pod.create("c1").await;
    let _init = pod.start("c1", "").await;
    pod.sandbox.exec("c1", "e1", b"{}".to_vec(), IoPaths::default()).expect("exec added");
    let taken = pod.sandbox.exec("c1", "e1", b"{}".to_vec(), IoPaths::default()).expect_err("same id");
    assert_eq!(taken.kind(), ErrorKind::AlreadyExists, "{taken}");
    let _e1 = pod.start("c1", "e1").await;
    let running = pod.sandbox.delete("c1", "e1").await.expect_err("a running exec");
    assert_eq!(running.kind(), ErrorKind::FailedPrecondition, "{running}");

    pod.agent.exit(&exec_ref("c1", "e1"), 7);
    assert_eq!(pod.exit_of("c1", "e1").await.status, 7);
    let deleted = pod.sandbox.delete("c1", "e1").await.expect("delete the exec");
    assert_eq!(deleted.exit.map(|e| e.status), Some(7));
    assert!(!deleted.was_sandbox);
    let gone = pod.sandbox.state("c1", "e1").expect_err("deleted");
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");

    // The same id again, as kubelet's probes and `crictl exec` reuse ids: the delete made the guest forget it.
    assert!(pod.agent.calls().contains(&Call::RemoveProcess(exec_ref("c1", "e1"))), "{:?}", pod.agent.calls());
    pod.sandbox.exec("c1", "e1", b"{}".to_vec(), IoPaths::default()).expect("the id is free again on the host");
    let _again = pod.start("c1", "e1").await;
    let execs = pod.agent.calls().into_iter().filter(|c| matches!(c, Call::ExecProcess(_))).count();
    assert_eq!(execs, 2, "each start is its own ExecProcess");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn a_container_is_killed_then_deleted_and_removed_from_the_guest() {
    let pod = pod().await;
    pod.create("c1").await;
    let _init = pod.start("c1", "").await;
    let running = pod.sandbox.delete("c1", "").await.expect_err("running");
    assert!(matches!(running, LifecycleError::ContainerRunning(_)), "{running}");

    pod.sandbox.kill("c1", "", 9, false).await.expect("kill");
    assert!(pod.agent.calls().contains(&Call::SignalProcess {
        process: ProcessRef::init("c1"),
        signal: 9,
        all: false
    }));
    pod.agent.exit(&ProcessRef::init("c1"), 137);
    assert_eq!(pod.exit_of("c1", "").await.status, 137);
    let finished = pod.sandbox.kill("c1", "", 9, false).await.expect_err("already exited");
    assert_eq!(finished.kind(), ErrorKind::NotFound, "{finished}");

    let deleted = pod.sandbox.delete("c1", "").await.expect("delete");
    assert_eq!(deleted.exit.map(|e| e.status), Some(137));
    assert!(pod.agent.calls().contains(&Call::RemoveContainer { container_id: "c1".into() }));
    assert!(!pod.sandbox.has_containers());
    let gone = pod.sandbox.kill("c1", "", 9, false).await.expect_err("deleted");
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone}");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn a_created_container_killed_before_start_exits_at_once() {
    let pod = pod().await;
    pod.create("c1").await;
    pod.sandbox.kill("c1", "", 15, false).await.expect("kill");
    assert_eq!(pod.exit_of("c1", "").await.status, 128 + 15);
    assert!(!pod.agent.calls().iter().any(|c| matches!(c, Call::SignalProcess { .. })), "nothing to signal yet");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn a_vm_that_dies_ends_every_wait_and_kill_needs_no_agent() {
    let pod = pod().await;
    pod.create("c1").await;
    let mut on_exit = pod.start("c1", "").await;
    pod.sandbox.exec("c1", "e1", b"{}".to_vec(), IoPaths::default()).expect("exec");
    let _e1 = pod.start("c1", "e1").await;

    pod.agent.crash();
    pod.hv.vms()[0].die();
    assert_eq!(pod.exit_of("c1", "").await.status, VM_DIED_STATUS);
    assert_eq!(pod.exit_of("c1", "e1").await.status, VM_DIED_STATUS);
    let reported = tokio::time::timeout(WAIT, on_exit.recv()).await.expect("on_exit").expect("an exit");
    assert_eq!(reported.status, VM_DIED_STATUS);
    // containerd kills and deletes what it still has: neither may hang on the dead agent.
    let kill = tokio::time::timeout(WAIT, pod.sandbox.kill("c1", "", 9, true)).await.expect("kill returns");
    assert!(matches!(kill, Ok(()) | Err(LifecycleError::Finished)), "{kill:?}");
    tokio::time::timeout(WAIT, pod.sandbox.delete("c1", "")).await.expect("delete returns").expect("delete");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn a_silent_agent_fails_calls_within_their_timeout_and_nothing_hangs() {
    let pod = pod().await;
    pod.create("c1").await;
    let _init = pod.start("c1", "").await;
    pod.agent.set_silent(true);
    let started = std::time::Instant::now();
    let err = pod.sandbox.pause("c1").await.expect_err("no answer");
    assert!(matches!(err, LifecycleError::Agent(AgentError::Timeout { .. })), "{err}");
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    assert_eq!(pod.sandbox.state("c1", "").expect("state").status, Status::Running, "not marked paused");
    // The bookkeeping is not held while the agent is silent: other calls answer.
    let err = pod.sandbox.exec("c1", "e1", b"{}".to_vec(), IoPaths::default());
    assert!(err.is_ok(), "{err:?}");

    pod.agent.set_silent(false);
    pod.sandbox.pause("c1").await.expect("answers again");
    assert_eq!(pod.sandbox.state("c1", "").expect("state").status, Status::Paused);
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn oom_reports_are_only_for_own_containers_and_rate_limited() {
    let pod = pod().await;
    pod.create("c1").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    pod.sandbox.forward_oom_events(move |id| {
        let _ = tx.send(id);
    });
    // Let the stream open before the agent reports.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for id in ["other-pods-container", "c1", "c1", "c1"] {
        pod.agent.oom(id);
    }
    let first = tokio::time::timeout(WAIT, rx.recv()).await.expect("a report").expect("an id");
    assert_eq!(first, "c1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "one report per container per second, none for others");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn a_vm_that_fails_to_start_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = FakeAgent::start().await;
    let hv = Arc::new(FakeHypervisor::default());
    hv.fail_starts(Some("no accelerator"));
    let err = Sandbox::start(options(dir.path()), host(&agent, &hv)).await.expect_err("start fails");
    let chain = crate::error_chain(&err);
    assert!(chain.contains("start the VM") && chain.contains("no accelerator"), "{chain}");
    assert!(!dir.path().join("run/pod").exists(), "the sandbox directory is removed");
}

#[tokio::test]
async fn stop_stops_the_vm_and_removes_the_sandbox_directory() {
    let pod = pod().await;
    pod.create("c1").await;
    let root = pod.dir.path().join("run/pod");
    assert!(root.join("state.json").is_file());
    pod.sandbox.stop().await.expect("stop");
    assert!(pod.hv.vms()[0].stopped());
    assert!(!root.exists());
    pod.sandbox.stop().await.expect("stop is idempotent");
}

#[tokio::test]
async fn another_process_finds_the_sandbox_by_id_and_drives_it() {
    let pod = pod().await;
    pod.create("c1").await;
    let _init = pod.start("c1", "").await;
    pod.sandbox.exec("c1", "e1", b"{}".to_vec(), IoPaths::default()).expect("exec added");
    pod.create("c2").await;
    pod.agent.exit(&ProcessRef::init("c1"), 0);
    pod.sandbox.kill("c2", "", 9, false).await.expect("c2 exits before it starts");
    assert_eq!(pod.exit_of("c1", "").await.status, 0);
    let Pod { sandbox, agent, hv, dir } = pod;
    // What another process has: the state file, nothing of this one's memory.
    drop(sandbox);

    let root = dir.path().join("run");
    let sandbox = Sandbox::connect(&root, "pod", host(&agent, &hv), WAIT).await.expect("connects by id");
    assert_eq!(hv.vms().len(), 1, "attached to the running VM, booted none");
    let c1 = sandbox.state("c1", "").expect("c1");
    assert_eq!((c1.status, c1.exit.map(|e| e.status), c1.bundle.as_str()), (Status::Stopped, Some(0), "/bundle"));
    assert_eq!(sandbox.state("c2", "").expect("c2").exit.map(|e| e.status), Some(128 + 9));
    assert_eq!(sandbox.state("c1", "e1").expect("e1").status, Status::Created);
    sandbox.start_process("c1", "e1", |_| {}).await.expect("the exec recorded by the other process starts");
    agent.exit(&exec_ref("c1", "e1"), 4);
    let exit = tokio::time::timeout(WAIT, sandbox.wait("c1", "e1")).await.expect("wait ends").expect("wait");
    assert_eq!(exit.map(|e| e.status), Some(4));
    sandbox.stop().await.expect("stop");
    assert!(hv.vms()[0].stopped());
    assert!(!dir.path().join("run/pod").exists());
    let gone = Sandbox::connect(&root, "pod", host(&agent, &hv), WAIT).await;
    assert!(gone.is_err(), "a stopped sandbox cannot be found");
}

/// A FIFO as containerd's client makes it.
fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// A client attaching to stdin: writes, then closes its writer (the detach).
fn client_writes(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).expect("the shim reads the FIFO");
    f.write_all(data).expect("write");
}

#[tokio::test]
async fn stdin_survives_a_client_detaching_and_closeio_delivers_everything_first() {
    let pod = pod().await;
    let fifo = pod.dir.path().join("c1-stdin");
    mkfifo(&fifo);
    let rootfs = pod.dir.path().join("c1");
    std::fs::create_dir_all(&rootfs).expect("rootfs dir");
    let io = IoPaths { stdin: fifo.display().to_string(), ..IoPaths::default() };
    pod.sandbox.create("c1", &Spec::default(), &Rootfs::Dir(rootfs), "/b", io, false).await.expect("created");
    let init = ProcessRef::init("c1");

    client_writes(&fifo, b"hello\n");
    let written = |want: &'static [u8]| {
        let agent = &pod.agent;
        let init = &init;
        async move {
            tokio::time::timeout(WAIT, async {
                while agent.stdin(init).0 != want {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .is_ok()
        }
    };
    assert!(written(b"hello\n").await, "first write forwarded: {:?}", pod.agent.stdin(&init));
    assert!(!pod.agent.stdin(&init).1, "a detached client does not end the process's stdin");

    // Attach again, write, and CloseIO at once, as `ctr` does at end of input: nothing may be lost.
    client_writes(&fifo, b"hello\n");
    pod.sandbox.close_stdin("c1", "").await.expect("CloseIO");
    assert!(written(b"hello\nhello\n").await, "second write forwarded: {:?}", pod.agent.stdin(&init));
    let closed = tokio::time::timeout(WAIT, async {
        while !pod.agent.stdin(&init).1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(closed.await.is_ok(), "after CloseIO and the last byte, the process reads end of file");
    pod.sandbox.stop().await.expect("stop");
}

#[tokio::test]
async fn without_a_stdin_fifo_the_process_gets_none_and_resize_without_a_terminal_is_a_no_op() {
    let pod = pod().await;
    pod.create("c1").await;
    assert_eq!(pod.agent.stdin(&ProcessRef::init("c1")), (Vec::new(), true), "created without stdin: /dev/null");
    let _init = pod.start("c1", "").await;
    pod.sandbox.resize_pty("c1", "", 40, 120).await.expect("no terminal: nothing to do");
    assert!(!pod.agent.calls().iter().any(|c| matches!(c, Call::ResizeTty { .. })), "{:?}", pod.agent.calls());
    pod.sandbox.stop().await.expect("stop");
}
