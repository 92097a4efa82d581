//! The containers of a sandbox and their processes (each container's init and its execs): their states, exit
//! statuses and IO, in the words of containerd's Task API but free of its types, so every front end (the shim,
//! a CLI) drives the same state machine.
//!
//! A process is Created, then Running once started, then Stopped once its exit is known. The bookkeeping lock is
//! never held across a call to the agent: a start marks the process as started first, so a second start fails
//! at once instead of racing it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use oci_spec::runtime::Spec;
use tokio::sync::watch;

use crate::agent::{AgentError, ContainerStats, ProcessList, ProcessRef};
use crate::io::{self, IoPaths};
use crate::process::{Exit, Phase, Process};
use crate::resources::Limits;
use crate::sandbox::{Rootfs, Sandbox, SandboxError};

/// At most one OOM report per container in this interval.
const OOM_EVENT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("container {0} not found")]
    NoContainer(String),
    #[error("exec {exec} not found in container {container}")]
    NoExec { container: String, exec: String },
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("exec {0} already exists")]
    ExecExists(String),
    #[error("process {0:?} was already started")]
    AlreadyStarted(String),
    #[error("exec {0} is still running")]
    ExecRunning(String),
    #[error("container {0} is still running; kill it first")]
    ContainerRunning(String),
    #[error("process already finished")]
    Finished,
    #[error("resources are not OCI LinuxResources JSON")]
    BadResources(#[source] serde_json::Error),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Sandbox(Box<SandboxError>),
    #[error(transparent)]
    Resize(#[from] crate::resize::ResizeError),
}

impl From<SandboxError> for LifecycleError {
    fn from(e: SandboxError) -> Self {
        LifecycleError::Sandbox(Box::new(e))
    }
}

/// How a front end should report a [`LifecycleError`] (containerd maps these to its own codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Internal,
}

impl LifecycleError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoContainer(_) | Self::NoExec { .. } | Self::Finished => ErrorKind::NotFound,
            Self::ContainerExists(_) | Self::ExecExists(_) => ErrorKind::AlreadyExists,
            Self::AlreadyStarted(_) | Self::ExecRunning(_) | Self::ContainerRunning(_) | Self::Resize(_) => {
                ErrorKind::FailedPrecondition
            }
            Self::BadResources(_) => ErrorKind::InvalidArgument,
            Self::Agent(_) | Self::Sandbox(_) => ErrorKind::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, LifecycleError>;

/// A container of the sandbox, as the front end created it.
#[derive(Debug)]
pub(crate) struct Container {
    pub(crate) bundle: String,
    /// The sandbox's own container (the pod's pause container): it goes with the VM.
    pub(crate) is_sandbox: bool,
    pub(crate) paused: bool,
    pub(crate) init: Process,
    pub(crate) execs: HashMap<String, Process>,
    /// Its CPU and memory limits, as the VM's size counts them.
    pub(crate) limits: crate::resources::Limits,
}

impl Container {
    fn process(&self, id: &str, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| no_exec(id, exec_id))
    }

    fn process_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs.get_mut(exec_id).ok_or_else(|| no_exec(id, exec_id))
    }
}

fn no_exec(container: &str, exec: &str) -> LifecycleError {
    LifecycleError::NoExec { container: container.to_string(), exec: exec.to_string() }
}

/// The containers of one sandbox, shared with the tasks that wait for their processes.
pub(crate) type Containers = Arc<Mutex<HashMap<String, Container>>>;

/// Where a process is, for the front end's State call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// A process as the front end reports it.
#[derive(Debug, Clone)]
pub struct ProcessState {
    pub bundle: String,
    pub status: Status,
    pub io: IoPaths,
    pub exit: Option<Exit>,
}

/// What [`Sandbox::delete`] removed.
#[derive(Debug, Clone, Copy)]
pub struct Deleted {
    pub exit: Option<Exit>,
    /// It was the sandbox's own container: the caller stops the sandbox next.
    pub was_sandbox: bool,
}

/// The agent's name for a task process: the container's init when `exec_id` is empty.
pub fn process_ref(container_id: &str, exec_id: &str) -> ProcessRef {
    if exec_id.is_empty() {
        ProcessRef::init(container_id)
    } else {
        ProcessRef::exec(container_id, exec_id)
    }
}

impl Sandbox {
    pub(crate) fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        lock(&self.containers)
    }

    fn with_process<T>(&self, id: &str, exec_id: &str, f: impl FnOnce(&Container, &Process) -> T) -> Result<T> {
        let containers = self.containers();
        let container = containers.get(id).ok_or_else(|| LifecycleError::NoContainer(id.to_string()))?;
        Ok(f(container, container.process(id, exec_id)?))
    }

    /// Whether the sandbox still has containers (the front end may shut down once it has none).
    pub fn has_containers(&self) -> bool {
        !self.containers().is_empty()
    }

    /// Creates a container (rootfs and volumes shared, created in the guest, not started) and connects its init's
    /// IO. `is_sandbox` marks the sandbox's own container, which goes with the VM.
    pub async fn create(
        &self,
        id: &str,
        spec: &Spec,
        rootfs: &Rootfs,
        bundle: &str,
        io_paths: IoPaths,
        is_sandbox: bool,
    ) -> Result<()> {
        if self.containers().contains_key(id) {
            return Err(LifecycleError::ContainerExists(id.to_string()));
        }
        // A pod's other containers join its sandbox container's IPC, UTS and (shared) PID namespaces.
        let pod_sandbox = if is_sandbox {
            None
        } else {
            self.containers().iter().find(|(_, c)| c.is_sandbox).map(|(id, _)| id.clone())
        };
        // A CRI pod's sandbox container carries no workload of its own: the pod's sizing covers the pod.
        let pod_sized = lock(&self.persister.base).sizing.is_some_and(|s| s.pod.is_some());
        let limits = if is_sandbox && pod_sized { Limits::default() } else { Limits::of_spec(spec) };
        if !is_sandbox {
            // The sandbox container was counted when the VM started. One that does not fit runs in what the
            // VM has (its limit in the guest still holds): refusing it would fail pods on a VM that cannot grow.
            if let Err(e) = self.fit(id, limits).await {
                tracing::warn!(sandbox = %self.id(), container = %id, error = %crate::error_chain(&e), "the VM cannot hold the container's limits; it runs in what the VM has");
            }
        }
        let stdin = !io_paths.stdin.is_empty();
        self.create_container(id, spec, rootfs, stdin, pod_sandbox.as_deref()).await?;
        tracing::info!(sandbox = %self.id(), container = %id, "container created in the guest");
        let mut init = Process::new(io_paths, None);
        match io::attach(self.agent(), &ProcessRef::init(id), &init.io).await {
            Ok(copies) => {
                init.outputs = copies.outputs;
                init.stdin = copies.stdin;
            }
            Err(e) => {
                let _ = self.remove_container(id).await;
                return Err(e.into());
            }
        }
        let container =
            Container { bundle: bundle.to_string(), is_sandbox, paused: false, init, execs: HashMap::new(), limits };
        let mut containers = self.containers();
        if containers.contains_key(id) {
            // Created twice at once: the other call won; ours is already in the guest under the same id, and
            // removing it would remove theirs.
            return Err(LifecycleError::ContainerExists(id.to_string()));
        }
        containers.insert(id.to_string(), container);
        drop(containers);
        self.persister.save();
        Ok(())
    }

    /// Adds an exec process to a container (not started). An exec id can be used again once its process was
    /// deleted.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: Vec<u8>, io_paths: IoPaths) -> Result<()> {
        let mut containers = self.containers();
        let container = containers.get_mut(id).ok_or_else(|| LifecycleError::NoContainer(id.to_string()))?;
        if container.execs.contains_key(exec_id) {
            return Err(LifecycleError::ExecExists(exec_id.to_string()));
        }
        container.execs.insert(exec_id.to_string(), Process::new(io_paths, Some(process_json)));
        drop(containers);
        self.persister.save();
        Ok(())
    }

    /// Starts a container's init (`exec_id` empty) or one of its execs, and the task that waits for its exit:
    /// `on_exit` is called once with it (after the process's output was copied).
    pub async fn start_process(
        &self,
        id: &str,
        exec_id: &str,
        on_exit: impl FnOnce(Exit) + Send + 'static,
    ) -> Result<()> {
        let (exec_spec, io_paths) = {
            let mut containers = self.containers();
            let container = containers.get_mut(id).ok_or_else(|| LifecycleError::NoContainer(id.to_string()))?;
            let process = container.process_mut(id, exec_id)?;
            if process.phase() != Phase::Created {
                return Err(LifecycleError::AlreadyStarted(exec_id.to_string()));
            }
            process.started = true;
            (process.exec_spec.clone(), process.io.clone())
        };
        let pref = process_ref(id, exec_id);
        let started = async {
            if exec_id.is_empty() {
                self.agent().start_container(id).await?;
                return Ok(None);
            }
            let stdin = !io_paths.stdin.is_empty();
            self.agent().exec_process(id, exec_id, &exec_spec.unwrap_or_default(), stdin).await?;
            Ok::<_, LifecycleError>(Some(io::attach(self.agent(), &pref, &io_paths).await?))
        }
        .await;
        let mut containers = self.containers();
        let process = containers.get_mut(id).and_then(|c| c.process_mut(id, exec_id).ok());
        let Some(process) = process else {
            // Deleted while starting (a VM that died makes containerd clean up): nothing left to wait for.
            return started.map(|_| ());
        };
        match started {
            Ok(copies) => {
                if let Some(copies) = copies {
                    process.outputs = copies.outputs;
                    process.stdin = copies.stdin;
                }
                let persister = self.persister.clone();
                let on_exit = move |exit| {
                    persister.save();
                    on_exit(exit);
                };
                process.spawn_waiter(self.agent().clone(), self.vm_exit(), pref, on_exit);
                drop(containers);
                self.persister.save();
                Ok(())
            }
            Err(e) => {
                process.started = false;
                Err(e)
            }
        }
    }

    /// Signals a process. A never-started init is marked exited (128 + signal) at once, as nothing runs in the
    /// guest yet; after the VM died there is nothing left to signal.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let phase = self.with_process(id, exec_id, |_, process| {
            let phase = process.phase();
            if phase == Phase::Created && exec_id.is_empty() {
                process.set_exit(Exit { status: 128 + signal, at: SystemTime::now() });
            }
            phase
        })?;
        match phase {
            Phase::Stopped => return Err(LifecycleError::Finished),
            Phase::Created if exec_id.is_empty() => {
                self.persister.save();
                return Ok(());
            }
            _ => {}
        }
        if self.vm_exit().borrow().is_some() {
            return Ok(());
        }
        self.agent().signal_process(&process_ref(id, exec_id), signal, all).await?;
        Ok(())
    }

    /// Deletes a stopped exec, or a stopped container (removed from the guest and its mounts released, unless
    /// it is the sandbox's own container, which goes with the VM).
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted> {
        if !exec_id.is_empty() {
            return self.delete_exec(id, exec_id).await;
        }
        let (exit, was_sandbox) = {
            let mut containers = self.containers();
            let container = containers.get_mut(id).ok_or_else(|| LifecycleError::NoContainer(id.to_string()))?;
            if container.init.phase() == Phase::Running {
                return Err(LifecycleError::ContainerRunning(id.to_string()));
            }
            let exit = container.init.exit();
            let was_sandbox = container.is_sandbox;
            containers.remove(id);
            (exit, was_sandbox)
        };
        self.persister.save();
        if !was_sandbox {
            if let Err(e) = self.remove_container(id).await {
                tracing::warn!(sandbox = %self.id(), container = %id, error = %crate::error_chain(&e), "remove container");
            }
        }
        Ok(Deleted { exit, was_sandbox })
    }

    async fn delete_exec(&self, id: &str, exec_id: &str) -> Result<Deleted> {
        let (exit, started) = {
            let mut containers = self.containers();
            let container = containers.get_mut(id).ok_or_else(|| LifecycleError::NoContainer(id.to_string()))?;
            let process = container.process(id, exec_id)?;
            if process.phase() == Phase::Running {
                return Err(LifecycleError::ExecRunning(exec_id.to_string()));
            }
            let found = (process.exit(), process.started);
            container.execs.remove(exec_id);
            found
        };
        self.persister.save();
        // The guest forgets it too, so a client may use the id again (as runc allows).
        if started && self.vm_exit().borrow().is_none() {
            if let Err(e) = self.agent().remove_process(&process_ref(id, exec_id)).await {
                tracing::warn!(sandbox = %self.id(), container = %id, exec = %exec_id, error = %crate::error_chain(&e), "remove exec in the guest");
            }
        }
        Ok(Deleted { exit, was_sandbox: false })
    }

    /// A watch that turns `Some` with the process's exit.
    pub fn subscribe(&self, id: &str, exec_id: &str) -> Result<watch::Receiver<Option<Exit>>> {
        self.with_process(id, exec_id, |_, process| process.subscribe())
    }

    /// Waits for the process to exit. `None` when it was deleted meanwhile.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Option<Exit>> {
        let mut exit = self.subscribe(id, exec_id)?;
        Ok(exit.wait_for(Option::is_some).await.ok().and_then(|exit| *exit))
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessState> {
        self.with_process(id, exec_id, |container, process| {
            let status = match process.phase() {
                Phase::Created => Status::Created,
                Phase::Running if container.paused => Status::Paused,
                Phase::Running => Status::Running,
                Phase::Stopped => Status::Stopped,
            };
            ProcessState { bundle: container.bundle.clone(), status, io: process.io.clone(), exit: process.exit() }
        })
    }

    /// Ends the process's stdin (CloseIO): once the front end's writers are closed and what they wrote was
    /// delivered, the process reads end of file.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let forwarding = {
            let mut containers = self.containers();
            let container = containers.get_mut(id).ok_or_else(|| LifecycleError::NoContainer(id.to_string()))?;
            let process = container.process_mut(id, exec_id)?;
            process.stdin.as_mut().map(io::StdinCopy::close).is_some()
        };
        if forwarding {
            // The forwarding closes the process's stdin itself, after the last byte.
            return Ok(());
        }
        let pref = process_ref(id, exec_id);
        if let Err(e) = self.agent().close_stdin(&pref).await {
            tracing::debug!(sandbox = %self.id(), container = %id, exec = %exec_id, error = %crate::error_chain(&e), "close stdin");
        }
        Ok(())
    }

    /// Resizes the process's terminal; a process without one has nothing to resize (runc's shim ignores it too).
    pub async fn resize_pty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        if !self.with_process(id, exec_id, |_, process| process.io.terminal)? {
            return Ok(());
        }
        Ok(self.agent().resize_tty(&process_ref(id, exec_id), rows, cols).await?)
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.set_paused(id, true).await
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.set_paused(id, false).await
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        self.with_process(id, "", |_, _| ())?;
        if paused {
            self.agent().pause_container(id).await?;
        } else {
            self.agent().resume_container(id).await?;
        }
        if let Some(container) = self.containers().get_mut(id) {
            container.paused = paused;
        }
        self.persister.save();
        Ok(())
    }

    /// Changes a container's resources (`resources_json` is OCI `LinuxResources`): the VM grows first when the
    /// new limits need more than it has (refused, with the reason, when it cannot), then the guest's cgroup.
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let resources = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(resources_json)
            .map_err(LifecycleError::BadResources)?;
        let limits = self.with_process(id, "", |container, _| container.limits.updated(&resources))?;
        self.fit(id, limits).await?;
        self.agent().update_container(id, resources_json).await?;
        if let Some(container) = self.containers().get_mut(id) {
            container.limits = limits;
        }
        self.persister.save();
        Ok(())
    }

    pub async fn stats(&self, id: &str) -> Result<ContainerStats> {
        self.with_process(id, "", |_, _| ())?;
        Ok(self.agent().stats(id).await?)
    }

    /// The guest PIDs of a container's processes, and which of them is its init.
    pub async fn pids(&self, id: &str) -> Result<ProcessList> {
        self.with_process(id, "", |_, _| ())?;
        Ok(self.agent().list_processes(id).await?)
    }

    /// Calls `report` with the id of each container the agent reports OOM-killed, for the life of the sandbox.
    /// The agent is untrusted: only this sandbox's own containers are reported, at most once per container per
    /// [`OOM_EVENT_INTERVAL`], so a hostile guest can neither mark other pods' containers nor flood the caller.
    pub fn forward_oom_events(&self, report: impl Fn(String) + Send + 'static) {
        let agent = self.agent().clone();
        let containers = self.containers.clone();
        let sandbox = self.id().to_string();
        tokio::spawn(async move {
            let mut stream = match agent.oom_events().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%sandbox, error = %crate::error_chain(&e), "OOM events unavailable");
                    return;
                }
            };
            let mut last: HashMap<String, Instant> = HashMap::new();
            while let Ok(Some(container_id)) = stream.next().await {
                if !lock(&containers).contains_key(&container_id) {
                    tracing::warn!(%sandbox, "the agent reported an OOM kill of {container_id:.80?}, not a container of this sandbox; ignored");
                    continue;
                }
                let now = Instant::now();
                if last.get(&container_id).is_some_and(|at| now.duration_since(*at) < OOM_EVENT_INTERVAL) {
                    continue;
                }
                last.insert(container_id.clone(), now);
                report(container_id);
            }
        });
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock leaves plain bookkeeping behind; keep going rather than cascade.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
