//! The ttrpc service: thin handlers that convert requests (in `convert`), call the sandbox,
//! and map errors to ttrpc status codes. Streaming handlers live in `streams`.

mod convert;
mod streams;

use std::sync::Arc;

use async_trait::async_trait;
use protocols::agent as pb;
use protocols::agent_ttrpc::Agent;
use ttrpc::r#async::{ServerStreamReceiver, ServerStreamSender, TtrpcContext};
use ttrpc::Code;

use crate::container::ContainerError;
use crate::sandbox::{Sandbox, SandboxError};

#[derive(Debug)]
pub struct AgentService {
    sandbox: Arc<Sandbox>,
}

impl AgentService {
    pub fn new(sandbox: Arc<Sandbox>) -> Self {
        Self { sandbox }
    }
}

pub fn status(code: Code, err: &dyn std::error::Error) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, crate::error_chain(err)))
}

fn sandbox_status(err: SandboxError) -> ttrpc::Error {
    let code = match &err {
        SandboxError::NoContainer(_) => Code::NOT_FOUND,
        SandboxError::ContainerExists(_) => Code::ALREADY_EXISTS,
        SandboxError::InvalidId(_) => Code::INVALID_ARGUMENT,
        SandboxError::Container(c) => return container_status(c),
        _ => Code::INTERNAL,
    };
    status(code, &err)
}

fn container_status(err: &ContainerError) -> ttrpc::Error {
    let code = match err {
        ContainerError::Spec(_) | ContainerError::NoProcess | ContainerError::InvalidSignal(_) => {
            Code::INVALID_ARGUMENT
        }
        ContainerError::Process(_) | ContainerError::NoRootfs(_) => Code::FAILED_PRECONDITION,
        ContainerError::NoSuchExec(_) => Code::NOT_FOUND,
        ContainerError::ExecExists(_) => Code::ALREADY_EXISTS,
        ContainerError::ExecRunning(_) => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    };
    status(code, err)
}

type R<T> = ttrpc::Result<T>;

impl AgentService {
    fn container(&self, id: &str) -> R<Arc<crate::container::Container>> {
        self.sandbox.container(id).map_err(sandbox_status)
    }

    fn process(&self, id: &str, exec_id: &str) -> R<Arc<crate::process::Process>> {
        self.container(id)?.process(exec_id).map_err(|e| container_status(&e))
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::Version> {
        Ok(pb::Version {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: protocols::PROTOCOL_VERSION,
            ..Default::default()
        })
    }

    async fn guest_details(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::GuestDetails> {
        Ok(convert::guest_details(self.sandbox.guest_details()))
    }

    async fn create_sandbox(&self, _: &TtrpcContext, req: pb::CreateSandboxRequest) -> R<pb::Empty> {
        let cfg = convert::sandbox_config(req).map_err(|e| status(Code::INVALID_ARGUMENT, &e))?;
        self.sandbox.create(&cfg).map_err(sandbox_status)?;
        Ok(pb::Empty::new())
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: pb::Empty) -> R<pb::Empty> {
        self.sandbox.destroy().await.map_err(sandbox_status)?;
        Ok(pb::Empty::new())
    }

    async fn set_guest_time(&self, _: &TtrpcContext, req: pb::SetGuestTimeRequest) -> R<pb::Empty> {
        let t = convert::time_from_nanos(req.host_time_unix_nanos).ok_or_else(|| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INVALID_ARGUMENT, "host_time_unix_nanos must be positive"))
        })?;
        self.sandbox.set_time(t).map_err(sandbox_status)?;
        Ok(pb::Empty::new())
    }

    async fn online_cpu_mem(&self, _: &TtrpcContext, req: pb::OnlineCpuMemRequest) -> R<pb::Empty> {
        if !self.sandbox.is_init() {
            tracing::debug!(vcpus = req.vcpus, "not the guest's init: leaving CPUs and memory alone");
            return Ok(pb::Empty::new());
        }
        let system = std::path::Path::new(crate::hotplug::SYSTEM);
        let done = crate::hotplug::online_cpu_mem(system, req.vcpus, crate::hotplug::WAIT)
            .await
            .map_err(|e| status(Code::INTERNAL, &e))?;
        tracing::info!(
            vcpus = req.vcpus,
            online = done.cpus_online,
            cpus = done.cpus,
            memory_blocks = done.memory_blocks,
            "onlined hot-plugged CPUs and memory"
        );
        Ok(pb::Empty::new())
    }

    async fn create_container(&self, _: &TtrpcContext, req: pb::CreateContainerRequest) -> R<pb::Empty> {
        tracing::debug!(id = req.container_id, "create container requested");
        self.sandbox
            .create_container(&req.container_id, &req.oci_spec_json, &req.rootfs, req.stdin)
            .map_err(sandbox_status)?;
        Ok(pb::Empty::new())
    }

    async fn start_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.container(&req.container_id)?.start().await.map_err(|e| container_status(&e))?;
        Ok(pb::Empty::new())
    }

    async fn remove_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.sandbox.remove_container(&req.container_id).await.map_err(sandbox_status)?;
        Ok(pb::Empty::new())
    }

    async fn pause_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.container(&req.container_id)?.pause().map_err(|e| container_status(&e))?;
        Ok(pb::Empty::new())
    }

    async fn resume_container(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::Empty> {
        self.container(&req.container_id)?.resume().map_err(|e| container_status(&e))?;
        Ok(pb::Empty::new())
    }

    async fn update_container(&self, _: &TtrpcContext, req: pb::UpdateContainerRequest) -> R<pb::Empty> {
        self.container(&req.container_id)?.update(&req.linux_resources_json).map_err(|e| container_status(&e))?;
        Ok(pb::Empty::new())
    }

    async fn list_processes(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::ProcessList> {
        let container = self.container(&req.container_id)?;
        let pids = container.pids().map_err(|e| container_status(&e))?;
        let init_pid = container.running_init_pid().map_or(0, |p| p.as_raw());
        Ok(pb::ProcessList { pids, init_pid, ..Default::default() })
    }

    async fn stats(&self, _: &TtrpcContext, req: pb::ContainerRequest) -> R<pb::ContainerStats> {
        let s = self.container(&req.container_id)?.stats().map_err(|e| container_status(&e))?;
        Ok(convert::stats(s))
    }

    async fn exec_process(&self, _: &TtrpcContext, req: pb::ExecProcessRequest) -> R<pb::Empty> {
        let c = self.container(&req.container_id)?;
        c.exec(&self.sandbox.reaper, &req.exec_id, &req.oci_process_json, req.stdin)
            .map_err(|e| container_status(&e))?;
        Ok(pb::Empty::new())
    }

    async fn remove_process(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::Empty> {
        self.container(&req.container_id)?.remove_exec(&req.exec_id).map_err(|e| container_status(&e))?;
        Ok(pb::Empty::new())
    }

    async fn signal_process(&self, _: &TtrpcContext, req: pb::SignalProcessRequest) -> R<pb::Empty> {
        self.container(&req.container_id)?
            .signal(&req.exec_id, req.signal, req.all)
            .map_err(|e| container_status(&e))?;
        Ok(pb::Empty::new())
    }

    async fn wait_process(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::ProcessExit> {
        let exit = self.process(&req.container_id, &req.exec_id)?.wait().await;
        Ok(convert::process_exit(exit))
    }

    async fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: pb::ProcessRequest,
        tx: ServerStreamSender<pb::OutputChunk>,
    ) -> R<()> {
        streams::read_output(self.process(&req.container_id, &req.exec_id)?, false, tx).await
    }

    async fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: pb::ProcessRequest,
        tx: ServerStreamSender<pb::OutputChunk>,
    ) -> R<()> {
        streams::read_output(self.process(&req.container_id, &req.exec_id)?, true, tx).await
    }

    async fn write_stdin(&self, _: &TtrpcContext, rx: ServerStreamReceiver<pb::StdinChunk>) -> R<pb::Empty> {
        streams::write_stdin(|id, exec| self.process(id, exec), rx).await?;
        Ok(pb::Empty::new())
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: pb::ProcessRequest) -> R<pb::Empty> {
        let p = self.process(&req.container_id, &req.exec_id)?;
        p.io.close_stdin().await.map_err(|e| status(Code::INTERNAL, &e))?;
        Ok(pb::Empty::new())
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: pb::ResizeTtyRequest) -> R<pb::Empty> {
        let p = self.process(&req.container_id, &req.exec_id)?;
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        p.io.resize(clamp(req.rows), clamp(req.cols)).map_err(|e| status(Code::FAILED_PRECONDITION, &e))?;
        Ok(pb::Empty::new())
    }

    async fn update_interface(&self, _: &TtrpcContext, req: pb::Interface) -> R<pb::Interface> {
        let iface = convert::interface(req).map_err(|e| status(Code::INVALID_ARGUMENT, &e))?;
        let done = crate::network::update_interface(&iface).await.map_err(|e| status(Code::INTERNAL, &e))?;
        Ok(convert::interface_to_pb(done))
    }

    async fn update_routes(&self, _: &TtrpcContext, req: pb::UpdateRoutesRequest) -> R<pb::Empty> {
        let routes = req
            .routes
            .into_iter()
            .map(convert::route)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| status(Code::INVALID_ARGUMENT, &e))?;
        crate::network::update_routes(&routes).await.map_err(|e| status(Code::INTERNAL, &e))?;
        Ok(pb::Empty::new())
    }

    async fn add_arp_neighbors(&self, _: &TtrpcContext, req: pb::AddArpNeighborsRequest) -> R<pb::Empty> {
        let ns = req
            .neighbors
            .into_iter()
            .map(convert::arp_neighbor)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| status(Code::INVALID_ARGUMENT, &e))?;
        crate::network::add_arp_neighbors(&ns).await.map_err(|e| status(Code::INTERNAL, &e))?;
        Ok(pb::Empty::new())
    }

    async fn oom_events(&self, _: &TtrpcContext, _: pb::Empty, tx: ServerStreamSender<pb::OomEvent>) -> R<()> {
        streams::oom_events(self.sandbox.subscribe_oom(), tx).await
    }
}
