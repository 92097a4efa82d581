//! One sandbox = one VM: boot it, connect the agent, place container rootfs in the shared directory, tear it
//! all down again. The shim drives this; nothing here knows about containerd.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hypervisor::{Hypervisor, NetDevice, Vm, VmExit, SHARED_FS_TAG};
use oci_spec::runtime::Spec;
use tokio::sync::watch;
use types::config::{self, Config};

use crate::agent::{AgentClient, AgentError, SandboxSetup, SharedFsMount, SharedFsType};
use crate::boot::{self, BootError};
use crate::factory::{self, FactoryError};
use crate::host_fs::{self, Root};
use crate::mounts::{self, MountPoint, MountSpec, MountSyscalls};
use crate::network::port_forward::PortForward;
use crate::network::{self, PodNetwork};
use crate::paths::{self, SandboxPaths};
use crate::persist::Persister;
use crate::placement::{HostCgroups, PlacementError};
use crate::resources::{SandboxResources, Sizing};
use crate::spec::{self, SpecError};
use crate::state::{self, SandboxState, StateError};
use crate::vm_cache;
use crate::vm_config::{self, VmConfigError};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    InvalidId(String),
    #[error(transparent)]
    VmConfig(#[from] VmConfigError),
    #[error("the VM")]
    Vm(#[source] hypervisor::Error),
    #[error("sandbox {0} has no running VM on record")]
    NoVm(String),
    #[error("connect to the agent of sandbox {id}")]
    Reconnect {
        id: String,
        #[source]
        source: AgentError,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("VM template")]
    Template(#[from] FactoryError),
    #[error("pod network")]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("limit the pod's host cgroup")]
    HostCgroupLimit(#[source] std::io::Error),
    #[error(transparent)]
    Resize(#[from] crate::resize::ResizeError),
    #[error("read the host's CPUs and memory")]
    HostLimits(#[source] std::io::Error),
}

/// The parts of the host a sandbox uses, behind seams that unit tests replace with doubles.
#[derive(Debug, Clone)]
pub struct Host {
    pub hypervisor: Arc<dyn Hypervisor>,
    pub mounts: Arc<dyn MountSyscalls>,
    /// Reaches every VM's agent instead of its endpoint: a test double's dialer, `None` for real VMs.
    pub agent_dialer: Option<Arc<dyn crate::agent::AgentDialer>>,
    /// Bounds on agent calls.
    pub agent_timeouts: crate::agent::Timeouts,
    /// Place the sandbox's processes in host cgroups (`sandbox_cgroup_only`); off for test doubles, whose
    /// "VM" is the test process itself.
    pub host_cgroups: bool,
}

impl Host {
    /// QEMU and the kernel's mount calls.
    pub fn real() -> Self {
        Host {
            hypervisor: Arc::new(hypervisor::Qemu),
            mounts: Arc::new(mounts::Syscalls),
            agent_dialer: None,
            agent_timeouts: Default::default(),
            host_cgroups: true,
        }
    }
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
    /// The pod's host cgroup and sizing, from the sandbox container's spec.
    pub resources: SandboxResources,
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
    vm: Arc<dyn Vm>,
    agent: AgentClient,
    sys: Arc<dyn MountSyscalls>,
    vm_exit: watch::Receiver<Option<VmExit>>,
    pub(crate) containers: crate::lifecycle::Containers,
    pub(crate) persister: Persister,
    /// CRI port-forward into the VM, when the pod has a network namespace and it could be set up. Only the
    /// process that started the sandbox serves it.
    port_forward: std::sync::Mutex<Option<PortForward>>,
    /// Growing the VM is one change at a time.
    pub(crate) resize_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for dyn MountSyscalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MountSyscalls")
    }
}

impl Sandbox {
    /// Boots the VM and connects the agent. On failure everything created so far is torn down.
    pub async fn start(opts: SandboxOptions, host: Host) -> Result<Self, SandboxError> {
        let sys = host.mounts.clone();
        paths::check_id("sandbox", &opts.id).map_err(SandboxError::InvalidId)?;
        let sandbox_paths = SandboxPaths::new(&opts.root, &opts.id);
        if sandbox_paths.root.exists() {
            // Left over by a crashed shim with the same id: clean it before reuse.
            state::cleanup(&*sys, &sandbox_paths).await?;
        }
        match Self::boot(&opts, &sandbox_paths, &host).await {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                if let Err(clean) = state::cleanup(&*sys, &sandbox_paths).await {
                    tracing::warn!(sandbox = %opts.id, error = %crate::error_chain(&clean), "cleanup after a failed start");
                }
                Err(e)
            }
        }
    }

    async fn boot(opts: &SandboxOptions, p: &SandboxPaths, host: &Host) -> Result<Self, SandboxError> {
        let sys = host.mounts.clone();
        let host_limits = types::config::HostLimits::detect().map_err(SandboxError::HostLimits)?;
        let sizing = Sizing::new(&opts.config, &host_limits, opts.resources.pod);
        let workload = sizing.workload([opts.resources.own]);
        let target = sizing.target(workload);
        if sizing.capped(workload) {
            tracing::warn!(sandbox = %opts.id, ?workload, max = %sizing.max, "the pod asks for more than the VM may have; capped");
        }
        let (mut config, can_grow) = pod_vm_config(&opts.id, &opts.config, p, &sizing)?;
        let dial_timeout = Duration::from_secs(u64::from(opts.config.agent.dial_timeout.max(1)));
        // A clone has exactly its template's devices: factory::template_config says which template fits.
        // A clone is as big as its template; it grows after if it can, else the pod boots its own VM. The same
        // holds for a VM from the cache, which is a clone or a boot of the configuration's default size.
        let fits_template = target == sizing.base || can_grow;
        // Root-only all the way down: container rootfs (with whatever setuid binaries a container made) and
        // volumes are under here, and no other host user may reach them.
        let parent = p.root.parent().unwrap_or(&p.root);
        host_fs::private_dir(parent).map_err(mounts::MountError::from)?;
        let cached = match fits_template {
            true => from_cache(opts, p, host, &config).await,
            false => None,
        };
        if cached.is_none() {
            make_sandbox_dirs(&*sys, p)?;
        }
        let mut state = SandboxState {
            sandbox_id: opts.id.clone(),
            processes: cached.as_ref().map(|c| c.saved.processes.clone()).unwrap_or_default(),
            shim_pid: Some(std::process::id()),
            netns: opts.netns.clone(),
            disable_guest_seccomp: opts.config.runtime.disable_guest_seccomp,
            static_resources: opts.config.runtime.static_sandbox_resource_mgmt,
            ..Default::default()
        };
        state.save(&p.state_file())?;
        let host_cgroups = match host.host_cgroups {
            true => {
                let cgroups_path = opts.resources.cgroups_path.as_deref();
                let only = opts.config.runtime.sandbox_cgroup_only;
                HostCgroups::place(&opts.id, cgroups_path, only, |placed| {
                    state.host_cgroups = placed.clone();
                    if let Err(e) = state.save(&p.state_file()) {
                        tracing::warn!(sandbox = %opts.id, error = %crate::error_chain(&e), "cannot persist the host cgroups");
                    }
                })?
            }
            false => HostCgroups::default(),
        };
        if let Some(cached) = &cached {
            let pids: Vec<u32> = cached.saved.processes.iter().map(|p| p.pid).collect();
            host_cgroups.adopt(&pids)?;
        }
        state.sizing = Some(sizing);
        let mut pod_network = PodNetwork::default();
        let mut taps = Vec::new();
        if let Some(netns) = &opts.netns {
            let setup = match cached.as_ref().is_some_and(|c| c.nics == 1) {
                true => network::setup_pod_network_adopting(netns).await?,
                false => network::setup_pod_network(netns).await?,
            };
            taps = setup.taps;
            pod_network = setup.network;
        }
        let (vm, agent, vm_exit, booted_size, template_mac) = if let Some(cached) = cached {
            let size =
                crate::resources::Size { vcpus: cached.saved.config.vcpus, memory_mib: cached.saved.config.memory_mib };
            let vm = host.hypervisor.attach(cached.saved).await.map_err(SandboxError::Vm)?;
            let agent = boot::dial(&cached.endpoint, None, dial_timeout)
                .await
                .map_err(|source| SandboxError::Reconnect { id: opts.id.clone(), source })?
                .with_timeouts(host.agent_timeouts);
            let vm_exit = boot::watch_exit(&vm);
            tracing::info!(sandbox = %opts.id, "agent connected (a VM from the cache)");
            (vm, agent, vm_exit, size, true)
        } else {
            let like_template = factory::template_config(&config, taps.len())
                .filter(|_| opts.config.factory.enable_template && fits_template);
            let template = match like_template {
                Some(like_template) => {
                    let root = PathBuf::from(&opts.config.factory.template_path);
                    match factory::ensure(&*host.hypervisor, &root, &like_template, dial_timeout).await? {
                        factory::Ensured::Ready(template) => Some(template),
                        // Another shim is making a template: boot this VM rather than wait for that boot.
                        factory::Ensured::Busy => None,
                    }
                }
                None => {
                    if opts.config.factory.enable_template && !fits_template {
                        tracing::info!(sandbox = %opts.id, %target, "bigger than the VM template and unable to grow: booting");
                    } else if opts.config.factory.enable_template {
                        tracing::info!(sandbox = %opts.id, interfaces = taps.len(), "too many network interfaces for a VM template: booting");
                    }
                    None
                }
            };
            let cloned_from = if let Some(template) = template {
                if let Some(tap) = taps.pop() {
                    config.net_devices = vec![factory::template_nic(Some(Arc::new(tap.fd)))];
                }
                template.clone_into(&mut config);
                Some(template)
            } else {
                config.vcpus = target.vcpus;
                config.memory_mib = target.memory_mib;
                for (i, (tap, iface)) in taps.into_iter().zip(&pod_network.interfaces).enumerate() {
                    config.net_devices.push(NetDevice {
                        id: format!("net{i}"),
                        mac: iface.mac.clone(),
                        fd: Some(Arc::new(tap.fd)),
                    });
                }
                None
            };
            let (config_vcpus, config_memory) = (config.vcpus, config.memory_mib);
            let vm = host.hypervisor.vm(config);
            let booted = boot::boot_and_connect_with(&vm, dial_timeout, host.agent_dialer.clone(), |processes| {
            // Persist whatever got started, even on failure, so cleanup can find it.
            state.processes = processes.to_vec();
            if let Err(e) = state.save(&p.state_file()) {
                tracing::warn!(sandbox = %opts.id, error = %crate::error_chain(&e), "cannot persist the VM's processes");
            }
        })
        .await;
            let (agent, vm_exit) = match booted {
                Ok(booted) => (booted.agent.with_timeouts(host.agent_timeouts), booted.exit),
                Err(e) => {
                    if let (Some(template), Some(hypervisor::Error::StateLoad { .. })) = (&cloned_from, e.vm_error()) {
                        // Every later clone would fail the same way: make way for a new template.
                        factory::discard(template);
                        tracing::warn!(
                            "removed the VM template {} (its state does not load); the next pod makes a new one",
                            template.dir.display()
                        );
                    }
                    return Err(e.into());
                }
            };
            tracing::info!(sandbox = %opts.id, "agent connected");
            let booted_size = crate::resources::Size { vcpus: config_vcpus, memory_mib: config_memory };
            (vm, agent, vm_exit, booted_size, cloned_from.is_some())
        };
        state.vm = Some(vm.saved().config);
        state.agent = vm.agent_endpoint();
        let setup = SandboxSetup {
            sandbox_id: opts.id.clone(),
            hostname: opts.hostname.clone(),
            dns: opts.dns.clone(),
            shared_fs: Some(shared_fs_mount(&opts.config)),
            host_time: Some(SystemTime::now()),
            entropy: host_entropy(),
        };
        let configured = async {
            agent.create_sandbox(&setup).await?;
            // A clone's NIC still has the template's MAC; the agent gives it the pod's.
            let device_mac = if template_mac { factory::TEMPLATE_NIC_MAC } else { "" };
            configure_guest_network(&agent, &pod_network, device_mac).await
        }
        .await;
        if let Err(e) = configured {
            let _ = vm.stop().await;
            return Err(e.into());
        }
        let sized = async {
            let vmm_pid = vmm_pid_of(&*vm);
            host_cgroups.move_vcpus(vmm_pid)?;
            let size = match booted_size.covers(&target) {
                true => booted_size,
                false => {
                    let size = crate::resize::grow(&*vm, &agent, booted_size, target).await?;
                    host_cgroups.move_vcpus(vmm_pid)?;
                    size
                }
            };
            host_cgroups.limit(size, workload).map_err(SandboxError::HostCgroupLimit)?;
            Ok::<_, SandboxError>(size)
        }
        .await;
        let size = match sized {
            Ok(size) => size,
            Err(e) => {
                let _ = vm.stop().await;
                return Err(e);
            }
        };
        tracing::info!(sandbox = %opts.id, %size, "VM sized");
        state.vm_size = Some(size);
        let port_forward = match &opts.netns {
            Some(netns) => PortForward::start_or_log(&opts.id, netns, vm.agent_endpoint()).await,
            None => None,
        };
        state.port_forward = port_forward.as_ref().map(PortForward::port);
        let persister = Persister::new(p.state_file(), state);
        persister.save();
        let containers = persister.containers.clone();
        Ok(Sandbox {
            id: opts.id.clone(),
            paths: p.clone(),
            vm,
            agent,
            sys,
            vm_exit,
            containers,
            persister,
            port_forward: std::sync::Mutex::new(port_forward),
            resize_lock: Default::default(),
        })
    }

    /// Finds a running sandbox by id from its persisted state, as another process left it: attaches to its VM,
    /// connects to its agent and restores its containers and their processes' states (their IO is not
    /// connected again: whoever held it is gone). Only one process drives a VM at a time: QEMU serves one
    /// control connection, and the serial agent channel carries one stream.
    pub async fn connect(root: &Path, id: &str, host: Host, dial_timeout: Duration) -> Result<Self, SandboxError> {
        paths::check_id("sandbox", id).map_err(SandboxError::InvalidId)?;
        let p = SandboxPaths::new(root, id);
        let state = SandboxState::load(&p.state_file())?;
        let (Some(config), Some(endpoint)) = (state.vm.clone(), state.agent.clone()) else {
            return Err(SandboxError::NoVm(id.to_string()));
        };
        let saved = hypervisor::SavedVm { config, processes: state.processes.clone() };
        let vm = host.hypervisor.attach(saved).await.map_err(SandboxError::Vm)?;
        let agent = boot::dial(&endpoint, host.agent_dialer.clone(), dial_timeout)
            .await
            .map_err(|source| SandboxError::Reconnect { id: id.to_string(), source })?
            .with_timeouts(host.agent_timeouts);
        let vm_exit = boot::watch_exit(&vm);
        let records = state.containers.clone();
        let persister = Persister::new(p.state_file(), state);
        let containers = persister.containers.clone();
        let sandbox = Sandbox {
            id: id.to_string(),
            paths: p,
            vm,
            agent,
            sys: host.mounts,
            vm_exit,
            containers,
            persister,
            port_forward: Default::default(),
            resize_lock: Default::default(),
        };
        crate::persist::restore_containers(&sandbox, &records);
        tracing::info!(sandbox = id, containers = records.len(), "connected to a running sandbox");
        Ok(sandbox)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent, for process-level calls (exec, signal, wait, IO streams, stats).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub(crate) fn vm(&self) -> &dyn Vm {
        &*self.vm
    }

    /// The VMM's host PID, which stands for every process of the sandbox (guest PIDs mean nothing here).
    pub fn vmm_pid(&self) -> u32 {
        vmm_pid_of(&*self.vm)
    }

    /// The guest serial console.
    pub fn console(&self) -> &hypervisor::GuestConsole {
        self.vm.console()
    }

    /// Copies the guest console into the log (at a bounded rate) until the VM exits.
    pub fn forward_console(&self) {
        crate::console::forward(self.vm.console(), self.id.clone());
    }

    /// Changes to `Some(exit)` when the VM process dies, for whatever reason.
    pub fn vm_exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.vm_exit.clone()
    }

    /// Mounts the rootfs into the shared directory and creates the container in the guest (not started).
    /// `stdin`: the front end will write the init's stdin; `pod_sandbox`: the pod's sandbox container, whose
    /// namespaces the spec's namespace joins mean.
    pub async fn create_container(
        &self,
        id: &str,
        spec: &Spec,
        rootfs: &Rootfs,
        stdin: bool,
        pod_sandbox: Option<&str>,
    ) -> Result<(), SandboxError> {
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
            let seccomp = !crate::lifecycle::lock(&self.persister.base).disable_guest_seccomp;
            let (guest_spec, binds) = spec::for_guest(spec, id, pod_sandbox, seccomp)?;
            for bind in &binds {
                self.share_bind(&root, bind)?;
            }
            self.agent.create_container(id, &guest_spec, &SandboxPaths::guest_rootfs(id), stdin).await?;
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
        self.persister.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        // Its sockets pin the pod's network namespace, which containerd removes next.
        let port_forward = self.port_forward.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(port_forward) = port_forward {
            if let Err(e) = port_forward.stop().await {
                tracing::warn!(sandbox = %self.id, error = %crate::error_chain(&e), "stopping port-forward");
            }
        }
        let stopped = self.vm.stop().await;
        state::cleanup(&*self.sys, &self.paths).await?;
        stopped.map_err(SandboxError::Vm)
    }
}

/// A sandbox's root-only directories and the guest's read-only view of `mounts/`; the VM cache makes its VMs'
/// directories with it too.
pub(crate) fn make_sandbox_dirs(sys: &dyn MountSyscalls, p: &SandboxPaths) -> Result<(), mounts::MountError> {
    for dir in [p.root.clone(), p.mounts_dir(), p.shared_dir()] {
        host_fs::private_dir(&dir)?;
    }
    mounts::make_shared_view(sys, &p.mounts_dir(), &p.shared_dir())
}

/// How the agent mounts the shared directory in the guest, for `config`'s shared filesystem.
pub(crate) fn shared_fs_mount(config: &Config) -> SharedFsMount {
    let fs_type = match config.hypervisor.shared_fs {
        config::SharedFs::VirtioFs => SharedFsType::VirtioFs,
        config::SharedFs::Virtio9p => SharedFsType::NineP,
    };
    SharedFsMount { fs_type, tag: SHARED_FS_TAG.to_string(), mount_point: None }
}

/// The VM configuration of a pod of `sizing`'s base size, with room to grow when its machine can (q35 without
/// `static_sandbox_resource_mgmt`); the second value says whether it can. The VM cache makes its VMs with it too.
pub(crate) fn pod_vm_config(
    id: &str,
    config: &Config,
    p: &SandboxPaths,
    sizing: &Sizing,
) -> Result<(hypervisor::VmConfig, bool), VmConfigError> {
    let mut vm = vm_config::vm_config(id, config, p)?;
    let can_grow = vm.qemu.machine == hypervisor::MachineType::Q35 && !config.runtime.static_sandbox_resource_mgmt;
    if can_grow {
        vm.max_vcpus = sizing.max.vcpus;
        vm.max_memory_mib = sizing.max.memory_mib;
    }
    Ok((vm, can_grow))
}

/// A VM taken from the cache and made this sandbox's, not yet attached to.
struct Cached {
    saved: hypervisor::SavedVm,
    endpoint: hypervisor::AgentEndpoint,
    nics: usize,
}

/// A VM from the cache for this pod, if the configuration asks for a cache and it has one of the pod's kind
/// (template and NIC count). Whatever goes wrong is logged, cleaned up, and the pod starts its own VM.
async fn from_cache(
    opts: &SandboxOptions,
    p: &SandboxPaths,
    host: &Host,
    config: &hypervisor::VmConfig,
) -> Option<Cached> {
    let factory_config = &opts.config.factory;
    if factory_config.vm_cache_number == 0 || host.agent_dialer.is_some() {
        return None;
    }
    let nics = match &opts.netns {
        Some(netns) => match network::count_pod_interfaces(netns).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(sandbox = %opts.id, error = %crate::error_chain(&e), "not using the VM cache");
                return None;
            }
        },
        None => 0,
    };
    let like = factory::template_config(config, nics)?;
    let key = vm_cache::cache_key(&factory::key(&*host.hypervisor, &like), factory_config.enable_template);
    let request = vm_cache::Request::Take {
        key,
        nics: nics as u32,
        netns: opts.netns.clone(),
        tap: (nics == 1).then(|| network::tap_name(0)),
    };
    let dir = vm_cache::take(std::path::Path::new(&factory_config.vm_cache_endpoint), &request).await?;
    match vm_cache::adopt(&dir, p, &opts.id) {
        Ok((saved, endpoint)) => {
            tracing::info!(sandbox = %opts.id, from = %dir.display(), "VM from the cache");
            Some(Cached { saved, endpoint, nics })
        }
        Err(e) => {
            tracing::warn!(sandbox = %opts.id, error = %crate::error_chain(&e), "cannot take the VM from the cache; starting one");
            for root in [dir, p.root.clone()] {
                if let Err(e) = state::cleanup(&*host.mounts, &SandboxPaths { root }).await {
                    tracing::warn!(sandbox = %opts.id, error = %crate::error_chain(&e), "removing the cached VM");
                }
            }
            if let Some(netns) = opts.netns.as_ref().filter(|_| nics == 1) {
                if let Err(e) = network::teardown_pod_network(netns).await {
                    tracing::warn!(sandbox = %opts.id, error = %crate::error_chain(&e), "removing the cached VM's tap");
                }
            }
            None
        }
    }
}

/// The VMM's host PID (its processes come VMM first); 0 once none is running.
fn vmm_pid_of(vm: &dyn Vm) -> u32 {
    vm.pids().first().map(|p| p.pid).unwrap_or(0)
}

/// Unmounts a container's rootfs and volumes and removes its directory under `mounts/` (which takes its view
/// in `shared/` with it). Fails closed, logging why: a directory that still holds a mount is left in place.
/// Also used by `delete` after the shim serving the container died.
pub fn release_container_dir(sys: &dyn MountSyscalls, paths: &SandboxPaths, container_id: &str) {
    if paths::check_id("container", container_id).is_err() {
        return;
    }
    if let Err(e) = mounts::unmount_and_remove(sys, &paths.root.join(SandboxPaths::container_rel(container_id))) {
        tracing::warn!(container = container_id, error = %crate::error_chain(&e), "releasing the container's mounts");
    }
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
            tracing::warn!(error = %e, "cannot read /dev/urandom for the guest");
            Vec::new()
        }
    }
}

/// Gives the guest NICs the pod interfaces' addresses, then the routes (kernel-made ones come back by
/// themselves with the addresses), then the permanent neighbours.
async fn configure_guest_network(agent: &AgentClient, net: &PodNetwork, device_mac: &str) -> Result<(), AgentError> {
    for iface in &net.interfaces {
        agent
            .update_interface(&crate::agent::Interface { device_mac: device_mac.to_string(), ..iface.clone() })
            .await?;
    }
    let routes: Vec<_> = net.routes.iter().filter(|r| !r.kernel).cloned().collect();
    if !routes.is_empty() {
        agent.update_routes(&routes).await?;
    }
    if !net.neighbors.is_empty() {
        agent.add_arp_neighbors(&net.neighbors).await?;
    }
    Ok(())
}
