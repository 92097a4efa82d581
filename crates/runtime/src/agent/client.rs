//! `AgentClient`: the host side of `kata.agent.v1.Agent`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use protocols::agent as pb;
use protocols::agent_ttrpc::AgentClient as RpcClient;
use ttrpc::r#async::{ClientStreamReceiver, ClientStreamSender};

use super::convert::{self, ConvertError};
use super::transport::{AgentDialer, DialError, HybridVsockDialer, SerialDialer};
use super::types::*;

/// The status code the agent answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcCode {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Unimplemented,
    DeadlineExceeded,
    Internal,
    Other(i32),
}

impl From<ttrpc::Code> for RpcCode {
    fn from(c: ttrpc::Code) -> Self {
        match c {
            ttrpc::Code::NOT_FOUND => Self::NotFound,
            ttrpc::Code::ALREADY_EXISTS => Self::AlreadyExists,
            ttrpc::Code::INVALID_ARGUMENT => Self::InvalidArgument,
            ttrpc::Code::FAILED_PRECONDITION => Self::FailedPrecondition,
            ttrpc::Code::UNIMPLEMENTED => Self::Unimplemented,
            ttrpc::Code::DEADLINE_EXCEEDED => Self::DeadlineExceeded,
            ttrpc::Code::INTERNAL => Self::Internal,
            other => Self::Other(other as i32),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("the agent did not answer within {timeout:?} (last error: {last})")]
    ConnectTimeout { timeout: Duration, last: String },
    #[error("agent call {call} failed ({code:?}): {message}")]
    Rpc { call: &'static str, code: RpcCode, message: String },
    #[error("agent call {call} timed out after {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("agent call {call} failed in transport")]
    Transport {
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    NotReady(#[from] super::ready::ReadyError),
}

impl AgentError {
    /// The agent's status code, when it answered with one.
    pub fn code(&self) -> Option<RpcCode> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_ttrpc(call: &'static str, err: ttrpc::Error) -> Self {
        match err {
            ttrpc::Error::RpcStatus(s) => {
                let code = s.code();
                if code == ttrpc::Code::DEADLINE_EXCEEDED {
                    return Self::Timeout { call, after: Duration::ZERO };
                }
                Self::Rpc { call, code: code.into(), message: s.message().to_string() }
            }
            other => Self::Transport { call, source: other },
        }
    }
}

type Result<T> = std::result::Result<T, AgentError>;

/// Call timeouts. Calls that wait for the workload (WaitProcess, streams) have none.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Every short call: Check, Signal, Stats, ...
    pub call: Duration,
    /// CreateContainer / ExecProcess / StartContainer / RemoveContainer, which fork in the guest.
    pub container: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { call: Duration::from_secs(10), container: Duration::from_secs(60) }
    }
}

/// A connected client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    rpc: RpcClient,
    timeouts: Timeouts,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient").field("timeouts", &self.timeouts).finish_non_exhaustive()
    }
}

/// How long one Check attempt may take while the guest boots.
const CHECK_ATTEMPT: Duration = Duration::from_secs(2);
const RETRY_PAUSE: Duration = Duration::from_millis(50);

fn ctx(t: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(t.as_nanos()).unwrap_or(i64::MAX))
}

fn no_timeout() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

impl AgentClient {
    /// Connects over hybrid vsock (`uds_path` of vhost-device-vsock or similar) and waits until
    /// the agent answers Check, retrying until `timeout` passes (the guest may still be booting).
    pub async fn connect(uds_path: impl Into<PathBuf>, port: u32, timeout: Duration) -> Result<Self> {
        Self::connect_with(Arc::new(HybridVsockDialer { uds_path: uds_path.into(), port }), timeout).await
    }

    /// Connects over the agent's virtio-serial port (QEMU's socket at `path`) and waits until the agent
    /// answers Check, at most `timeout`.
    pub async fn connect_serial(path: impl Into<PathBuf>, timeout: Duration) -> Result<Self> {
        Self::connect_with(Arc::new(SerialDialer { path: path.into() }), timeout).await
    }

    /// Waits for the agent's readiness signal (bound with [`ReadySignal::bind`] before the VM started), then
    /// connects; `timeout` bounds both.
    pub async fn connect_when_ready(
        ready: &super::ready::ReadySignal,
        uds_path: impl Into<PathBuf>,
        port: u32,
        timeout: Duration,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        ready.wait(timeout).await?;
        Self::connect(uds_path, port, deadline.saturating_duration_since(Instant::now())).await
    }

    /// Dials until the agent answers Check or `timeout` passes.
    ///
    /// A dial is never abandoned while its `CONNECT` is pending: vhost-device-vsock queues a connection
    /// request until the guest's vsock driver takes it, and a request whose host side was closed while still
    /// queued can wedge every later connection of that VM (seen under heavy load). So the dial waits for the
    /// daemon's answer ("OK", or the connection closed because nothing listens yet), bounded only by the
    /// overall deadline; only Check, on an established connection, has a per-attempt timeout.
    pub async fn connect_with(dialer: Arc<dyn AgentDialer>, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt made");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(AgentError::ConnectTimeout { timeout, last });
            }
            match tokio::time::timeout(remaining, dialer.dial()).await {
                Err(_) => {
                    last = "the vsock daemon never answered CONNECT".to_string();
                    continue;
                }
                Ok(Err(err)) => last = protocols::error_chain(&AgentError::Dial(err)),
                Ok(Ok(socket)) => {
                    let attempt = if dialer.single_session() { remaining } else { remaining.min(CHECK_ATTEMPT) };
                    match tokio::time::timeout(attempt, Self::check_new(socket, attempt)).await {
                        Ok(Ok(client)) => return Ok(client),
                        Ok(Err(err)) => last = protocols::error_chain(&err),
                        Err(_) => last = format!("Check did not answer within {attempt:?}"),
                    }
                }
            }
            tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    async fn check_new(socket: ttrpc::r#async::transport::Socket, attempt: Duration) -> Result<Self> {
        let client = Self { rpc: RpcClient::new(ttrpc::r#async::Client::new(socket)), timeouts: Timeouts::default() };
        client.rpc.check(ctx(attempt), &pb::Empty::new()).await.map_err(|e| AgentError::from_ttrpc("Check", e))?;
        Ok(client)
    }

    /// One call bounded by `timeout`, which both ends enforce: the agent answers DEADLINE_EXCEEDED when its handler
    /// overruns, the ttrpc client gives up by itself with a transport error, whichever comes first. Past the
    /// deadline either is this call's [`AgentError::Timeout`].
    async fn timed<T, F>(
        &self,
        call: &'static str,
        timeout: Duration,
        rpc: impl FnOnce(ttrpc::context::Context) -> F,
    ) -> Result<T>
    where
        F: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let started = Instant::now();
        rpc(ctx(timeout)).await.map_err(|err| match AgentError::from_ttrpc(call, err) {
            AgentError::Timeout { .. } => AgentError::Timeout { call, after: timeout },
            AgentError::Transport { .. } if started.elapsed() >= timeout => {
                AgentError::Timeout { call, after: timeout }
            }
            other => other,
        })
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub async fn check(&self) -> Result<AgentVersion> {
        let req = pb::Empty::new();
        let v = self.timed("Check", self.timeouts.call, |ctx| self.rpc.check(ctx, &req)).await?;
        Ok(convert::version(v))
    }

    pub async fn guest_details(&self) -> Result<GuestDetails> {
        let req = pb::Empty::new();
        let d = self.timed("GuestDetails", self.timeouts.call, |ctx| self.rpc.guest_details(ctx, &req)).await?;
        Ok(convert::guest_details(d))
    }

    pub async fn create_sandbox(&self, setup: &SandboxSetup) -> Result<()> {
        let req = convert::sandbox_request(setup);
        self.timed("CreateSandbox", self.timeouts.container, |ctx| self.rpc.create_sandbox(ctx, &req)).await?;
        Ok(())
    }

    pub async fn destroy_sandbox(&self) -> Result<()> {
        let req = pb::Empty::new();
        self.timed("DestroySandbox", self.timeouts.container, |ctx| self.rpc.destroy_sandbox(ctx, &req)).await?;
        Ok(())
    }

    pub async fn set_guest_time(&self, now: SystemTime) -> Result<()> {
        let req = pb::SetGuestTimeRequest { host_time_unix_nanos: convert::nanos(now), ..Default::default() };
        self.timed("SetGuestTime", self.timeouts.call, |ctx| self.rpc.set_guest_time(ctx, &req)).await?;
        Ok(())
    }

    /// Has the guest online every CPU and memory block the host hot-plugged (after [`hypervisor::Vm::resize`]),
    /// and waits until `vcpus` CPUs are online; the agent gives up after a few seconds, saying how many are.
    pub async fn online_cpu_mem(&self, vcpus: u32) -> Result<()> {
        let req = pb::OnlineCpuMemRequest { vcpus, ..Default::default() };
        self.timed("OnlineCpuMem", self.timeouts.call, |ctx| self.rpc.online_cpu_mem(ctx, &req)).await?;
        Ok(())
    }

    /// `oci_spec_json` is the bundle's config.json; `rootfs` is relative to the shared mount
    /// (or absolute in the guest). Without `stdin` the init reads /dev/null.
    pub async fn create_container(
        &self,
        container_id: &str,
        oci_spec_json: &[u8],
        rootfs: &str,
        stdin: bool,
    ) -> Result<()> {
        let req = pb::CreateContainerRequest {
            container_id: container_id.into(),
            oci_spec_json: oci_spec_json.to_vec(),
            rootfs: rootfs.into(),
            stdin,
            ..Default::default()
        };
        self.timed("CreateContainer", self.timeouts.container, |ctx| self.rpc.create_container(ctx, &req)).await?;
        Ok(())
    }

    fn container_req(id: &str) -> pb::ContainerRequest {
        pb::ContainerRequest { container_id: id.into(), ..Default::default() }
    }

    pub async fn start_container(&self, container_id: &str) -> Result<()> {
        let req = Self::container_req(container_id);
        self.timed("StartContainer", self.timeouts.container, |ctx| self.rpc.start_container(ctx, &req)).await?;
        Ok(())
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let req = Self::container_req(container_id);
        self.timed("RemoveContainer", self.timeouts.container, |ctx| self.rpc.remove_container(ctx, &req)).await?;
        Ok(())
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<()> {
        let req = Self::container_req(container_id);
        self.timed("PauseContainer", self.timeouts.call, |ctx| self.rpc.pause_container(ctx, &req)).await?;
        Ok(())
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<()> {
        let req = Self::container_req(container_id);
        self.timed("ResumeContainer", self.timeouts.call, |ctx| self.rpc.resume_container(ctx, &req)).await?;
        Ok(())
    }

    /// `linux_resources_json` is an OCI LinuxResources object.
    pub async fn update_container(&self, container_id: &str, linux_resources_json: &[u8]) -> Result<()> {
        let req = pb::UpdateContainerRequest {
            container_id: container_id.into(),
            linux_resources_json: linux_resources_json.to_vec(),
            ..Default::default()
        };
        self.timed("UpdateContainer", self.timeouts.call, |ctx| self.rpc.update_container(ctx, &req)).await?;
        Ok(())
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<ProcessList> {
        let req = Self::container_req(container_id);
        let r = self.timed("ListProcesses", self.timeouts.call, |ctx| self.rpc.list_processes(ctx, &req)).await?;
        Ok(ProcessList { pids: r.pids, init: (r.init_pid > 0).then_some(r.init_pid) })
    }

    pub async fn stats(&self, container_id: &str) -> Result<ContainerStats> {
        let req = Self::container_req(container_id);
        let r = self.timed("Stats", self.timeouts.call, |ctx| self.rpc.stats(ctx, &req)).await?;
        Ok(convert::stats(r))
    }

    /// `oci_process_json` is an OCI Process object. Without `stdin` the process reads /dev/null.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        oci_process_json: &[u8],
        stdin: bool,
    ) -> Result<()> {
        let req = pb::ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            oci_process_json: oci_process_json.to_vec(),
            stdin,
            ..Default::default()
        };
        self.timed("ExecProcess", self.timeouts.container, |ctx| self.rpc.exec_process(ctx, &req)).await?;
        Ok(())
    }

    /// Forgets an exited exec in the guest, so its id can be used again.
    pub async fn remove_process(&self, process: &ProcessRef) -> Result<()> {
        let req = convert::process_request(process);
        self.timed("RemoveProcess", self.timeouts.call, |ctx| self.rpc.remove_process(ctx, &req)).await?;
        Ok(())
    }

    pub async fn signal_process(&self, process: &ProcessRef, signal: u32, all: bool) -> Result<()> {
        let req = pb::SignalProcessRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone().unwrap_or_default(),
            signal,
            all,
            ..Default::default()
        };
        self.timed("SignalProcess", self.timeouts.call, |ctx| self.rpc.signal_process(ctx, &req)).await?;
        Ok(())
    }

    /// Waits (without timeout) until the process exits.
    pub async fn wait_process(&self, process: &ProcessRef) -> Result<ProcessExit> {
        let r = self
            .rpc
            .wait_process(no_timeout(), &convert::process_request(process))
            .await
            .map_err(|e| AgentError::from_ttrpc("WaitProcess", e))?;
        Ok(convert::process_exit(r))
    }

    /// The process's stdout until EOF. Output written before this call is not lost.
    pub async fn read_stdout(&self, process: &ProcessRef) -> Result<OutputStream> {
        let rx = self
            .rpc
            .read_stdout(no_timeout(), &convert::process_request(process))
            .await
            .map_err(|e| AgentError::from_ttrpc("ReadStdout", e))?;
        Ok(OutputStream { rx, call: "ReadStdout" })
    }

    /// The process's stderr until EOF (empty at once for a terminal).
    pub async fn read_stderr(&self, process: &ProcessRef) -> Result<OutputStream> {
        let rx = self
            .rpc
            .read_stderr(no_timeout(), &convert::process_request(process))
            .await
            .map_err(|e| AgentError::from_ttrpc("ReadStderr", e))?;
        Ok(OutputStream { rx, call: "ReadStderr" })
    }

    /// Opens a stdin stream to the process.
    pub async fn stdin(&self, process: &ProcessRef) -> Result<StdinStream> {
        let tx = self.rpc.write_stdin(no_timeout()).await.map_err(|e| AgentError::from_ttrpc("WriteStdin", e))?;
        Ok(StdinStream { tx, process: process.clone() })
    }

    pub async fn close_stdin(&self, process: &ProcessRef) -> Result<()> {
        let req = convert::process_request(process);
        self.timed("CloseStdin", self.timeouts.call, |ctx| self.rpc.close_stdin(ctx, &req)).await?;
        Ok(())
    }

    pub async fn resize_tty(&self, process: &ProcessRef, rows: u32, cols: u32) -> Result<()> {
        let req = pb::ResizeTtyRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone().unwrap_or_default(),
            rows,
            cols,
            ..Default::default()
        };
        self.timed("ResizeTty", self.timeouts.call, |ctx| self.rpc.resize_tty(ctx, &req)).await?;
        Ok(())
    }

    pub async fn update_interface(&self, iface: &Interface) -> Result<Interface> {
        let req = convert::interface_request(iface);
        let r = self.timed("UpdateInterface", self.timeouts.call, |ctx| self.rpc.update_interface(ctx, &req)).await?;
        Ok(convert::interface(r)?)
    }

    pub async fn update_routes(&self, routes: &[Route]) -> Result<()> {
        let req = pb::UpdateRoutesRequest { routes: routes.iter().map(convert::route).collect(), ..Default::default() };
        self.timed("UpdateRoutes", self.timeouts.call, |ctx| self.rpc.update_routes(ctx, &req)).await?;
        Ok(())
    }

    pub async fn add_arp_neighbors(&self, neighbors: &[ArpNeighbor]) -> Result<()> {
        let req = pb::AddArpNeighborsRequest {
            neighbors: neighbors.iter().map(convert::arp_neighbor).collect(),
            ..Default::default()
        };
        self.timed("AddArpNeighbors", self.timeouts.call, |ctx| self.rpc.add_arp_neighbors(ctx, &req)).await?;
        Ok(())
    }

    /// A stream of container ids, one per OOM kill.
    pub async fn oom_events(&self) -> Result<OomStream> {
        let rx = self
            .rpc
            .oom_events(no_timeout(), &pb::Empty::new())
            .await
            .map_err(|e| AgentError::from_ttrpc("OomEvents", e))?;
        Ok(OomStream { rx })
    }
}

/// Output of one process stream; `next` returns None at EOF.
pub struct OutputStream {
    rx: ClientStreamReceiver<pb::OutputChunk>,
    call: &'static str,
}

impl std::fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputStream").field("call", &self.call).finish_non_exhaustive()
    }
}

impl OutputStream {
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        let call = self.call;
        Ok(self.rx.recv().await.map_err(|e| AgentError::from_ttrpc(call, e))?.map(|c| c.data))
    }

    /// Everything until EOF.
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next().await? {
            all.extend(chunk);
        }
        Ok(all)
    }
}

/// Stdin of one process.
pub struct StdinStream {
    tx: ClientStreamSender<pb::StdinChunk, pb::Empty>,
    process: ProcessRef,
}

impl std::fmt::Debug for StdinStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdinStream").field("process", &self.process).finish_non_exhaustive()
    }
}

impl StdinStream {
    pub async fn write(&self, data: &[u8]) -> Result<()> {
        let chunk = pb::StdinChunk {
            container_id: self.process.container_id.clone(),
            exec_id: self.process.exec_id.clone().unwrap_or_default(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.tx.send(&chunk).await.map_err(|e| AgentError::from_ttrpc("WriteStdin", e))
    }

    /// Ends the stream (stdin of the process stays open; see `AgentClient::close_stdin`).
    pub async fn finish(mut self) -> Result<()> {
        self.tx.close_and_recv().await.map_err(|e| AgentError::from_ttrpc("WriteStdin", e))?;
        Ok(())
    }
}

/// OOM events; `next` returns the container id of each OOM kill.
pub struct OomStream {
    rx: ClientStreamReceiver<pb::OomEvent>,
}

impl std::fmt::Debug for OomStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OomStream").finish_non_exhaustive()
    }
}

impl OomStream {
    pub async fn next(&mut self) -> Result<Option<String>> {
        Ok(self.rx.recv().await.map_err(|e| AgentError::from_ttrpc("OomEvents", e))?.map(|e| e.container_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fake::{Call, FakeAgent};

    /// Short, so the timeout tests take a fraction of a second.
    const SHORT: Timeouts = Timeouts { call: Duration::from_millis(200), container: Duration::from_millis(200) };

    async fn connect(agent: &FakeAgent) -> AgentClient {
        AgentClient::connect_with(agent.dialer(), Duration::from_secs(5))
            .await
            .expect("the fake agent answers Check")
            .with_timeouts(SHORT)
    }

    /// Polls until `ready` holds: the fake learns of a call when it arrives, not when the client sent it.
    async fn until(what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn container_lifecycle_carries_exit_status_and_output() {
        let agent = FakeAgent::start().await;
        let client = connect(&agent).await;
        client.create_container("c1", b"{}", "c1/rootfs", true).await.expect("create");
        client.start_container("c1").await.expect("start");
        let init = ProcessRef::init("c1");
        let mut stdout = client.read_stdout(&init).await.expect("read stdout");
        let waiter = tokio::spawn({
            let (client, init) = (client.clone(), init.clone());
            async move { client.wait_process(&init).await }
        });
        agent.stdout(&init, b"hello ");
        agent.stdout(&init, b"world");
        agent.exit(&init, 3);
        let exit = waiter.await.expect("join").expect("wait");
        assert_eq!(exit.status, 3);
        assert_eq!(stdout.read_to_end().await.expect("stdout until EOF"), b"hello world");
        let mut stderr = client.read_stderr(&init).await.expect("read stderr");
        assert_eq!(stderr.read_to_end().await.expect("stderr"), b"", "stderr is at EOF after the exit");
        client.remove_container("c1").await.expect("remove");
        let c1 = || "c1".to_string();
        assert_eq!(
            agent.calls(),
            [
                Call::CreateContainer { container_id: c1() },
                Call::StartContainer { container_id: c1() },
                Call::RemoveContainer { container_id: c1() }
            ]
        );
    }

    #[tokio::test]
    async fn exec_carries_stdin_and_exit_status() {
        let agent = FakeAgent::start().await;
        let client = connect(&agent).await;
        client.create_container("c1", b"{}", "", true).await.expect("create");
        client.exec_process("c1", "e1", b"{}", true).await.expect("exec");
        let exec = ProcessRef::exec("c1", "e1");
        let stdin = client.stdin(&exec).await.expect("stdin");
        stdin.write(b"input").await.expect("write stdin");
        stdin.finish().await.expect("finish stdin");
        client.close_stdin(&exec).await.expect("close stdin");
        assert_eq!(agent.stdin(&exec), (b"input".to_vec(), true));
        agent.exit(&exec, 137);
        assert_eq!(client.wait_process(&exec).await.expect("wait").status, 137);
        assert!(agent.calls().contains(&Call::ExecProcess(exec.clone())));
    }

    /// An exec id is taken until the exited exec is removed (containerd clients reuse exec ids).
    #[tokio::test]
    async fn an_exec_id_is_free_again_once_its_exited_exec_is_removed() {
        let agent = FakeAgent::start().await;
        let client = connect(&agent).await;
        let exec = ProcessRef::exec("c1", "e1");
        client.create_container("c1", b"{}", "", true).await.expect("create");
        client.exec_process("c1", "e1", b"{}", true).await.expect("exec");
        let err = client.exec_process("c1", "e1", b"{}", true).await.expect_err("a running exec's id is taken");
        assert_eq!(err.code(), Some(RpcCode::AlreadyExists), "{err}");
        let err = client.remove_process(&exec).await.expect_err("a running exec cannot be removed");
        assert_eq!(err.code(), Some(RpcCode::FailedPrecondition), "{err}");
        agent.exit(&exec, 0);
        client.wait_process(&exec).await.expect("wait");
        let err = client.exec_process("c1", "e1", b"{}", true).await.expect_err("a waited exec's id is still taken");
        assert_eq!(err.code(), Some(RpcCode::AlreadyExists), "{err}");
        client.remove_process(&exec).await.expect("remove the exited exec");
        client.exec_process("c1", "e1", b"{}", true).await.expect("the id is free again");
    }

    #[tokio::test]
    async fn an_unknown_container_is_not_found() {
        let agent = FakeAgent::start().await;
        let client = connect(&agent).await;
        let errors = [
            client.start_container("nope").await.expect_err("start"),
            client.exec_process("nope", "e1", b"{}", true).await.expect_err("exec"),
            client.wait_process(&ProcessRef::init("nope")).await.expect_err("wait"),
        ];
        for err in errors {
            assert_eq!(err.code(), Some(RpcCode::NotFound), "{err}");
        }
        client.create_container("c1", b"{}", "", true).await.expect("create");
        let err = client.wait_process(&ProcessRef::exec("c1", "nope")).await.expect_err("unknown exec");
        assert_eq!(err.code(), Some(RpcCode::NotFound), "{err}");
    }

    #[tokio::test]
    async fn online_cpu_mem_carries_the_vcpus_under_the_call_timeout() {
        let agent = FakeAgent::start().await;
        let client = connect(&agent).await;
        client.online_cpu_mem(3).await.expect("online");
        assert_eq!(agent.calls(), [Call::OnlineCpuMem(3)]);
        agent.set_silent(true);
        let err = client.online_cpu_mem(4).await.expect_err("no answer");
        assert!(matches!(err, AgentError::Timeout { call: "OnlineCpuMem", after } if after == SHORT.call), "{err:?}");
        agent.set_silent(false);
    }

    #[tokio::test]
    async fn a_silent_agent_times_out_within_the_configured_timeout() {
        let agent = FakeAgent::start().await;
        let client = connect(&agent).await;
        agent.set_silent(true);
        let started = Instant::now();
        let err = client.start_container("c1").await.expect_err("no answer");
        let took = started.elapsed();
        assert!(
            matches!(err, AgentError::Timeout { call: "StartContainer", after } if after == SHORT.container),
            "{err:?}"
        );
        // The upper bound only catches a hang: a loaded machine may be slow to schedule the timer.
        assert!(took >= SHORT.container && took < SHORT.container + Duration::from_secs(2), "timed out after {took:?}");
        assert_eq!(agent.calls(), [Call::StartContainer { container_id: "c1".into() }], "the call did arrive");
        let err = client.check().await.expect_err("no answer");
        assert!(matches!(err, AgentError::Timeout { call: "Check", after } if after == SHORT.call), "{err:?}");
        agent.set_silent(false);
        client.check().await.expect("the agent speaks again");
    }

    #[tokio::test]
    async fn a_connection_dropped_during_wait_process_is_an_error() {
        let agent = FakeAgent::start().await;
        let client = connect(&agent).await;
        client.create_container("c1", b"{}", "", true).await.expect("create");
        let init = ProcessRef::init("c1");
        let waiter = tokio::spawn({
            let (client, init) = (client.clone(), init.clone());
            async move { client.wait_process(&init).await }
        });
        until("the wait is in the agent", || agent.waiters(&init) == 1).await;
        agent.crash();
        let result =
            tokio::time::timeout(Duration::from_secs(2), waiter).await.expect("WaitProcess hung").expect("join");
        let err = result.expect_err("the VM died before the process exited");
        assert!(matches!(err, AgentError::Transport { call: "WaitProcess", .. }), "{err:?}");
        let err = AgentClient::connect_with(agent.dialer(), Duration::from_millis(200)).await.expect_err("dead VM");
        assert!(matches!(err, AgentError::ConnectTimeout { .. }), "{err:?}");
    }
}
