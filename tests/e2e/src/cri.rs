//! A blocking CRI client for tests (the `k8s-cri` v1 API over containerd's unix socket, with its own
//! single-threaded tokio runtime), builders for pod and container configs and a reader for CRI log files.
//! Beside it:
//! - `cri/network.rs`: [`CniNetwork`], a private bridge network (the how-to's `10-mynet.conf` with a
//!   per-test bridge name, subnet and IPAM state directory) that is removed again when the test ends;
//! - `cri/stream.rs`: [`StreamSession`], the websocket client for the URLs `Exec` and `Attach` return;
//! - `cri/stream_checks.rs`: the streaming checks the runc and kata tests share;
//! - `cri/port_forward.rs`: [`PortForwardSession`], the websocket client for the URL `PortForward` returns, and
//!   the port-forward check the runc and kata tests share;
//! - `cri/kata_pod.rs`: running kata pods and checking that removing one leaves nothing behind.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerMetadata, ContainerStats, ContainerStatsFilter, ContainerStatus,
    CreateContainerRequest, DnsConfig, ExecRequest, ExecSyncRequest, ImageSpec, KeyValue, LinuxContainerResources,
    ListContainerStatsRequest, ListImagesRequest, ListPodSandboxRequest, Mount, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatus, PortForwardRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, UpdateContainerResourcesRequest,
    VersionRequest, VersionResponse,
};
use tonic::transport::{Channel, Endpoint, Uri};

mod kata_pod;
mod network;
mod port_forward;
mod stream;
mod stream_checks;
mod web;

pub use kata_pod::{
    boot_ids, kata_handler_config, kata_pod_parts, kata_taps_anywhere, qemu_processes, start_containerd, veth_mac,
    vm_lock, KataPodFootprint, QEMU,
};
pub use network::{bridge_conf, cni_skip_reason, loopback_conf, CniNetwork};
pub use port_forward::{check_port_forward, port_forward_target, PortForwardSession, ECHO_PORT};
pub use stream::{StreamError, StreamSession, StreamStatus, Streams};
pub use stream_checks::{attach_target, check_attach, check_exec_streams};
pub use web::{http_get, WebVolumes};

/// Errors of the CRI client and the CNI network helper.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("could not create the tokio runtime of the CRI client")]
    Runtime(#[source] io::Error),
    #[error("could not connect to the CRI socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {method} failed")]
    Call {
        method: &'static str,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("CRI {method} did not answer within {timeout:?}")]
    Timeout { method: &'static str, timeout: Duration },
    #[error("CRI {method} answered without {field}")]
    Missing { method: &'static str, field: &'static str },
    #[error("pod {pod} has no usable IPv4 address (status says {ip:?})")]
    PodIp { pod: String, ip: String },
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free bridge name or 172.19.x.0/24 subnet is left on this host")]
    NoFreeNetwork,
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
}

/// What [`CriClient::exec_sync`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// A blocking client of containerd's CRI plugin (API `runtime.v1`). Every call is bounded by the
/// client's deadline (30 s by default; exec calls add their own timeout).
#[derive(Debug)]
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    deadline: Duration,
}

impl CriClient {
    /// Connects to the CRI service on containerd's grpc socket.
    pub fn connect(socket: &Path) -> Result<Self, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CriError::Runtime)?;
        let path = socket.to_owned();
        // The URI is required by tonic but unused: every connection goes to the unix socket.
        let endpoint = Endpoint::from_static("http://[::]:50051").connect_timeout(Duration::from_secs(10));
        let channel = rt
            .block_on(endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            })))
            .map_err(|source| CriError::Connect { socket: socket.to_owned(), source })?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            deadline: Duration::from_secs(30),
        })
    }

    /// Connects to `containerd`'s CRI service with `deadline` for every call (a VM boot or a guest round trip
    /// under TCG on a busy machine takes longer than the default).
    pub fn for_containerd(containerd: &crate::Containerd, deadline: Duration) -> Self {
        let mut cri = Self::connect(containerd.address()).expect("CRI client connects");
        cri.set_deadline(deadline);
        cri
    }

    /// Changes the deadline of every later call.
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    fn call<T, F>(&self, method: &'static str, deadline: Duration, fut: F) -> Result<T, CriError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // The timer must be created inside the runtime, hence the async block.
        match self.rt.block_on(async { tokio::time::timeout(deadline, fut).await }) {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(CriError::Call { method, source: Box::new(status) }),
            Err(_) => Err(CriError::Timeout { method, timeout: deadline }),
        }
    }

    /// `Version`: which runtime and CRI API version answer.
    pub fn version(&self) -> Result<VersionResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call("Version", self.deadline, async move { c.version(VersionRequest { version: "v1".to_owned() }).await })
    }

    /// Image references the CRI plugin sees (its namespace is `k8s.io`).
    pub fn list_images(&self) -> Result<Vec<String>, CriError> {
        let mut c = self.images.clone();
        let images =
            self.call(
                "ListImages",
                self.deadline,
                async move { c.list_images(ListImagesRequest { filter: None }).await },
            )?;
        Ok(images.images.into_iter().flat_map(|i| i.repo_tags).collect())
    }

    /// `RunPodSandbox` with `runtime_handler` (e.g. `runc`, `kata`); returns the pod id.
    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig, runtime_handler: &str) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let request =
            RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: runtime_handler.to_owned() };
        // Sandboxes of VM runtimes boot a VM first: give them more time than other calls.
        let deadline = self.deadline * 4;
        let r = self.call("RunPodSandbox", deadline, async move { c.run_pod_sandbox(request).await })?;
        Ok(r.pod_sandbox_id)
    }

    pub fn pod_sandbox_status(&self, pod_id: &str) -> Result<PodSandboxStatus, CriError> {
        let mut c = self.runtime.clone();
        let request = k8s_cri::v1::PodSandboxStatusRequest { pod_sandbox_id: pod_id.to_owned(), verbose: false };
        self.call("PodSandboxStatus", self.deadline, async move { c.pod_sandbox_status(request).await })?
            .status
            .ok_or(CriError::Missing { method: "PodSandboxStatus", field: "status" })
    }

    /// The pod's IPv4 address from `PodSandboxStatus.network.ip`.
    pub fn pod_ip(&self, pod_id: &str) -> Result<Ipv4Addr, CriError> {
        let ip = self.pod_sandbox_status(pod_id)?.network.map(|n| n.ip).unwrap_or_default();
        ip.parse().map_err(|_| CriError::PodIp { pod: pod_id.to_owned(), ip })
    }

    /// `CreateContainer` in pod `pod_id` (created from `pod_config`); returns the container id.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        let r = self.call("CreateContainer", self.deadline, async move { c.create_container(request).await })?;
        Ok(r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = StartContainerRequest { container_id: id.to_owned() };
        self.call("StartContainer", self.deadline, async move { c.start_container(request).await }).map(drop)
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, CriError> {
        let mut c = self.runtime.clone();
        let request = k8s_cri::v1::ContainerStatusRequest { container_id: id.to_owned(), verbose: false };
        self.call("ContainerStatus", self.deadline, async move { c.container_status(request).await })?
            .status
            .ok_or(CriError::Missing { method: "ContainerStatus", field: "status" })
    }

    /// `ExecSync` of `cmd` in container `id`; the runtime kills it after `timeout`.
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout: Duration) -> Result<ExecOutput, CriError> {
        let mut c = self.runtime.clone();
        let request = ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: i64::try_from(timeout.as_secs().max(1)).unwrap_or(i64::MAX),
        };
        let r = self.call("ExecSync", timeout + self.deadline, async move { c.exec_sync(request).await })?;
        Ok(ExecOutput {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// `Exec` of `cmd` in container `id` with `streams`: the streaming server's URL for
    /// [`StreamSession::connect`] (its token is single-use and expires after a minute).
    pub fn exec(&self, id: &str, cmd: &[&str], streams: Streams) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let request = ExecRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            tty: streams.tty,
            stdin: streams.stdin,
            stdout: streams.stdout,
            stderr: streams.stderr,
        };
        let r = self.call("Exec", self.deadline, async move { c.exec(request).await })?;
        Ok(r.url)
    }

    /// `Attach` to the main process of container `id` (`streams.tty` must match the container's config):
    /// the streaming server's URL for [`StreamSession::connect`].
    pub fn attach(&self, id: &str, streams: Streams) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let request = AttachRequest {
            container_id: id.to_owned(),
            stdin: streams.stdin,
            tty: streams.tty,
            stdout: streams.stdout,
            stderr: streams.stderr,
        };
        let r = self.call("Attach", self.deadline, async move { c.attach(request).await })?;
        Ok(r.url)
    }

    /// `PortForward` to `ports` of pod `pod_id`: the streaming server's URL for [`PortForwardSession::connect`].
    pub fn port_forward(&self, pod_id: &str, ports: &[u16]) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let request = PortForwardRequest {
            pod_sandbox_id: pod_id.to_owned(),
            port: ports.iter().map(|&p| i32::from(p)).collect(),
        };
        let r = self.call("PortForward", self.deadline, async move { c.port_forward(request).await })?;
        Ok(r.url)
    }

    pub fn container_stats(&self, id: &str) -> Result<ContainerStats, CriError> {
        let mut c = self.runtime.clone();
        let request = k8s_cri::v1::ContainerStatsRequest { container_id: id.to_owned() };
        self.call("ContainerStats", self.deadline, async move { c.container_stats(request).await })?
            .stats
            .ok_or(CriError::Missing { method: "ContainerStats", field: "stats" })
    }

    /// `ListContainerStats`, of one pod's containers when `pod_id` is given.
    pub fn list_container_stats(&self, pod_id: Option<&str>) -> Result<Vec<ContainerStats>, CriError> {
        let mut c = self.runtime.clone();
        let request = ListContainerStatsRequest {
            filter: pod_id.map(|p| ContainerStatsFilter { pod_sandbox_id: p.to_owned(), ..Default::default() }),
        };
        Ok(self.call("ListContainerStats", self.deadline, async move { c.list_container_stats(request).await })?.stats)
    }

    pub fn update_container_resources(&self, id: &str, resources: &LinuxContainerResources) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = UpdateContainerResourcesRequest {
            container_id: id.to_owned(),
            linux: Some(resources.clone()),
            ..Default::default()
        };
        self.call("UpdateContainerResources", self.deadline, async move { c.update_container_resources(request).await })
            .map(drop)
    }

    /// `StopContainer`: SIGTERM, then SIGKILL after `grace`.
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = StopContainerRequest {
            container_id: id.to_owned(),
            timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
        };
        self.call("StopContainer", grace + self.deadline, async move { c.stop_container(request).await }).map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = RemoveContainerRequest { container_id: id.to_owned() };
        self.call("RemoveContainer", self.deadline, async move { c.remove_container(request).await }).map(drop)
    }

    pub fn stop_pod_sandbox(&self, pod_id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = StopPodSandboxRequest { pod_sandbox_id: pod_id.to_owned() };
        self.call("StopPodSandbox", self.deadline * 2, async move { c.stop_pod_sandbox(request).await }).map(drop)
    }

    /// Ids of every pod sandbox the CRI plugin knows.
    pub fn list_pod_sandboxes(&self) -> Result<Vec<String>, CriError> {
        let mut c = self.runtime.clone();
        let pods = self.call("ListPodSandbox", self.deadline, async move {
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await
        })?;
        Ok(pods.items.into_iter().map(|p| p.id).collect())
    }

    /// Stops and removes every pod sandbox (and with it its containers); returns the ids removed.
    /// Only the CRI teardown runs CNI DEL: containerd's own shutdown would leave the pod's network
    /// namespace and its ipMasq rules behind.
    pub fn remove_all_pod_sandboxes(&self) -> Result<Vec<String>, CriError> {
        let pods = self.list_pod_sandboxes()?;
        for pod in &pods {
            self.stop_pod_sandbox(pod)?;
            self.remove_pod_sandbox(pod)?;
        }
        Ok(pods)
    }

    pub fn remove_pod_sandbox(&self, pod_id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = RemovePodSandboxRequest { pod_sandbox_id: pod_id.to_owned() };
        self.call("RemovePodSandbox", self.deadline * 2, async move { c.remove_pod_sandbox(request).await }).map(drop)
    }
}

/// Imports the images pods use: busybox ([`crate::BUSYBOX_IMAGE`]) and the pause image.
pub fn import_pod_images(containerd: &crate::Containerd) -> Result<(), crate::ContainerdError> {
    containerd.import(&crate::OciImage::busybox(crate::BUSYBOX_IMAGE)?)?;
    containerd.import(&crate::OciImage::pause(crate::PAUSE_IMAGE)?)
}

/// Removes every pod through CRI when dropped, so a failing test still runs CNI DEL. Create it after
/// the [`crate::Containerd`] it talks to, so that it is dropped first.
#[derive(Debug)]
pub struct PodCleanup<'a>(pub &'a CriClient);

impl Drop for PodCleanup<'_> {
    fn drop(&mut self) {
        match self.0.remove_all_pod_sandboxes() {
            Ok(pods) if !pods.is_empty() => {
                eprintln!("e2e: removed pods left by the test: {pods:?}")
            }
            Ok(_) => {}
            Err(e) => eprintln!("e2e: could not remove the pods left by the test: {e}"),
        }
    }
}

/// The parts of a `PodSandboxConfig` tests set; [`PodSpec::build`] makes the message.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub hostname: String,
    /// Absolute; container `log_path`s are relative to it.
    pub log_directory: PathBuf,
    pub dns_servers: Vec<String>,
    pub dns_searches: Vec<String>,
    pub dns_options: Vec<String>,
    pub annotations: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    /// A privileged pod (needed for privileged containers).
    pub privileged: bool,
}

impl PodSpec {
    /// A pod called `name` in namespace `default` with a unique uid, hostname `name` and logs in
    /// `log_directory`. DNS points at the pod's own loopback, so a lookup never leaves the pod.
    pub fn new(name: &str, log_directory: &Path) -> Self {
        Self {
            name: name.to_owned(),
            uid: crate::unique_id("uid"),
            namespace: "default".to_owned(),
            hostname: name.to_owned(),
            log_directory: log_directory.to_owned(),
            dns_servers: vec!["127.0.0.1".to_owned()],
            dns_searches: vec!["kata-e2e.test".to_owned()],
            dns_options: vec!["ndots:1".to_owned()],
            ..Self::default()
        }
    }

    pub fn build(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: self.hostname.clone(),
            log_directory: self.log_directory.to_string_lossy().into_owned(),
            dns_config: Some(DnsConfig {
                servers: self.dns_servers.clone(),
                searches: self.dns_searches.clone(),
                options: self.dns_options.clone(),
            }),
            annotations: self.annotations.clone(),
            labels: self.labels.clone(),
            linux: self.privileged.then(|| k8s_cri::v1::LinuxPodSandboxConfig {
                security_context: Some(k8s_cri::v1::LinuxSandboxSecurityContext {
                    privileged: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A host directory or file bind-mounted into a container.
#[derive(Debug, Clone)]
pub struct HostMount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub readonly: bool,
}

/// The parts of a `ContainerConfig` tests set; [`ContainerSpec::build`] makes the message.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<HostMount>,
    /// Relative to the pod's `log_directory`.
    pub log_path: String,
    /// `securityContext.privileged` (the pod must be privileged too).
    pub privileged: bool,
    /// Keep the main process's stdin open for `Attach`.
    pub stdin: bool,
    /// Close that stdin when the first attach ends.
    pub stdin_once: bool,
    /// Run the main process on a terminal (stderr merges into stdout).
    pub tty: bool,
}

impl ContainerSpec {
    /// Container `name` of `image` running `command`, logging to `<name>.log`.
    pub fn new(name: &str, image: &str, command: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            log_path: format!("{name}.log"),
            ..Self::default()
        }
    }

    /// Adds a bind mount of `host_path` at `container_path`.
    pub fn mount(mut self, host_path: &Path, container_path: &str, readonly: bool) -> Self {
        self.mounts.push(HostMount {
            host_path: host_path.to_owned(),
            container_path: container_path.to_owned(),
            readonly,
        });
        self
    }

    pub fn build(&self) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata { name: self.name.clone(), attempt: 0 }),
            image: Some(ImageSpec { image: self.image.clone(), ..Default::default() }),
            command: self.command.clone(),
            args: self.args.clone(),
            envs: self.envs.iter().map(|(key, value)| KeyValue { key: key.clone(), value: value.clone() }).collect(),
            mounts: self
                .mounts
                .iter()
                .map(|m| Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.to_string_lossy().into_owned(),
                    readonly: m.readonly,
                    ..Default::default()
                })
                .collect(),
            log_path: self.log_path.clone(),
            stdin: self.stdin,
            stdin_once: self.stdin_once,
            tty: self.tty,
            linux: self.privileged.then(|| k8s_cri::v1::LinuxContainerConfig {
                security_context: Some(k8s_cri::v1::LinuxContainerSecurityContext {
                    privileged: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// One line of a CRI container log (`TIMESTAMP STREAM P|F TEXT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriLogLine {
    pub timestamp: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `P`: the line continues in the next entry.
    pub partial: bool,
    pub text: String,
}

/// Parses the CRI log format; malformed lines are skipped.
pub fn parse_cri_log(text: &str) -> Vec<CriLogLine> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(4, ' ');
            let timestamp = parts.next()?.to_owned();
            let stream = parts.next()?.to_owned();
            let tag = parts.next()?;
            let text = parts.next().unwrap_or_default().to_owned();
            if !matches!(stream.as_str(), "stdout" | "stderr") {
                return None;
            }
            Some(CriLogLine { timestamp, stream, partial: tag.starts_with('P'), text })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cri_log_lines() {
        let text = "2024-01-01T00:00:00.1Z stdout F hello world\n\
                    2024-01-01T00:00:00.2Z stderr P part\n\
                    garbage\n\
                    2024-01-01T00:00:00.3Z stdout F \n";
        let lines = parse_cri_log(text);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].text, "hello world");
        assert_eq!(lines[1].stream, "stderr");
        assert!(lines[1].partial);
        assert_eq!(lines[2].text, "");
    }
}
