//! The containerd Task service: a translation of each Task call into `runtime`'s sandbox lifecycle and back,
//! plus the events containerd expects. The state machines live in `runtime::lifecycle`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::{Task, TtrpcContext};
use containerd_shim_protos::api::{self, Status};
use containerd_shim_protos::events::task as task_events;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, Code};
use oci_spec::runtime::Spec;
use runtime::io::IoPaths;
use runtime::mounts::MountSpec;
use runtime::{error_chain, ErrorKind, Exit, Host, LifecycleError, Rootfs, Sandbox, SandboxOptions};
use tokio::sync::Mutex;

use crate::events::{timestamp, Events};
use crate::metrics;
use crate::options;

type TtrpcResult<T> = ttrpc::Result<T>;

pub fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// An error for containerd: the whole chain of causes, with the code its kind calls for.
fn lifecycle(e: LifecycleError) -> ttrpc::Error {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorKind::Internal => Code::INTERNAL,
    };
    status(code, error_chain(&e))
}

fn internal(e: &dyn std::error::Error) -> ttrpc::Error {
    status(Code::INTERNAL, error_chain(e))
}

#[derive(Debug, Default)]
struct State {
    sandbox: Option<Arc<Sandbox>>,
    /// A sandbox VM is booting. The lock is not held across a boot, so other requests (State, Connect,
    /// Shutdown) are answered meanwhile; this keeps a second sandbox from starting.
    starting: bool,
}

impl State {
    fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.sandbox.clone().ok_or_else(|| status(Code::FAILED_PRECONDITION, "the sandbox VM is not running"))
    }
}

/// Where the shim's sandboxes live and what they run on.
#[derive(Debug, Clone)]
pub struct Setup {
    pub host: Host,
    /// Parent of the per-sandbox directories, normally [`runtime::paths::DEFAULT_ROOT`].
    pub root: PathBuf,
}

#[derive(Clone)]
pub struct KataTask {
    state: Arc<Mutex<State>>,
    events: Events,
    exit: Arc<ExitSignal>,
    setup: Setup,
}

impl std::fmt::Debug for KataTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KataTask").finish_non_exhaustive()
    }
}

impl KataTask {
    pub fn new(events: Events, exit: Arc<ExitSignal>, setup: Setup) -> Self {
        KataTask { state: Arc::default(), events, exit, setup }
    }

    /// The sandbox, if one runs: for the calls that answer without one too.
    async fn current(&self) -> Option<Arc<Sandbox>> {
        self.state.lock().await.sandbox.clone()
    }

    async fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.state.lock().await.sandbox()
    }

    /// The sandbox of container `id`, for calls that answer NOT_FOUND (as runc does) once it is gone.
    async fn sandbox_of(&self, id: &str) -> TtrpcResult<Arc<Sandbox>> {
        self.current().await.ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    async fn start_sandbox(&self, id: &str, spec: &Spec, config_path: Option<PathBuf>) -> TtrpcResult<Arc<Sandbox>> {
        let annotations: BTreeMap<String, String> =
            spec.annotations().clone().unwrap_or_default().into_iter().collect();
        let config = runtime::pod_config::resolve(id, config_path, &annotations)
            .map_err(|e| status(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        let netns = runtime::network::pod_netns(spec).map_err(|e| status(Code::INVALID_ARGUMENT, error_chain(&e)))?;
        let resources =
            runtime::resources::SandboxResources::of_spec(spec).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        let debug = config.hypervisor.enable_debug || config.runtime.enable_debug;
        let opts = SandboxOptions {
            id: id.to_string(),
            config,
            root: self.setup.root.clone(),
            hostname: spec.hostname().clone().unwrap_or_default(),
            dns: Vec::new(),
            netns: netns.path().map(Path::to_path_buf),
            resources,
        };
        let sandbox = Sandbox::start(opts, self.setup.host.clone()).await.map_err(|e| internal(&e))?;
        tracing::info!(sandbox = id, "sandbox started");
        // containerd's `-debug` sets the shim's log level (the `log` facade its logger is installed on).
        if debug || log::log_enabled!(log::Level::Debug) {
            sandbox.forward_console();
        }
        let events = self.events.clone();
        sandbox.forward_oom_events(move |container_id| {
            let ev = task_events::TaskOOM { container_id, ..Default::default() };
            events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
        });
        Ok(Arc::new(sandbox))
    }

    /// Publishes TaskExit when a process exits; for an init nothing else: containerd deletes the task.
    fn on_exit(&self, container_id: &str, exec_id: &str, pid: u32) -> impl FnOnce(Exit) + Send + 'static {
        let events = self.events.clone();
        let id = if exec_id.is_empty() { container_id.to_string() } else { exec_id.to_string() };
        let container_id = container_id.to_string();
        move |exit| {
            let mut ev = task_events::TaskExit::new();
            ev.id = id;
            ev.container_id = container_id;
            ev.pid = pid;
            ev.exit_status = exit.status;
            ev.exited_at = MessageField::some(timestamp(exit.at));
            events.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev));
        }
    }
}

fn rootfs(req: &api::CreateTaskRequest) -> Rootfs {
    if req.rootfs.is_empty() {
        return Rootfs::Dir(Path::new(&req.bundle).join("rootfs"));
    }
    Rootfs::Mounts(
        req.rootfs
            .iter()
            .map(|m| MountSpec { kind: m.type_.clone(), source: m.source.clone(), options: m.options.clone() })
            .collect(),
    )
}

#[async_trait]
impl Task for KataTask {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        let spec_path = Path::new(&req.bundle).join("config.json");
        let spec = Spec::load(&spec_path)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("{}: {}", spec_path.display(), error_chain(&e))))?;
        let starts_sandbox = options::starts_sandbox(spec.annotations().as_ref());
        let sandbox = if starts_sandbox {
            {
                let mut state = self.state.lock().await;
                if state.sandbox.is_some() || state.starting {
                    return Err(status(Code::ALREADY_EXISTS, "this shim already runs a sandbox"));
                }
                state.starting = true;
            }
            let config_path = req
                .options
                .as_ref()
                .and_then(options::config_path)
                .or_else(|| std::env::var_os(options::CONFIG_PATH_ENV).map(PathBuf::from));
            let started = self.start_sandbox(&req.id, &spec, config_path).await;
            let mut state = self.state.lock().await;
            state.starting = false;
            let sandbox = started?;
            state.sandbox = Some(sandbox.clone());
            sandbox
        } else {
            self.sandbox().await?
        };
        let io = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = sandbox.create(&req.id, &spec, &rootfs(&req), &req.bundle, io.clone(), starts_sandbox).await;
        if let Err(e) = created {
            if starts_sandbox {
                if let Err(stop) = sandbox.stop().await {
                    tracing::warn!(sandbox = %req.id, error = %error_chain(&stop), "stopping the sandbox after a failed create");
                }
                self.state.lock().await.sandbox = None;
            }
            return Err(lifecycle(e));
        }
        let pid = sandbox.vmm_pid();
        let ev = task_events::TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(task_events::TaskIO {
                stdin: io.stdin,
                stdout: io.stdout,
                stderr: io.stderr,
                terminal: io.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.events.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev));
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let sandbox = self.sandbox().await?;
        let pid = sandbox.vmm_pid();
        let on_exit = self.on_exit(&req.id, &req.exec_id, pid);
        sandbox.start_process(&req.id, &req.exec_id, on_exit).await.map_err(lifecycle)?;
        if req.exec_id.is_empty() {
            let ev = task_events::TaskStart { container_id: req.id.clone(), pid, ..Default::default() };
            self.events.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev));
        } else {
            let ev = task_events::TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.events.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev));
        }
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let sandbox = self.sandbox_of(&req.id).await?;
        let pid = sandbox.vmm_pid();
        let deleted = sandbox.delete(&req.id, &req.exec_id).await.map_err(lifecycle)?;
        if !req.exec_id.is_empty() {
            return Ok(delete_response(pid, deleted.exit));
        }
        if deleted.was_sandbox {
            // The sandbox's own container goes with the VM: no guest round trip to remove it first.
            let mut state = self.state.lock().await;
            if let Some(sandbox) = state.sandbox.take() {
                tracing::info!(sandbox = %req.id, "sandbox stopping");
                sandbox.stop().await.map_err(|e| internal(&e))?;
                tracing::info!(sandbox = %req.id, "sandbox stopped");
            }
        }
        let mut ev =
            task_events::TaskDelete { container_id: req.id.clone(), id: req.id.clone(), pid, ..Default::default() };
        if let Some(e) = deleted.exit {
            ev.exit_status = e.status;
            ev.exited_at = MessageField::some(timestamp(e.at));
        }
        self.events.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev));
        Ok(delete_response(pid, deleted.exit))
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let sandbox = self.sandbox().await?;
        let list = sandbox.pids(&req.id).await.map_err(lifecycle)?;
        let processes = task_pids(&list, sandbox.vmm_pid())
            .into_iter()
            .map(|pid| api::ProcessInfo { pid, ..Default::default() })
            .collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.sandbox().await?.pause(&req.id).await.map_err(lifecycle)?;
        let ev = task_events::TaskPaused { container_id: req.id, ..Default::default() };
        self.events.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.sandbox().await?.resume(&req.id).await.map_err(lifecycle)?;
        let ev = task_events::TaskResumed { container_id: req.id, ..Default::default() };
        self.events.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        Err(status(Code::UNIMPLEMENTED, "checkpoint is not supported by kata-rs: the container runs inside a VM"))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let sandbox = self.sandbox().await?;
        sandbox.kill(&req.id, &req.exec_id, req.signal, req.all).await.map_err(lifecycle)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let sandbox = self.sandbox().await?;
        let json = req.spec.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        let io = IoPaths { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        sandbox.exec(&req.id, &req.exec_id, json, io).map_err(lifecycle)?;
        let ev = task_events::TaskExecAdded { container_id: req.id, exec_id: req.exec_id, ..Default::default() };
        self.events.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let sandbox = self.sandbox().await?;
        sandbox.resize_pty(&req.id, &req.exec_id, req.height, req.width).await.map_err(lifecycle)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        self.sandbox().await?.close_stdin(&req.id, &req.exec_id).await.map_err(lifecycle)?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let json = req.resources.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        self.sandbox().await?.update(&req.id, &json).await.map_err(lifecycle)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let sandbox = self.sandbox_of(&req.id).await?;
        let exit = sandbox.wait(&req.id, &req.exec_id).await.map_err(lifecycle)?;
        let exit = exit.ok_or_else(|| status(Code::NOT_FOUND, "process was deleted"))?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let stats = self.sandbox().await?.stats(&req.id).await.map_err(lifecycle)?;
        let any = metrics::metrics_any(&stats).map_err(|e| internal(&e))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let sandbox = self.sandbox_of(&req.id).await?;
        let process = sandbox.state(&req.id, &req.exec_id).map_err(lifecycle)?;
        let status = match process.status {
            runtime::Status::Created => Status::CREATED,
            runtime::Status::Running => Status::RUNNING,
            runtime::Status::Paused => Status::PAUSED,
            runtime::Status::Stopped => Status::STOPPED,
        };
        let mut resp = api::StateResponse {
            id: req.id.clone(),
            bundle: process.bundle,
            pid: sandbox.vmm_pid(),
            status: status.into(),
            stdin: process.io.stdin,
            stdout: process.io.stdout,
            stderr: process.io.stderr,
            terminal: process.io.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        if let Some(exit) = process.exit {
            resp.exit_status = exit.status;
            resp.exited_at = MessageField::some(timestamp(exit.at));
        }
        Ok(resp)
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.current().await.map(|s| s.vmm_pid()).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        let state = self.state.lock().await;
        if state.starting || state.sandbox.as_ref().is_some_and(|s| s.has_containers()) {
            return Ok(Empty::new());
        }
        if let Some(sandbox) = &state.sandbox {
            if let Err(e) = sandbox.stop().await {
                tracing::warn!(sandbox = %sandbox.id(), error = %error_chain(&e), "stopping the sandbox at shutdown");
            }
        }
        self.exit.signal();
        Ok(Empty::new())
    }
}

/// A container's processes as containerd expects them: the init under the task's own pid (the one Create
/// returned), first, then the others under their guest pids.
pub(crate) fn task_pids(list: &runtime::agent::ProcessList, task_pid: u32) -> Vec<u32> {
    let others = list.pids.iter().filter(|&&p| Some(p) != list.init).filter_map(|&p| u32::try_from(p).ok());
    list.init.map(|_| task_pid).into_iter().chain(others).collect()
}

fn delete_response(pid: u32, exit: Option<Exit>) -> api::DeleteResponse {
    let mut resp = api::DeleteResponse { pid, ..Default::default() };
    if let Some(e) = exit {
        resp.exit_status = e.status;
        resp.exited_at = MessageField::some(timestamp(e.at));
    }
    resp
}
