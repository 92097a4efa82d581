//! [`FakeAgent`]: a scriptable agent, so host code that talks to the guest can be unit-tested without a VM.
//!
//! It is a real ttrpc server of `kata.agent.v1.Agent`, reached through an [`AgentDialer`] like the real agent. It
//! keeps only what the host can observe (containers, their processes, exit statuses, a few bytes of stdio) and
//! answers with the real agent's status codes (`crates/agent/src/rpc/mod.rs`). The test decides when a process
//! exits ([`FakeAgent::exit`]), whether the agent answers at all ([`FakeAgent::set_silent`]) and when the VM dies
//! ([`FakeAgent::crash`]).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use protocols::agent as pb;
use protocols::agent_ttrpc::{create_agent, Agent};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::AbortHandle;
use ttrpc::r#async::transport::{Listener, Socket};
use ttrpc::r#async::{Server, ServerStreamReceiver, ServerStreamSender, TtrpcContext};
use ttrpc::Code;

use super::convert;
use super::transport::{AgentDialer, DialError};
use super::types::ProcessRef;

/// A call that changes the guest, as the fake received it: recorded on arrival, so also when it failed or was
/// never answered. Queries (Check, WaitProcess, Stats, the output streams, ...) are not recorded. `OnlineCpuMem`
/// carries the vCPUs asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    CreateSandbox,
    DestroySandbox,
    OnlineCpuMem(u32),
    CreateContainer { container_id: String },
    StartContainer { container_id: String },
    RemoveContainer { container_id: String },
    PauseContainer { container_id: String },
    ResumeContainer { container_id: String },
    UpdateContainer { container_id: String },
    ExecProcess(ProcessRef),
    RemoveProcess(ProcessRef),
    SignalProcess { process: ProcessRef, signal: u32, all: bool },
    CloseStdin(ProcessRef),
    ResizeTty { process: ProcessRef, rows: u32, cols: u32 },
}

/// The exit status the real agent reports for a process it killed when its container was removed (SIGKILL).
const KILLED: i32 = 128 + 9;

/// A fake agent serving every connection its [`dialer`](Self::dialer) opens. Must be started, and used, inside a
/// tokio runtime.
pub struct FakeAgent {
    guest: Arc<Guest>,
    dialer: Arc<FakeDialer>,
    /// Held so the server lives as long as the fake.
    _server: Server,
}

impl std::fmt::Debug for FakeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAgent").field("guest", &self.guest).finish_non_exhaustive()
    }
}

impl FakeAgent {
    pub async fn start() -> Self {
        let (connections, incoming) = mpsc::unbounded_channel::<UnixStream>();
        let incoming = futures::stream::unfold(incoming, |mut incoming| async move {
            incoming.recv().await.map(|stream| (Ok::<_, io::Error>(stream), incoming))
        });
        let (silent, _) = watch::channel(false);
        let (oom, _) = broadcast::channel(16);
        let guest = Arc::new(Guest { state: Mutex::default(), silent, oom });
        let mut server =
            Server::new().add_listener(Listener::new(incoming)).register_service(create_agent(guest.clone()));
        // Fails only without a listener, and it has one.
        server.start().await.expect("the fake agent's server starts");
        let dialer = Arc::new(FakeDialer { connections, links: Mutex::default() });
        Self { guest, dialer, _server: server }
    }

    /// Opens a new connection to this agent on each dial.
    pub fn dialer(&self) -> Arc<dyn AgentDialer> {
        self.dialer.clone()
    }

    /// Every state-changing call so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.guest.state().calls.clone()
    }

    /// Makes `process` exit with `status` (exit code, or 128 + signal): WaitProcess answers, and its output streams
    /// end once the host has read what was written. Panics when the agent has no such process.
    pub fn exit(&self, process: &ProcessRef, status: i32) {
        self.guest.with_known(process, |p| p.exit_with(status));
    }

    /// How many WaitProcess calls for `process` the agent holds, so a test can act while one is in flight. Panics
    /// when the agent has no such process.
    pub fn waiters(&self, process: &ProcessRef) -> usize {
        self.guest.with_known(process, |p| p.exit.receiver_count())
    }

    /// Queues `data` on the process's stdout. Panics when the agent has no such process.
    pub fn stdout(&self, process: &ProcessRef, data: &[u8]) {
        self.guest.with_known(process, |p| p.stdout.write(data));
    }

    /// Queues `data` on the process's stderr. Panics when the agent has no such process.
    pub fn stderr(&self, process: &ProcessRef, data: &[u8]) {
        self.guest.with_known(process, |p| p.stderr.write(data));
    }

    /// What the host has written to the process's stdin, and whether it closed it. Panics when the agent has no
    /// such process.
    pub fn stdin(&self, process: &ProcessRef) -> (Vec<u8>, bool) {
        self.guest.with_known(process, |p| (p.stdin.clone(), p.stdin_closed))
    }

    /// Reports an OOM kill in `container_id` on every OomEvents stream.
    pub fn oom(&self, container_id: &str) {
        let _ = self.guest.oom.send(container_id.to_string());
    }

    /// While silent, every call is received (and recorded) but not answered; calls held back answer once the agent
    /// speaks again, like a stalled guest that recovers.
    pub fn set_silent(&self, silent: bool) {
        self.guest.silent.send_replace(silent);
    }

    /// The VM dies: every open connection closes, calls in flight get no answer, and later dials are refused.
    pub fn crash(&self) {
        let mut links = lock(&self.dialer.links);
        links.crashed = true;
        for relay in links.relays.drain(..) {
            relay.abort();
        }
    }
}

/// Each dial makes two socket pairs with a relay between them, so [`FakeAgent::crash`] can cut the connection
/// under both the client and the server.
#[derive(Debug)]
struct FakeDialer {
    connections: mpsc::UnboundedSender<UnixStream>,
    links: Mutex<Links>,
}

#[derive(Debug, Default)]
struct Links {
    crashed: bool,
    relays: Vec<AbortHandle>,
}

#[async_trait]
impl AgentDialer for FakeDialer {
    async fn dial(&self) -> Result<Socket, DialError> {
        let refused = |source| DialError::Connect { path: PathBuf::from("fake agent"), source };
        let mut links = lock(&self.links);
        if links.crashed {
            return Err(refused(io::ErrorKind::ConnectionRefused.into()));
        }
        let (host, mut host_relay) = UnixStream::pair().map_err(refused)?;
        let (mut guest_relay, guest) = UnixStream::pair().map_err(refused)?;
        self.connections.send(guest).map_err(|_| refused(io::ErrorKind::ConnectionRefused.into()))?;
        let relay = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut host_relay, &mut guest_relay).await;
        });
        links.relays.push(relay.abort_handle());
        Ok(Socket::from(host))
    }
}

#[derive(Debug)]
struct Guest {
    state: Mutex<State>,
    silent: watch::Sender<bool>,
    oom: broadcast::Sender<String>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    /// Container id -> exec id ("" for the init process) -> process.
    containers: HashMap<String, HashMap<String, Process>>,
}

#[derive(Debug)]
struct Process {
    exit: watch::Sender<Option<(i32, SystemTime)>>,
    stdout: Output,
    stderr: Output,
    stdin: Vec<u8>,
    stdin_closed: bool,
}

impl Process {
    /// Without `stdin` the process reads /dev/null: nothing can be written to it.
    fn new(stdin: bool) -> Self {
        Self {
            exit: watch::channel(None).0,
            stdout: Output::new(),
            stderr: Output::new(),
            stdin: Vec::new(),
            stdin_closed: !stdin,
        }
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    fn exit_with(&mut self, status: i32) {
        if !self.exited() {
            self.exit.send_replace(Some((status, SystemTime::now())));
        }
        self.stdout.close();
        self.stderr.close();
    }
}

/// One output stream: written by the test, read once by the host (a second reader is refused, as by the real
/// agent), closed at exit.
#[derive(Debug)]
struct Output {
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    rx: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
}

impl Output {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx: Some(tx), rx: Some(rx) }
    }

    fn write(&self, data: &[u8]) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(data.to_vec());
        }
    }

    fn close(&mut self) {
        self.tx = None;
    }
}

type R<T> = ttrpc::Result<T>;

fn status(code: Code, message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

// The real agent's messages (crates/agent/src/sandbox.rs, container.rs).
fn no_container(id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("container '{id}' does not exist"))
}

fn no_exec(exec_id: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("no process with exec id '{exec_id}'"))
}

fn process_ref(container_id: &str, exec_id: &str) -> ProcessRef {
    if exec_id.is_empty() {
        ProcessRef::init(container_id)
    } else {
        ProcessRef::exec(container_id, exec_id)
    }
}

impl Guest {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Records `call`, then holds the answer back while the agent is silent.
    async fn arrive(&self, call: Option<Call>) {
        if let Some(call) = call {
            self.state().calls.push(call);
        }
        let mut silent = self.silent.subscribe();
        // Err only when the sender is gone, which it is not while `self` lives.
        let _ = silent.wait_for(|silent| !silent).await;
    }

    fn with_container<T>(&self, id: &str, f: impl FnOnce(&mut HashMap<String, Process>) -> T) -> R<T> {
        self.state().containers.get_mut(id).map(f).ok_or_else(|| no_container(id))
    }

    fn with_process<T>(&self, container_id: &str, exec_id: &str, f: impl FnOnce(&mut Process) -> T) -> R<T> {
        self.with_container(container_id, |processes| processes.get_mut(exec_id).map(f))?
            .ok_or_else(|| no_exec(exec_id))
    }

    /// For the test's scripting calls, where a missing process is a mistake in the test.
    fn with_known<T>(&self, process: &ProcessRef, f: impl FnOnce(&mut Process) -> T) -> T {
        let exec_id = process.exec_id.as_deref().unwrap_or_default();
        match self.with_process(&process.container_id, exec_id, f) {
            Ok(t) => t,
            Err(err) => panic!("the fake agent has no process {process:?}: {err}"),
        }
    }

    /// What RemoveContainer does to what still runs in a container: the real agent kills it.
    fn kill_all(processes: &mut HashMap<String, Process>) {
        for p in processes.values_mut() {
            p.exit_with(KILLED);
        }
    }

    async fn read_output(
        &self,
        req: pb::ProcessRequest,
        stderr: bool,
        tx: ServerStreamSender<pb::OutputChunk>,
    ) -> R<()> {
        let rx = self.with_process(&req.container_id, &req.exec_id, |p| {
            if stderr {
                p.stderr.rx.take()
            } else {
                p.stdout.rx.take()
            }
        })?;
        let mut rx = rx.ok_or_else(|| status(Code::ALREADY_EXISTS, "the output is already attached".to_string()))?;
        while let Some(data) = rx.recv().await {
            tx.send(&pb::OutputChunk { data, ..Default::default() }).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Agent for Guest {
    async fn check(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::Version> {
        self.arrive(None).await;
        Ok(pb::Version {
            agent_version: "fake".into(),
            protocol_version: protocols::PROTOCOL_VERSION,
            ..Default::default()
        })
    }

    async fn guest_details(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::GuestDetails> {
        self.arrive(None).await;
        Ok(pb::GuestDetails { agent_version: "fake".into(), ..Default::default() })
    }

    async fn create_sandbox(&self, _: &TtrpcContext, _: pb::CreateSandboxRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::CreateSandbox)).await;
        Ok(pb::Empty::new())
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::Empty> {
        self.arrive(Some(Call::DestroySandbox)).await;
        let mut state = self.state();
        for processes in state.containers.values_mut() {
            Self::kill_all(processes);
        }
        state.containers.clear();
        Ok(pb::Empty::new())
    }

    async fn set_guest_time(&self, _: &TtrpcContext, _: pb::SetGuestTimeRequest) -> R<pb::Empty> {
        self.arrive(None).await;
        Ok(pb::Empty::new())
    }

    async fn online_cpu_mem(&self, _: &TtrpcContext, req: pb::OnlineCpuMemRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::OnlineCpuMem(req.vcpus))).await;
        Ok(pb::Empty::new())
    }

    async fn create_container(&self, _: &TtrpcContext, req: pb::CreateContainerRequest) -> R<pb::Empty> {
        let id = req.container_id;
        self.arrive(Some(Call::CreateContainer { container_id: id.clone() })).await;
        let mut state = self.state();
        if state.containers.contains_key(&id) {
            return Err(status(Code::ALREADY_EXISTS, format!("container '{id}' already exists")));
        }
        state.containers.insert(id, HashMap::from([(String::new(), Process::new(req.stdin))]));
        Ok(pb::Empty::new())
    }

    async fn start_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::StartContainer { container_id: req.container_id.clone() })).await;
        self.with_container(&req.container_id, |_| pb::Empty::new())
    }

    async fn remove_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::RemoveContainer { container_id: req.container_id.clone() })).await;
        let mut processes =
            self.state().containers.remove(&req.container_id).ok_or_else(|| no_container(&req.container_id))?;
        Self::kill_all(&mut processes);
        Ok(pb::Empty::new())
    }

    async fn pause_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::PauseContainer { container_id: req.container_id.clone() })).await;
        self.with_container(&req.container_id, |_| pb::Empty::new())
    }

    async fn resume_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::ResumeContainer { container_id: req.container_id.clone() })).await;
        self.with_container(&req.container_id, |_| pb::Empty::new())
    }

    async fn update_container(&self, _: &TtrpcContext, req: pb::UpdateContainerRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::UpdateContainer { container_id: req.container_id.clone() })).await;
        self.with_container(&req.container_id, |_| pb::Empty::new())
    }

    async fn list_processes(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::ProcessList> {
        self.arrive(None).await;
        self.with_container(&req.container_id, |_| pb::ProcessList::new())
    }

    async fn stats(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::ContainerStats> {
        self.arrive(None).await;
        self.with_container(&req.container_id, |_| pb::ContainerStats::new())
    }

    async fn exec_process(&self, _: &TtrpcContext, req: pb::ExecProcessRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::ExecProcess(process_ref(&req.container_id, &req.exec_id)))).await;
        self.with_container(&req.container_id, |processes| {
            // Like the real agent, an exec id stays taken until RemoveProcess forgets the exited exec.
            if req.exec_id.is_empty() || processes.contains_key(&req.exec_id) {
                return Err(status(Code::ALREADY_EXISTS, format!("exec id '{}' is already in use", req.exec_id)));
            }
            processes.insert(req.exec_id.clone(), Process::new(req.stdin));
            Ok(pb::Empty::new())
        })?
    }

    async fn remove_process(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::RemoveProcess(process_ref(&req.container_id, &req.exec_id)))).await;
        self.with_container(&req.container_id, |processes| {
            match processes.get(&req.exec_id) {
                _ if req.exec_id.is_empty() => return Err(status(Code::NOT_FOUND, "no exec id".to_string())),
                None => return Err(status(Code::NOT_FOUND, format!("no process with exec id '{}'", req.exec_id))),
                Some(p) if !p.exited() => {
                    return Err(status(Code::FAILED_PRECONDITION, format!("exec '{}' is still running", req.exec_id)))
                }
                Some(_) => {}
            }
            processes.remove(&req.exec_id);
            Ok(pb::Empty::new())
        })?
    }

    async fn signal_process(&self, _: &TtrpcContext, req: pb::SignalProcessRequest) -> R<pb::Empty> {
        let process = process_ref(&req.container_id, &req.exec_id);
        self.arrive(Some(Call::SignalProcess { process, signal: req.signal, all: req.all })).await;
        // Only recorded: the test decides whether the process exits.
        if req.all {
            self.with_container(&req.container_id, |_| pb::Empty::new())
        } else {
            self.with_process(&req.container_id, &req.exec_id, |_| pb::Empty::new())
        }
    }

    async fn wait_process(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::ProcessExit> {
        self.arrive(None).await;
        let mut exit = self.with_process(&req.container_id, &req.exec_id, |p| p.exit.subscribe())?;
        // The sender goes only with its container, and removal sets the exit first.
        let (status, at) =
            exit.wait_for(Option::is_some).await.ok().and_then(|e| *e).unwrap_or((255, SystemTime::now()));
        Ok(pb::ProcessExit { exit_status: status, exited_at_unix_nanos: convert::nanos(at), ..Default::default() })
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: pb::ProcessRequest,
        tx: ServerStreamSender<pb::OutputChunk>,
    ) -> R<()> {
        self.arrive(None).await;
        self.read_output(req, false, tx).await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: pb::ProcessRequest,
        tx: ServerStreamSender<pb::OutputChunk>,
    ) -> R<()> {
        self.arrive(None).await;
        self.read_output(req, true, tx).await
    }

    async fn write_stdin(&self, _: &TtrpcContext, mut rx: ServerStreamReceiver<pb::StdinChunk>) -> R<pb::Empty> {
        self.arrive(None).await;
        while let Some(chunk) = rx.recv().await? {
            self.with_process(&chunk.container_id, &chunk.exec_id, |p| {
                if p.stdin_closed || p.exited() {
                    return Err(status(Code::FAILED_PRECONDITION, "stdin is closed".to_string()));
                }
                p.stdin.extend(&chunk.data);
                Ok(())
            })??;
        }
        Ok(pb::Empty::new())
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::Empty> {
        self.arrive(Some(Call::CloseStdin(process_ref(&req.container_id, &req.exec_id)))).await;
        self.with_process(&req.container_id, &req.exec_id, |p| p.stdin_closed = true)?;
        Ok(pb::Empty::new())
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: pb::ResizeTtyRequest) -> R<pb::Empty> {
        let process = process_ref(&req.container_id, &req.exec_id);
        self.arrive(Some(Call::ResizeTty { process, rows: req.rows, cols: req.cols })).await;
        self.with_process(&req.container_id, &req.exec_id, |_| pb::Empty::new())
    }

    async fn update_interface(&self, _: &TtrpcContext, req: pb::Interface) -> R<pb::Interface> {
        self.arrive(None).await;
        Ok(req)
    }

    async fn update_routes(&self, _: &TtrpcContext, _: pb::UpdateRoutesRequest) -> R<pb::Empty> {
        self.arrive(None).await;
        Ok(pb::Empty::new())
    }

    async fn add_arp_neighbors(&self, _: &TtrpcContext, _: pb::AddArpNeighborsRequest) -> R<pb::Empty> {
        self.arrive(None).await;
        Ok(pb::Empty::new())
    }

    async fn oom_events(&self, _: &TtrpcContext, _: pb::Empty, tx: ServerStreamSender<pb::OomEvent>) -> R<()> {
        let mut events = self.oom.subscribe();
        self.arrive(None).await;
        loop {
            match events.recv().await {
                Ok(container_id) => tx.send(&pb::OomEvent { container_id, ..Default::default() }).await?,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
