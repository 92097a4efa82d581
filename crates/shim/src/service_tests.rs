//! The Task service against a fake VMM and a fake agent: what containerd sends, what it gets back and which
//! events it sees. Unprivileged, in milliseconds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::{Task, TtrpcContext};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, Code};
use runtime::agent::fake::FakeAgent;
use runtime::agent::{ProcessRef, Timeouts};
use runtime::fake_vm::FakeHypervisor;
use runtime::mounts::MountSyscalls;
use runtime::Host;
use tokio::sync::mpsc;

use crate::events::{Event, Events};
use crate::service::{KataTask, Setup};

const WAIT: Duration = Duration::from_secs(10);

/// Mounts nothing: the fake VM reads nothing from the shared directory.
#[derive(Debug)]
struct NoMounts;

impl MountSyscalls for NoMounts {
    fn mount(&self, _: &str, _: &Path, _: Option<&str>, _: nix::mount::MsFlags, _: Option<&str>) -> nix::Result<()> {
        Ok(())
    }

    fn umount(&self, _: &Path, _: nix::mount::MntFlags) -> nix::Result<()> {
        Ok(())
    }

    fn mountinfo(&self) -> std::io::Result<String> {
        Ok(String::new())
    }
}

struct Shim {
    task: KataTask,
    events: mpsc::Receiver<Event>,
    agent: FakeAgent,
    hv: Arc<FakeHypervisor>,
    exit: Arc<ExitSignal>,
    dir: tempfile::TempDir,
}

async fn shim() -> Shim {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = FakeAgent::start().await;
    let hv = Arc::new(FakeHypervisor::default());
    let host = Host {
        hypervisor: hv.clone(),
        mounts: Arc::new(NoMounts),
        agent_dialer: Some(agent.dialer()),
        agent_timeouts: Timeouts { call: Duration::from_millis(300), container: Duration::from_millis(300) },
        host_cgroups: false,
    };
    let (events, rx) = Events::channel();
    let exit = Arc::new(ExitSignal::default());
    let task = KataTask::new(events, exit.clone(), Setup { host, root: dir.path().join("run") });
    Shim { task, events: rx, agent, hv, exit, dir }
}

impl Shim {
    /// A configuration whose files exist (the fake VMM opens none of them), named as containerd's ConfigPath.
    fn options(&self) -> Any {
        let path = self.dir.path().join("configuration.toml");
        let file = "/bin/true";
        let toml = format!("[hypervisor.qemu]\npath = \"{file}\"\nkernel = \"{file}\"\ninitrd = \"{file}\"\n");
        std::fs::write(&path, toml).expect("configuration");
        let path = path.display().to_string();
        let mut value = vec![0x12, u8::try_from(path.len()).expect("short path")];
        value.extend(path.as_bytes());
        Any { type_url: "containerd.runtimeoptions.v1.Options".into(), value, ..Default::default() }
    }

    async fn create(&self, id: &str) -> ttrpc::Result<api::CreateTaskResponse> {
        let bundle = self.dir.path().join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).expect("bundle");
        let spec = serde_json::to_vec(&oci_spec::runtime::Spec::default()).expect("spec");
        std::fs::write(bundle.join("config.json"), spec).expect("config.json");
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            options: Some(self.options()).into(),
            ..Default::default()
        };
        self.task.create(&TtrpcContext::default(), req).await
    }

    async fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::StartResponse> {
        let req = api::StartRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.task.start(&TtrpcContext::default(), req).await
    }

    async fn exec(&self, id: &str, exec_id: &str) -> ttrpc::Result<()> {
        let req = api::ExecProcessRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.task.exec(&TtrpcContext::default(), req).await.map(drop)
    }

    async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let req = api::WaitRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        let waited = tokio::time::timeout(WAIT, self.task.wait(&TtrpcContext::default(), req)).await;
        waited.expect("wait ends").expect("wait").exit_status
    }

    async fn delete(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::DeleteResponse> {
        let req = api::DeleteRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.task.delete(&TtrpcContext::default(), req).await
    }

    async fn state(&self, id: &str, exec_id: &str) -> ttrpc::Result<api::StateResponse> {
        let req = api::StateRequest { id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.task.state(&TtrpcContext::default(), req).await
    }

    /// The topics of the events published so far.
    fn topics(&mut self) -> Vec<&'static str> {
        std::iter::from_fn(|| self.events.try_recv().ok()).map(|(topic, _)| topic).collect()
    }
}

fn code(result: ttrpc::Result<impl std::fmt::Debug>) -> Code {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => status.code(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

#[tokio::test]
async fn a_task_runs_execs_with_reused_ids_and_is_deleted_with_its_vm() {
    let mut shim = shim().await;
    let created = shim.create("pod").await.expect("create");
    assert_eq!(created.pid, 4_194_305, "the VMM's PID stands for the task");
    assert_eq!(code(shim.create("pod").await), Code::ALREADY_EXISTS);
    shim.start("pod", "").await.expect("start");
    assert_eq!(shim.state("pod", "").await.expect("state").status, api::Status::RUNNING.into());

    shim.exec("pod", "e1").await.expect("exec");
    assert_eq!(code(shim.exec("pod", "e1").await), Code::ALREADY_EXISTS);
    shim.start("pod", "e1").await.expect("start exec");
    shim.agent.exit(&ProcessRef::exec("pod", "e1"), 5);
    assert_eq!(shim.wait("pod", "e1").await, 5);
    assert_eq!(shim.delete("pod", "e1").await.expect("delete exec").exit_status, 5);
    assert_eq!(code(shim.state("pod", "e1").await), Code::NOT_FOUND);
    shim.exec("pod", "e1").await.expect("the exec id is free again");

    assert_eq!(code(shim.delete("pod", "").await), Code::FAILED_PRECONDITION, "still running");
    let kill = api::KillRequest { id: "pod".into(), signal: 9, ..Default::default() };
    shim.task.kill(&TtrpcContext::default(), kill).await.expect("kill");
    shim.agent.exit(&ProcessRef::init("pod"), 137);
    assert_eq!(shim.wait("pod", "").await, 137);
    assert_eq!(shim.delete("pod", "").await.expect("delete").exit_status, 137);
    assert!(shim.hv.vms()[0].stopped(), "the sandbox's container takes its VM with it");
    assert_eq!(code(shim.state("pod", "").await), Code::NOT_FOUND);
    assert!(!shim.dir.path().join("run/pod").exists());

    let topics = shim.topics();
    let expected = [
        topics::TASK_CREATE_EVENT_TOPIC,
        topics::TASK_START_EVENT_TOPIC,
        topics::TASK_EXEC_ADDED_EVENT_TOPIC,
        topics::TASK_EXEC_STARTED_EVENT_TOPIC,
        topics::TASK_EXIT_EVENT_TOPIC,
        topics::TASK_EXEC_ADDED_EVENT_TOPIC,
        topics::TASK_EXIT_EVENT_TOPIC,
        topics::TASK_DELETE_EVENT_TOPIC,
    ];
    assert_eq!(topics, expected);

    shim.task.shutdown(&TtrpcContext::default(), api::ShutdownRequest::default()).await.expect("shutdown");
    tokio::time::timeout(WAIT, shim.exit.wait()).await.expect("the shim exits once it has nothing left");
}

#[tokio::test]
async fn a_dead_vm_ends_waits_with_255_and_the_task_can_still_be_deleted() {
    let shim = shim().await;
    shim.create("pod").await.expect("create");
    shim.start("pod", "").await.expect("start");
    shim.agent.crash();
    shim.hv.vms()[0].die();
    assert_eq!(shim.wait("pod", "").await, 255);
    let kill = api::KillRequest { id: "pod".into(), signal: 9, all: true, ..Default::default() };
    let killed = tokio::time::timeout(WAIT, shim.task.kill(&TtrpcContext::default(), kill)).await.expect("answers");
    assert!(killed.is_ok() || code(killed) == Code::NOT_FOUND);
    shim.delete("pod", "").await.expect("delete");
}

#[tokio::test]
async fn a_silent_agent_gives_an_error_naming_the_call_not_a_hang() {
    let shim = shim().await;
    shim.create("pod").await.expect("create");
    shim.start("pod", "").await.expect("start");
    shim.agent.set_silent(true);
    let pause = api::PauseRequest { id: "pod".into(), ..Default::default() };
    let paused = tokio::time::timeout(WAIT, shim.task.pause(&TtrpcContext::default(), pause)).await;
    match paused.expect("answers") {
        Err(ttrpc::Error::RpcStatus(status)) => {
            assert_eq!(status.code(), Code::INTERNAL);
            assert!(
                status.message().contains("PauseContainer") && status.message().contains("timed out"),
                "{status:?}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Calls that need no agent still answer.
    assert_eq!(shim.state("pod", "").await.expect("state").status, api::Status::RUNNING.into());
    shim.agent.set_silent(false);
    shim.hv.vms()[0].die();
    assert_eq!(shim.wait("pod", "").await, 255);
    shim.delete("pod", "").await.expect("delete");
}

#[test]
fn pids_put_the_init_under_the_task_pid_first() {
    use runtime::agent::ProcessList;
    let list = ProcessList { pids: vec![12, 7, 30], init: Some(7) };
    assert_eq!(crate::service::task_pids(&list, 4242), [4242, 12, 30]);
    let exited = ProcessList { pids: vec![12], init: None };
    assert_eq!(crate::service::task_pids(&exited, 4242), [12], "no init: no task pid to report");
}
