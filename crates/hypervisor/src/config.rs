//! The hypervisor's own input: what one VM needs, independent of the configuration file format.
//!
//! The runtime maps `types`' configuration onto [`VmConfig`]; nothing here knows about TOML keys.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use types::config::DEFAULT_TCG_TB_SIZE_MIB;

use crate::accel::AccelChoice;

/// QEMU's `-sandbox` (seccomp) by default: no obsolete syscalls, no gaining privileges, no new processes, no
/// changing scheduling or CPU affinity. Kata's `seccompsandbox` recommends the same.
pub const DEFAULT_SECCOMP_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Everything needed to boot one VM, in words every backend shares. What only QEMU needs is in [`QemuConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Name shown by the VMM and in logs, e.g. the sandbox id.
    pub name: String,
    /// Guest kernel, an uncompressed PVH `vmlinux`.
    pub kernel: PathBuf,
    /// Guest initrd holding the agent.
    pub initrd: Option<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The most vCPUs the VM may grow to while it runs ([`crate::Vm::resize`]; the configuration's
    /// `default_maxvcpus`). 0, or not more than `vcpus`, leaves no room to grow. Only q35 can grow; microvm
    /// ignores it.
    #[serde(default)]
    pub max_vcpus: u32,
    /// The most memory in MiB the VM may grow to while it runs (the configuration's `default_maxmemory`). 0,
    /// or not more than `memory_mib`, leaves no room to grow. Only q35 can grow; microvm ignores it.
    #[serde(default)]
    pub max_memory_mib: u32,
    /// Extra kernel parameters, appended after the ones the backend always sets.
    pub kernel_params: Vec<String>,
    pub accel: AccelChoice,
    pub shared_fs: SharedFs,
    /// How the host reaches the guest agent; `None` boots without a channel for it (tests, probes).
    #[serde(default)]
    pub agent: Option<AgentTransport>,
    /// Where guest RAM lives.
    #[serde(default)]
    pub memory: GuestMemory,
    /// Private per-VM directory for sockets. Created by `prepare`, removed by `stop`.
    /// Keep it short: unix socket paths inside it must fit in 107 bytes.
    pub work_dir: PathBuf,
    /// Boot without `quiet`, so the whole kernel log lands in the console.
    pub debug: bool,
    /// A virtio-balloon with free page reporting: memory the guest frees is dropped on the host.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Guest NICs backed by tap devices the caller opened. Open fds cannot be persisted: serialising a config
    /// leaves them out, and a deserialised config has none.
    #[serde(skip)]
    pub net_devices: Vec<NetDevice>,
    /// The QEMU backend's own settings.
    #[serde(default)]
    pub qemu: QemuConfig,
}

impl VmConfig {
    /// A config with the defaults Kata uses (1 vCPU, 256 MiB, automatic accelerator, no shared fs, no agent
    /// channel; for QEMU a microvm under [`DEFAULT_SECCOMP_SANDBOX`]); callers fill in the rest.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>, work_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            kernel: kernel.into(),
            initrd: None,
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: 0,
            max_memory_mib: 0,
            kernel_params: Vec::new(),
            accel: AccelChoice::Auto,
            shared_fs: SharedFs::None,
            agent: None,
            memory: GuestMemory::Memfd,
            work_dir: work_dir.into(),
            debug: false,
            free_page_reporting: false,
            net_devices: Vec::new(),
            qemu: QemuConfig::default(),
        }
    }
}

/// How big a VM is: what [`crate::Vm::size`] reports and [`crate::Vm::resize`] grows to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

/// How the host reaches the agent in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum AgentTransport {
    /// A guest vsock port, reached from the host through a unix socket (`CONNECT <port>\n`). The kind every
    /// VMM offers; QEMU needs [`QemuConfig::vsock_daemon`] for it.
    HybridVsock,
    /// A virtio-serial port with this name. Unlike a vhost-user vsock it survives saving and loading a VM, so
    /// VMs made from a template use it.
    Serial { port: String },
}

/// Where a running VM's agent channel is on the host, as [`crate::Vm::agent_endpoint`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type", content = "path")]
pub enum AgentEndpoint {
    /// A hybrid vsock unix socket: write `CONNECT <port>\n`, read `OK <n>\n`, then the stream is the port's.
    HybridVsock(PathBuf),
    /// A unix socket whose one stream is the agent's serial port.
    Serial(PathBuf),
}

/// What only the QEMU backend needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QemuConfig {
    /// The QEMU binary, e.g. `/usr/bin/qemu-system-x86_64`.
    pub path: PathBuf,
    pub machine: MachineType,
    /// TCG translation buffer in MiB (`-accel tcg,tb-size=`); unused under KVM.
    pub tcg_tb_size_mib: u32,
    /// QEMU's `-sandbox` value, e.g. [`DEFAULT_SECCOMP_SANDBOX`]; `None` or empty runs QEMU without seccomp.
    pub seccomp_sandbox: Option<String>,
    /// `vhost-device-vsock`, which serves [`AgentTransport::HybridVsock`] for QEMU.
    pub vsock_daemon: Option<PathBuf>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            machine: MachineType::default(),
            tcg_tb_size_mib: DEFAULT_TCG_TB_SIZE_MIB,
            seccomp_sandbox: Some(DEFAULT_SECCOMP_SANDBOX.to_string()),
            vsock_daemon: None,
        }
    }
}

/// Where guest RAM lives. A template VM and its clones share one file: the template writes its memory there,
/// each clone maps it copy-on-write, so the pages a clone only reads are in host memory once for all clones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum GuestMemory {
    /// An anonymous shared memfd, which vhost-user daemons can map.
    #[default]
    Memfd,
    /// A template being made: RAM is the (shared) `file`, which holds the guest's memory once it is saved with
    /// [`crate::Snapshot::save`].
    Template { file: PathBuf },
    /// A clone of a template: its memory `file` mapped privately, and its device state loaded from `state`
    /// when the VM starts, instead of a boot.
    Clone { file: PathBuf, state: PathBuf },
}

/// A virtio-net NIC whose host side is an open tap device.
///
/// The caller opens the tap (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`, usually `IFF_VNET_HDR`, close-on-exec) in
/// whatever network namespace it lives in, so QEMU itself never changes namespace. QEMU receives a duplicate of
/// `fd` at a fixed number, made in the child between fork and exec; the caller's copy keeps `FD_CLOEXEC` and
/// stays open for as long as any clone of the config (the `QemuVm` holds one) is alive. QEMU probes
/// `IFF_VNET_HDR` on the fd itself.
#[derive(Debug, Clone)]
pub struct NetDevice {
    /// QEMU's id for the netdev (`net0`): letters, digits, `-`, `_`, `.`, starting with a letter; unique per VM.
    pub id: String,
    /// The guest NIC's MAC, `aa:bb:cc:dd:ee:ff` (unicast).
    pub mac: String,
    /// The tap device; `None` leaves the NIC without a host side (`-netdev hubport` on a hub of its own),
    /// as a template VM has it: clones get the same NIC with their pod's tap.
    pub fd: Option<Arc<OwnedFd>>,
}

/// Equal when they name the same id and MAC and hold the same open fd (same number in this process).
impl PartialEq for NetDevice {
    fn eq(&self, other: &Self) -> bool {
        let fd = |n: &NetDevice| n.fd.as_ref().map(|fd| fd.as_raw_fd());
        self.id == other.id && self.mac == other.mac && fd(self) == fd(other)
    }
}

impl Eq for NetDevice {}

/// QEMU machine type (the configuration's `machine_type`). Devices are virtio-mmio on `microvm` and virtio-pci on `q35`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    #[default]
    Microvm,
    Q35,
}

/// How the host directory with container rootfs and volumes reaches the guest. The guest mounts it by the tag
/// [`SHARED_FS_TAG`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum SharedFs {
    /// virtio-fs served by a per-VM `virtiofsd`.
    VirtioFs {
        daemon: PathBuf,
        /// Appended to virtiofsd's arguments, e.g. `--sandbox=none`, `--thread-pool-size=1`.
        extra_args: Vec<String>,
        shared_dir: PathBuf,
    },
    /// QEMU's built-in 9p server.
    Virtio9p { shared_dir: PathBuf },
    #[default]
    None,
}

/// The mount tag of the shared filesystem, for virtio-fs and 9p alike.
pub const SHARED_FS_TAG: &str = "kataShared";

/// The guest CID the vsock daemon gives the VM. Each VM has its own daemon, so it never collides.
pub const GUEST_CID: u32 = 3;
