//! What a sandbox persists of its containers, and how another process restores them: each change and each exit
//! rewrites the sandbox's state file ([`Persister`]), and [`restore_containers`] rebuilds the bookkeeping from it.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::io::IoPaths;
use crate::lifecycle::{lock, process_ref, Container, Containers};
use crate::process::{Exit, Phase, Process};
use crate::sandbox::Sandbox;
use crate::state::{ContainerRecord, ProcessRecord, SandboxState};

impl Container {
    fn record(&self, id: &str) -> ContainerRecord {
        let execs = self.execs.iter().map(|(exec_id, p)| (exec_id.clone(), record(p))).collect();
        ContainerRecord {
            id: id.to_string(),
            bundle: self.bundle.clone(),
            is_sandbox: self.is_sandbox,
            paused: self.paused,
            init: record(&self.init),
            execs,
            limits: self.limits,
        }
    }

    /// A container found again from its record: its processes in their recorded states, their IO not
    /// connected (whoever held it is gone).
    fn restore(record: &ContainerRecord) -> Self {
        Container {
            bundle: record.bundle.clone(),
            is_sandbox: record.is_sandbox,
            paused: record.paused,
            init: restore(&record.init),
            execs: record.execs.iter().map(|(id, p)| (id.clone(), restore(p))).collect(),
            limits: record.limits,
        }
    }
}

fn record(process: &Process) -> ProcessRecord {
    ProcessRecord {
        started: process.started,
        exit_status: process.exit().map(|e| e.status),
        exec_spec: process.exec_spec.clone(),
    }
}

fn restore(record: &ProcessRecord) -> Process {
    let mut process = Process::new(IoPaths::default(), record.exec_spec.clone());
    process.started = record.started;
    if let Some(status) = record.exit_status {
        process.set_exit(Exit { status, at: SystemTime::now() });
    }
    process
}

/// Writes the sandbox's state file with the containers as they are now. Shared with the tasks that wait for
/// processes, which save each exit.
#[derive(Debug, Clone)]
pub(crate) struct Persister {
    pub(crate) path: std::path::PathBuf,
    pub(crate) base: Arc<Mutex<SandboxState>>,
    pub(crate) containers: Containers,
    /// Set once the sandbox is being stopped: its directory goes, and nothing may write into it again.
    pub(crate) stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Persister {
    /// A persister of `state` to `path`, with no containers yet.
    pub(crate) fn new(path: std::path::PathBuf, state: SandboxState) -> Self {
        Persister {
            path,
            base: Arc::new(Mutex::new(state)),
            containers: Containers::default(),
            stopped: Arc::default(),
        }
    }

    pub(crate) fn save(&self) {
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut state = lock(&self.base).clone();
        state.containers = lock(&self.containers).iter().map(|(id, c)| c.record(id)).collect();
        state.containers.sort_by(|a, b| a.id.cmp(&b.id));
        if let Err(e) = state.save(&self.path) {
            tracing::warn!(sandbox = %state.sandbox_id, error = %crate::error_chain(&e), "cannot persist the sandbox state");
        }
    }
}

/// Containers from their persisted records; the started, not exited processes get a task that waits for them.
pub(crate) fn restore_containers(sandbox: &Sandbox, records: &[ContainerRecord]) {
    let mut containers = sandbox.containers();
    for record in records {
        let mut container = Container::restore(record);
        let waiting = std::iter::once((String::new(), &mut container.init))
            .chain(container.execs.iter_mut().map(|(id, p)| (id.clone(), p)));
        for (exec_id, process) in waiting {
            if process.phase() == Phase::Running {
                let persister = sandbox.persister.clone();
                let pref = process_ref(&record.id, &exec_id);
                process.spawn_waiter(sandbox.agent().clone(), sandbox.vm_exit(), pref, move |_| persister.save());
            }
        }
        containers.insert(record.id.clone(), container);
    }
}
