//! One sandbox = one VM: boot it, connect the agent, place container rootfs in the shared directory, tear it
//! all down again. The shim drives this; nothing here knows about containerd.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hypervisor::{Hypervisor, NetDevice, QemuVm, VmExit, SHARED_FS_TAG};
use oci_spec::runtime::Spec;
use tokio::sync::watch;
use types::config::{self, Config};

use crate::agent::{AgentClient, AgentError, ReadySignal, SandboxSetup, SharedFsMount, SharedFsType, AGENT_PORT};
use crate::factory::{self, FactoryError};
use crate::host_fs::{self, Root};
use crate::mounts::{self, MountPoint, MountSpec, MountSyscalls};
use crate::network::{self, PodNetwork};
use crate::paths::{self, SandboxPaths};
use crate::spec::{self, SpecError};
use crate::state::{self, SandboxState, StateError};
use crate::vm_config::{self, VmConfigError};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    InvalidId(String),
    #[error(transparent)]
    VmConfig(#[from] VmConfigError),
    #[error("start the VM: {0}")]
    Vm(#[source] hypervisor::Error),
    #[error("the VM has no agent socket (no vsock daemon configured)")]
    NoAgentSocket,
    #[error("connect to the agent: {source}; last lines of the guest console:\n{console}")]
    Connect { source: AgentError, console: String },
    #[error("the VM exited ({exit}) before its agent answered; last lines of the guest console:\n{console}")]
    ExitedBeforeAgent { exit: VmExit, console: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("VM template: {0}")]
    Template(#[from] FactoryError),
    #[error("pod network: {0}")]
    Network(#[from] network::NetworkError),
}

/// What a sandbox needs to start.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub id: String,
    /// The effective configuration (annotations already applied).
    pub config: Config,
    /// Parent of the per-sandbox directories, normally [`paths::DEFAULT_ROOT`].
    pub root: PathBuf,
    pub hostname: String,
    /// resolv.conf lines for the guest.
    pub dns: Vec<String>,
    /// The pod's network namespace prepared by CNI; its interfaces are mirrored into the VM.
    pub netns: Option<PathBuf>,
}

/// Where a container's root filesystem comes from on the host.
#[derive(Debug, Clone)]
pub enum Rootfs {
    /// containerd's rootfs mounts (e.g. one overlay); mounted into the shared directory.
    Mounts(Vec<MountSpec>),
    /// An already prepared directory (the bundle's `rootfs/`), bind-mounted into the shared directory.
    Dir(PathBuf),
}

#[derive(Debug)]
pub struct Sandbox {
    id: String,
    paths: SandboxPaths,
    vm: Arc<QemuVm>,
    agent: AgentClient,
    sys: Arc<dyn MountSyscalls>,
    vm_exit: watch::Receiver<Option<VmExit>>,
}

impl std::fmt::Debug for dyn MountSyscalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MountSyscalls")
    }
}

impl Sandbox {
    /// Boots the VM and connects the agent. On failure everything created so far is torn down.
    pub async fn start(opts: SandboxOptions, sys: Arc<dyn MountSyscalls>) -> Result<Self, SandboxError> {
        paths::check_id("sandbox", &opts.id).map_err(SandboxError::InvalidId)?;
        let sandbox_paths = SandboxPaths::new(&opts.root, &opts.id);
        if sandbox_paths.root.exists() {
            // Left over by a crashed shim with the same id: clean it before reuse.
            state::cleanup(&*sys, &sandbox_paths).await?;
        }
        match Self::boot(&opts, &sandbox_paths, sys.clone()).await {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                if let Err(clean) = state::cleanup(&*sys, &sandbox_paths).await {
                    tracing::warn!("cleanup after failed start of {}: {clean}", opts.id);
                }
                Err(e)
            }
        }
    }

    async fn boot(opts: &SandboxOptions, p: &SandboxPaths, sys: Arc<dyn MountSyscalls>) -> Result<Self, SandboxError> {
        // Root-only all the way down: container rootfs (with whatever setuid binaries a container made) and
        // volumes are under here, and no other host user may reach them.
        let parent = p.root.parent().unwrap_or(&p.root);
        for dir in [parent.to_path_buf(), p.root.clone(), p.mounts_dir(), p.shared_dir()] {
            host_fs::private_dir(&dir).map_err(mounts::MountError::from)?;
        }
        mounts::make_shared_view(&*sys, &p.mounts_dir(), &p.shared_dir())?;
        let mut state = SandboxState {
            sandbox_id: opts.id.clone(),
            processes: vec![],
            shim_pid: Some(std::process::id()),
            netns: opts.netns.clone(),
        };
        state.save(&p.state_file())?;
        let mut config = vm_config::vm_config(&opts.id, &opts.config, p)?;
        let mut pod_network = PodNetwork::default();
        let mut taps = Vec::new();
        if let Some(netns) = &opts.netns {
            let setup = network::setup_pod_network(netns).await?;
            taps = setup.taps;
            pod_network = setup.network;
        }
        let dial_timeout = Duration::from_secs(u64::from(opts.config.agent.dial_timeout.max(1)));
        // A clone has exactly its template's devices. There is a template without a NIC (pods without a
        // network) and one with a NIC (pods with one interface): the NIC costs a clone ~4 MiB.
        let template = if opts.config.factory.enable_template && taps.len() <= 1 {
            let mut like_template = config.clone();
            like_template.net_devices = taps.iter().map(|_| factory::template_nic(None)).collect();
            let root = PathBuf::from(&opts.config.factory.template_path);
            match factory::ensure(&root, &like_template, dial_timeout).await? {
                factory::Ensured::Ready(template) => Some(template),
                // Another shim is making a template: boot this VM rather than wait for that boot.
                factory::Ensured::Busy => None,
            }
        } else {
            if opts.config.factory.enable_template {
                tracing::info!(
                    "sandbox {} has {} network interfaces, the VM template one: booting it",
                    opts.id,
                    taps.len()
                );
            }
            None
        };
        let cloned_from = if let Some(template) = template {
            if let Some(tap) = taps.pop() {
                config.net_devices = vec![factory::template_nic(Some(Arc::new(tap.fd)))];
            }
            template.clone_into(&mut config);
            Some(template)
        } else {
            for (i, (tap, iface)) in taps.into_iter().zip(&pod_network.interfaces).enumerate() {
                config.net_devices.push(NetDevice {
                    id: format!("net{i}"),
                    mac: iface.mac.clone(),
                    fd: Some(Arc::new(tap.fd)),
                });
            }
            None
        };
        let vm = Arc::new(QemuVm::new(config));
        vm.prepare().await.map_err(SandboxError::Vm)?;
        let transport = match (vm.agent_serial_socket(), vm.agent_socket()) {
            (Some(serial), _) => Transport::Serial(serial),
            (None, Some(socket)) => {
                let ready = ReadySignal::bind(&socket).map_err(|e| SandboxError::Agent(e.into()))?;
                Transport::Vsock(socket, ready)
            }
            (None, None) => return Err(SandboxError::NoAgentSocket),
        };
        let started = vm.start().await;
        // Persist whatever got started, even on failure, so cleanup can find it.
        state.processes = vm.pids();
        state.save(&p.state_file())?;
        if let Err(e) = started {
            if let (Some(template), hypervisor::Error::StateLoad { .. }) = (&cloned_from, &e) {
                // Every later clone would fail the same way: make way for a new template.
                factory::discard(template);
                tracing::warn!(
                    "removed the VM template {} (its state does not load); the next pod makes a new one",
                    template.dir.display()
                );
            }
            return Err(SandboxError::Vm(e));
        }
        let (exit_tx, vm_exit) = watch::channel(None);
        let watched = vm.clone();
        tokio::spawn(async move {
            if let Ok(exit) = watched.wait().await {
                let _ = exit_tx.send(Some(exit));
            }
        });
        let dial = async {
            match &transport {
                Transport::Serial(path) => AgentClient::connect_serial(path, dial_timeout).await,
                Transport::Vsock(socket, ready) => {
                    AgentClient::connect_when_ready(ready, socket, AGENT_PORT, dial_timeout).await
                }
            }
        };
        // A VM that dies while we dial (a guest panic, QEMU killed) ends the dial at once.
        let mut exited = vm_exit.clone();
        let connected = tokio::select! {
            connected = dial => connected.map_err(Some),
            _ = exited.wait_for(Option::is_some) => Err(None),
        };
        let agent = match connected {
            Ok(agent) => agent,
            Err(failure) => {
                let console = vm.console().tail(20);
                let _ = vm.stop().await;
                return Err(match failure {
                    Some(source) => SandboxError::Connect { source, console },
                    None => SandboxError::ExitedBeforeAgent {
                        exit: vm_exit.borrow().unwrap_or(VmExit { code: None, signal: None }),
                        console,
                    },
                });
            }
        };
        tracing::info!("agent connected {}", opts.id);
        let fs_type = match opts.config.hypervisor.shared_fs {
            config::SharedFs::VirtioFs => SharedFsType::VirtioFs,
            config::SharedFs::Virtio9p => SharedFsType::NineP,
        };
        let setup = SandboxSetup {
            sandbox_id: opts.id.clone(),
            hostname: opts.hostname.clone(),
            dns: opts.dns.clone(),
            shared_fs: Some(SharedFsMount { fs_type, tag: SHARED_FS_TAG.to_string(), mount_point: None }),
            host_time: Some(SystemTime::now()),
            entropy: host_entropy(),
        };
        let configured = async {
            agent.create_sandbox(&setup).await?;
            // A clone's NIC still has the template's MAC; the agent gives it the pod's.
            let device_mac = if cloned_from.is_some() { factory::TEMPLATE_NIC_MAC } else { "" };
            configure_guest_network(&agent, &pod_network, device_mac).await
        }
        .await;
        if let Err(e) = configured {
            let _ = vm.stop().await;
            return Err(e.into());
        }
        Ok(Sandbox { id: opts.id.clone(), paths: p.clone(), vm, agent, sys, vm_exit })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent, for process-level calls (exec, signal, wait, IO streams, stats).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn vm(&self) -> &Arc<QemuVm> {
        &self.vm
    }

    /// Changes to `Some(exit)` when the VM process dies, for whatever reason.
    pub fn vm_exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.vm_exit.clone()
    }

    /// Mounts the rootfs into the shared directory and creates the container in the guest (not started).
    pub async fn create_container(&self, id: &str, spec: &Spec, rootfs: &Rootfs) -> Result<(), SandboxError> {
        paths::check_id("container", id).map_err(SandboxError::InvalidId)?;
        let root = Root::open(&self.paths.root).map_err(mounts::MountError::from)?;
        let rootfs_spec = match rootfs {
            Rootfs::Mounts(list) if list.len() == 1 => list[0].clone(),
            Rootfs::Mounts(list) => {
                return Err(SpecError::Rootfs(format!("{} rootfs mounts; expected 1", list.len())).into())
            }
            Rootfs::Dir(dir) => {
                MountSpec { kind: "bind".into(), source: dir.display().to_string(), options: vec!["rbind".into()] }
            }
        };
        let target = SandboxPaths::rootfs_rel(id);
        if let Err(e) = mounts::mount_beneath(&*self.sys, &root, &target, MountPoint::Dir, &rootfs_spec) {
            self.release_container_mounts(id);
            return Err(e.into());
        }
        let result = async {
            let (guest_spec, binds) = spec::for_guest(spec, id)?;
            for bind in &binds {
                self.share_bind(&root, bind)?;
            }
            self.agent.create_container(id, &guest_spec, &SandboxPaths::guest_rootfs(id)).await?;
            Ok::<_, SandboxError>(())
        }
        .await;
        if result.is_err() {
            self.release_container_mounts(id);
        }
        result
    }

    /// Bind-mounts a host path of a volume under `mounts/` (a file onto a file, a dir onto a dir), from where
    /// the guest sees it in the shared directory.
    fn share_bind(&self, root: &Root, bind: &spec::SharedBind) -> Result<(), SandboxError> {
        let target = Path::new(paths::MOUNTS).join(&bind.shared_path);
        let point = if bind.host_source.is_dir() { MountPoint::Dir } else { MountPoint::File };
        let mut options = vec!["rbind".to_string()];
        if bind.read_only {
            options.push("ro".to_string());
        }
        let spec = MountSpec { kind: "bind".into(), source: bind.host_source.display().to_string(), options };
        mounts::mount_beneath(&*self.sys, root, &target, point, &spec)?;
        Ok(())
    }

    /// Removes the container in the guest and its mounts on the host.
    pub async fn remove_container(&self, id: &str) -> Result<(), SandboxError> {
        let removed = self.agent.remove_container(id).await;
        self.release_container_mounts(id);
        removed.map_err(Into::into)
    }

    fn release_container_mounts(&self, id: &str) {
        release_container_dir(&*self.sys, &self.paths, id);
    }

    /// Stops the VM and removes everything on the host. Safe to call more than once. The guest is not asked
    /// to tear its containers down first: nothing of it outlives the VM, and writes to shared directories
    /// have already reached the host (virtio-fs and 9p write through).
    pub async fn stop(&self) -> Result<(), SandboxError> {
        let stopped = self.vm.stop().await;
        state::cleanup(&*self.sys, &self.paths).await?;
        stopped.map_err(SandboxError::Vm)
    }
}

/// Unmounts a container's rootfs and volumes and removes its directory under `mounts/` (which takes its view
/// in `shared/` with it). Fails closed, logging why: a directory that still holds a mount is left in place.
/// Also used by `delete` after the shim serving the container died.
pub fn release_container_dir(sys: &dyn MountSyscalls, paths: &SandboxPaths, container_id: &str) {
    if paths::check_id("container", container_id).is_err() {
        return;
    }
    if let Err(e) = mounts::unmount_and_remove(sys, &paths.root.join(SandboxPaths::container_rel(container_id))) {
        tracing::warn!(container = container_id, "releasing the container's mounts: {e}");
    }
}

/// How the host reaches this sandbox's agent.
enum Transport {
    /// QEMU's socket for the agent's virtio-serial port.
    Serial(PathBuf),
    /// vhost-device-vsock's hybrid vsock socket, and the agent's readiness signal beside it.
    Vsock(PathBuf, ReadySignal),
}

/// 64 bytes from the host's generator for the guest to reseed with. A clone of a template would otherwise
/// share the template's random state with every other clone. Reading /dev/urandom does not fail on Linux;
/// if it somehow does, the guest keeps its own state and the error is logged.
fn host_entropy() -> Vec<u8> {
    use std::io::Read;
    let mut bytes = vec![0u8; 64];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => bytes,
        Err(e) => {
            tracing::warn!("cannot read /dev/urandom for the guest: {e}");
            Vec::new()
        }
    }
}

/// Gives the guest NICs the pod interfaces' addresses, then the routes (kernel-made ones come back by
/// themselves with the addresses), then the permanent neighbours.
async fn configure_guest_network(agent: &AgentClient, net: &PodNetwork, device_mac: &str) -> Result<(), AgentError> {
    for iface in &net.interfaces {
        let mut iface: crate::agent::Interface = iface.into();
        iface.device_mac = device_mac.to_string();
        agent.update_interface(&iface).await?;
    }
    let routes: Vec<_> = net.routes.iter().filter(|r| !r.kernel).map(Into::into).collect();
    if !routes.is_empty() {
        agent.update_routes(&routes).await?;
    }
    let neighbors: Vec<_> = net.neighbors.iter().map(Into::into).collect();
    if !neighbors.is_empty() {
        agent.add_arp_neighbors(&neighbors).await?;
    }
    Ok(())
}
