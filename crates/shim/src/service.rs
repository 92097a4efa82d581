//! The containerd Task service: translates task requests into sandbox and agent calls.

use std::collections::{BTreeMap, HashMap};
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
use hypervisor::Hypervisor;
use oci_spec::runtime::Spec;
use runtime::agent::ProcessRef;
use runtime::mounts::{MountSpec, Syscalls};
use runtime::{paths, Rootfs, Sandbox, SandboxOptions};
use tokio::sync::Mutex;
use types::config::ConfigSearch;

use crate::events::{timestamp, Events};
use crate::io::{self, IoPaths};
use crate::metrics;
use crate::options;
use crate::process::{Exit, Phase, Process};

type TtrpcResult<T> = ttrpc::Result<T>;

/// At most one TaskOOM per container in this interval.
const OOM_EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    status(Code::INTERNAL, e.to_string())
}

#[derive(Debug)]
struct Container {
    bundle: String,
    is_sandbox: bool,
    paused: bool,
    init: Process,
    execs: HashMap<String, Process>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec_id} not found")))
    }

    fn process_mut(&mut self, exec_id: &str) -> TtrpcResult<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec_id} not found")))
    }
}

#[derive(Debug, Default)]
struct State {
    sandbox: Option<Arc<Sandbox>>,
    /// A sandbox VM is booting. The state lock is not held across a boot, so other requests (State, Connect,
    /// Shutdown) are answered meanwhile; this keeps a second sandbox from starting.
    starting: bool,
    containers: HashMap<String, Container>,
}

impl State {
    fn container(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers.get(id).ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn container_mut(&mut self, id: &str) -> TtrpcResult<&mut Container> {
        self.containers.get_mut(id).ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.sandbox.clone().ok_or_else(|| status(Code::FAILED_PRECONDITION, "the sandbox VM is not running"))
    }
}

#[derive(Clone)]
pub struct KataTask {
    state: Arc<Mutex<State>>,
    events: Events,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for KataTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KataTask").finish_non_exhaustive()
    }
}

impl KataTask {
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> Self {
        KataTask { state: Arc::default(), events, exit }
    }

    /// Qemu's PID stands for every process: the guest's PIDs mean nothing on the host.
    fn pid(sandbox: &Sandbox) -> u32 {
        sandbox.vm().pids().first().map(|p| p.pid).unwrap_or(0)
    }

    async fn start_sandbox(&self, id: &str, spec: &Spec, config_path: Option<PathBuf>) -> TtrpcResult<Arc<Sandbox>> {
        let search = ConfigSearch::standard(config_path);
        let mut loaded = search.load().map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let annotations: BTreeMap<String, String> =
            spec.annotations().clone().unwrap_or_default().into_iter().collect();
        loaded.apply_annotations(&annotations).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        loaded.validate().map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        for w in &loaded.warnings {
            log::warn!("configuration: {w}");
        }
        if loaded.vm_annotated() && loaded.config.factory.enable_template {
            // A pod spec must never make the node create (or pick) a template of its own choosing.
            log::info!("sandbox {id}: its annotations change the VM, so it boots on its own, not from the VM template");
            loaded.config.factory.enable_template = false;
        }
        let netns = runtime::network::pod_netns(spec).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let opts = SandboxOptions {
            id: id.to_string(),
            config: loaded.config,
            root: PathBuf::from(paths::DEFAULT_ROOT),
            hostname: spec.hostname().clone().unwrap_or_default(),
            dns: Vec::new(),
            netns: netns.path().map(Path::to_path_buf),
        };
        let debug = opts.config.hypervisor.enable_debug
            || opts.config.runtime.enable_debug
            || log::log_enabled!(log::Level::Debug);
        let sandbox = Sandbox::start(opts, Arc::new(Syscalls)).await.map_err(internal)?;
        log::info!("sandbox {id} started");
        if debug {
            crate::console::forward(sandbox.vm().console(), id.to_string());
        }
        self.forward_oom_events(&sandbox);
        Ok(Arc::new(sandbox))
    }

    /// Publishes TaskOOM for the OOM kills the agent reports, for the life of the sandbox. The agent is
    /// untrusted: only this shim's own containers are reported, at most one event per container per
    /// [`OOM_EVENT_INTERVAL`], so a hostile guest can neither mark another pod's containers OOM-killed nor
    /// flood containerd.
    fn forward_oom_events(&self, sandbox: &Sandbox) {
        let agent = sandbox.agent().clone();
        let events = self.events.clone();
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut stream = match agent.oom_events().await {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("OOM events unavailable: {e}");
                    return;
                }
            };
            let mut last: HashMap<String, std::time::Instant> = HashMap::new();
            while let Ok(Some(container_id)) = stream.next().await {
                if !state.lock().await.containers.contains_key(&container_id) {
                    log::warn!(
                        "the agent reported an OOM kill of {:.80?}, not a container of this sandbox; ignored",
                        container_id
                    );
                    continue;
                }
                let now = std::time::Instant::now();
                if last.get(&container_id).is_some_and(|at| now.duration_since(*at) < OOM_EVENT_INTERVAL) {
                    continue;
                }
                last.insert(container_id.clone(), now);
                let ev = task_events::TaskOOM { container_id, ..Default::default() };
                events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
            }
        });
    }

    /// Publishes TaskExit and, for an init process, nothing else: containerd deletes the task.
    fn on_exit(&self, container_id: String, exec_id: String, pid: u32) -> impl FnOnce(Exit) + Send + 'static {
        let events = self.events.clone();
        move |exit| {
            let mut ev = task_events::TaskExit::new();
            ev.id = if exec_id.is_empty() { container_id.clone() } else { exec_id };
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
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("{}: {e}", spec_path.display())))?;
        let annotations = spec.annotations().clone();
        let starts_sandbox = options::starts_sandbox(annotations.as_ref());
        let sandbox = if starts_sandbox {
            {
                let mut state = self.state.lock().await;
                if state.containers.contains_key(&req.id) {
                    return Err(status(Code::ALREADY_EXISTS, format!("container {} already exists", req.id)));
                }
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
            self.state.lock().await.sandbox()?
        };
        let mut state = self.state.lock().await;
        if state.containers.contains_key(&req.id) {
            return Err(status(Code::ALREADY_EXISTS, format!("container {} already exists", req.id)));
        }
        let io_paths = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let created = async {
            sandbox.create_container(&req.id, &spec, &rootfs(&req)).await.map_err(internal)?;
            log::info!("container {} created in the guest", req.id);
            io::attach(sandbox.agent(), &ProcessRef::init(&req.id), &io_paths).await.map_err(internal)
        }
        .await;
        let copies = match created {
            Ok(c) => c,
            Err(e) => {
                if starts_sandbox {
                    let _ = sandbox.stop().await;
                    state.sandbox = None;
                } else {
                    let _ = sandbox.remove_container(&req.id).await;
                }
                return Err(e);
            }
        };
        let mut init = Process::new(io_paths.clone(), None);
        init.outputs = copies.outputs;
        init.stdin = copies.stdin;
        let pid = Self::pid(&sandbox);
        state.containers.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                is_sandbox: starts_sandbox,
                paused: false,
                init,
                execs: HashMap::new(),
            },
        );
        let mut ev = task_events::TaskCreate::new();
        ev.container_id = req.id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut task_io = task_events::TaskIO::new();
        task_io.stdin = io_paths.stdin;
        task_io.stdout = io_paths.stdout;
        task_io.stderr = io_paths.stderr;
        task_io.terminal = io_paths.terminal;
        ev.io = MessageField::some(task_io);
        ev.pid = pid;
        self.events.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev));
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let mut state = self.state.lock().await;
        let sandbox = state.sandbox()?;
        let agent = sandbox.agent().clone();
        let pid = Self::pid(&sandbox);
        let on_exit = self.on_exit(req.id.clone(), req.exec_id.clone(), pid);
        let container = state.container_mut(&req.id)?;
        let process = container.process_mut(&req.exec_id)?;
        if process.phase() != Phase::Created {
            return Err(status(Code::FAILED_PRECONDITION, format!("process {:?} was already started", req.exec_id)));
        }
        let pref = process_ref(&req.id, &req.exec_id);
        if req.exec_id.is_empty() {
            agent.start_container(&req.id).await.map_err(internal)?;
        } else {
            let json = process.exec_spec.clone().unwrap_or_default();
            agent.exec_process(&req.id, &req.exec_id, &json).await.map_err(internal)?;
            let copies = io::attach(&agent, &pref, &process.io).await.map_err(internal)?;
            process.outputs = copies.outputs;
            process.stdin = copies.stdin;
        }
        process.started = true;
        process.spawn_waiter(agent, sandbox.vm_exit(), pref, on_exit);
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
        let mut state = self.state.lock().await;
        let sandbox = state.sandbox.clone();
        let pid = sandbox.as_deref().map(Self::pid).unwrap_or(0);
        let container = state.container_mut(&req.id)?;
        if !req.exec_id.is_empty() {
            let process = container.process(&req.exec_id)?;
            if process.phase() == Phase::Running {
                return Err(status(Code::FAILED_PRECONDITION, format!("exec {} is still running", req.exec_id)));
            }
            let exit = process.exit();
            container.execs.remove(&req.exec_id);
            return Ok(delete_response(pid, exit));
        }
        if container.init.phase() == Phase::Running {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is still running; kill it first", req.id),
            ));
        }
        let exit = container.init.exit();
        let is_sandbox = container.is_sandbox;
        if let Some(sandbox) = sandbox.as_ref().filter(|_| !is_sandbox) {
            if let Err(e) = sandbox.remove_container(&req.id).await {
                log::warn!("remove container {}: {e}", req.id);
            }
        }
        state.containers.remove(&req.id);
        if is_sandbox {
            // The sandbox's own container goes with the VM: no guest round trip to remove it first.
            if let Some(sandbox) = state.sandbox.take() {
                log::info!("sandbox {} stopping", req.id);
                sandbox.stop().await.map_err(internal)?;
                log::info!("sandbox {} stopped", req.id);
            }
        }
        let mut ev = task_events::TaskDelete::new();
        ev.container_id = req.id.clone();
        ev.id = req.id.clone();
        ev.pid = pid;
        if let Some(e) = exit {
            ev.exit_status = e.status;
            ev.exited_at = MessageField::some(timestamp(e.at));
        }
        self.events.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev));
        Ok(delete_response(pid, exit))
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let sandbox = self.state.lock().await.sandbox()?;
        let pids = sandbox.agent().list_processes(&req.id).await.map_err(internal)?;
        let processes = pids
            .into_iter()
            .map(|pid| api::ProcessInfo { pid: u32::try_from(pid).unwrap_or(0), ..Default::default() })
            .collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        let mut state = self.state.lock().await;
        let sandbox = state.sandbox()?;
        sandbox.agent().pause_container(&req.id).await.map_err(internal)?;
        state.container_mut(&req.id)?.paused = true;
        let ev = task_events::TaskPaused { container_id: req.id, ..Default::default() };
        self.events.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        let mut state = self.state.lock().await;
        let sandbox = state.sandbox()?;
        sandbox.agent().resume_container(&req.id).await.map_err(internal)?;
        state.container_mut(&req.id)?.paused = false;
        let ev = task_events::TaskResumed { container_id: req.id, ..Default::default() };
        self.events.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        Err(status(Code::UNIMPLEMENTED, "checkpoint is not supported by kata-rs: the container runs inside a VM"))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let state = self.state.lock().await;
        let sandbox = state.sandbox()?;
        let process = state.container(&req.id)?.process(&req.exec_id)?;
        match process.phase() {
            Phase::Stopped => return Err(status(Code::NOT_FOUND, "process already finished")),
            Phase::Created if req.exec_id.is_empty() => {
                // Never started: nothing runs in the guest yet, so the kill is its exit.
                process.set_exit(Exit { status: 128 + req.signal, at: std::time::SystemTime::now() });
                return Ok(Empty::new());
            }
            _ => {}
        }
        if sandbox.vm_exit().borrow().is_some() {
            return Ok(Empty::new());
        }
        let pref = process_ref(&req.id, &req.exec_id);
        sandbox.agent().signal_process(&pref, req.signal, req.all).await.map_err(internal)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let mut state = self.state.lock().await;
        let container = state.container_mut(&req.id)?;
        if container.execs.contains_key(&req.exec_id) {
            return Err(status(Code::ALREADY_EXISTS, format!("exec {} already exists", req.exec_id)));
        }
        let json = req.spec.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        let io_paths = IoPaths { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        container.execs.insert(req.exec_id.clone(), Process::new(io_paths, Some(json)));
        let ev = task_events::TaskExecAdded { container_id: req.id, exec_id: req.exec_id, ..Default::default() };
        self.events.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev));
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        let sandbox = self.state.lock().await.sandbox()?;
        let pref = process_ref(&req.id, &req.exec_id);
        sandbox.agent().resize_tty(&pref, req.height, req.width).await.map_err(internal)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let mut state = self.state.lock().await;
        let sandbox = state.sandbox()?;
        let process = state.container_mut(&req.id)?.process_mut(&req.exec_id)?;
        if let Some(h) = process.stdin.take() {
            h.abort();
        }
        let pref = process_ref(&req.id, &req.exec_id);
        if let Err(e) = sandbox.agent().close_stdin(&pref).await {
            log::debug!("close stdin of {pref:?}: {e}");
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let sandbox = self.state.lock().await.sandbox()?;
        let json = req.resources.as_ref().map(|any| any.value.clone()).unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("resources are not OCI LinuxResources JSON: {e}")))?;
        sandbox.agent().update_container(&req.id, &json).await.map_err(internal)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut exit_rx = {
            let state = self.state.lock().await;
            state.container(&req.id)?.process(&req.exec_id)?.subscribe()
        };
        let exit = exit_rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| status(Code::NOT_FOUND, "process was deleted"))?
            .ok_or_else(|| internal("exit missing"))?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let sandbox = self.state.lock().await.sandbox()?;
        let stats = sandbox.agent().stats(&req.id).await.map_err(internal)?;
        let any = metrics::metrics_any(&stats).map_err(internal)?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let state = self.state.lock().await;
        let pid = state.sandbox.as_deref().map(Self::pid).unwrap_or(0);
        let container = state.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let status = match process.phase() {
            Phase::Created => Status::CREATED,
            Phase::Running if container.paused => Status::PAUSED,
            Phase::Running => Status::RUNNING,
            Phase::Stopped => Status::STOPPED,
        };
        let mut resp = api::StateResponse {
            id: req.id.clone(),
            bundle: container.bundle.clone(),
            pid,
            status: status.into(),
            stdin: process.io.stdin.clone(),
            stdout: process.io.stdout.clone(),
            stderr: process.io.stderr.clone(),
            terminal: process.io.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        if let Some(exit) = process.exit() {
            resp.exit_status = exit.status;
            resp.exited_at = MessageField::some(timestamp(exit.at));
        }
        Ok(resp)
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let state = self.state.lock().await;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: state.sandbox.as_deref().map(Self::pid).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        let state = self.state.lock().await;
        if state.containers.is_empty() && !state.starting {
            if let Some(sandbox) = &state.sandbox {
                let _ = sandbox.stop().await;
            }
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

/// The agent's name for a task process: the container's init when `exec_id` is empty.
fn process_ref(container_id: &str, exec_id: &str) -> ProcessRef {
    if exec_id.is_empty() {
        ProcessRef::init(container_id)
    } else {
        ProcessRef::exec(container_id, exec_id)
    }
}

fn delete_response(pid: u32, exit: Option<Exit>) -> api::DeleteResponse {
    let mut resp = api::DeleteResponse { pid, ..Default::default() };
    if let Some(e) = exit {
        resp.exit_status = e.status;
        resp.exited_at = MessageField::some(timestamp(e.at));
    }
    resp
}
