//! Pure command-line builders for QEMU and its helper daemons. No I/O: the same inputs give the same
//! arguments, so every variant is unit-tested without a VM.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::accel::Accel;
use crate::config::{AgentTransport, GuestMemory, MachineType, SharedFs, VmConfig, GUEST_CID, SHARED_FS_TAG};
use crate::qemu::resize::{Growth, MEMORY_SLOTS};

/// QEMU inherits fds from this one on (right after stdio): first the console socket ([`CONSOLE_FD`]), then the
/// tap fds of `config.net_devices` in order; NICs without a tap take no fd.
pub const FIRST_INHERITED_FD: RawFd = 3;
/// One end of a socket pair QEMU writes the guest serial console to; the host drains the other end into a
/// bounded ring, so the guest cannot fill a file.
pub const CONSOLE_FD: RawFd = FIRST_INHERITED_FD;
/// The name a migration stream's fd gets in QEMU (QMP `getfd`), for `migrate` and `migrate-incoming`.
pub const MIGRATION_FD_NAME: &str = "migration";

/// Files a VM keeps in its work dir. Names are fixed so crash cleanup and debugging know where to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub work_dir: PathBuf,
}

impl VmPaths {
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self { work_dir: work_dir.into() }
    }
    /// QMP control socket (QEMU listens).
    pub fn qmp_socket(&self) -> PathBuf {
        self.work_dir.join("qmp.sock")
    }
    /// vhost-user socket between QEMU and vhost-device-vsock (the daemon listens).
    pub fn vhost_vsock_socket(&self) -> PathBuf {
        self.work_dir.join("vhost-vsock.sock")
    }
    /// Hybrid-vsock socket the host side of the agent connection uses (`CONNECT <port>\n`).
    pub fn agent_socket(&self) -> PathBuf {
        self.work_dir.join("kata.sock")
    }
    /// The agent's virtio-serial port, when the VM has one (QEMU listens).
    pub fn agent_serial_socket(&self) -> PathBuf {
        self.work_dir.join("agent-serial.sock")
    }
    /// vhost-user socket between QEMU and virtiofsd (virtiofsd listens).
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.work_dir.join("virtiofsd.sock")
    }
    /// Every socket the VM's processes create.
    pub fn sockets(&self) -> [PathBuf; 5] {
        [
            self.qmp_socket(),
            self.vhost_vsock_socket(),
            self.agent_socket(),
            self.virtiofsd_socket(),
            self.agent_serial_socket(),
        ]
    }
    /// The sockets plus virtiofsd's pid file (`<socket>.pid`): what must go on every exit path, since a stale
    /// socket or pid file makes the next daemon fail.
    pub fn runtime_files(&self) -> Vec<PathBuf> {
        let mut files = self.sockets().to_vec();
        files.push(self.work_dir.join("virtiofsd.sock.pid"));
        files
    }
}

/// Kernel arguments the backend always sets, in order, before the user's.
pub fn kernel_params(config: &VmConfig, accel: Accel, tsc_khz: Option<u32>) -> Vec<String> {
    let mut params: Vec<String> = ["console=ttyS0", "reboot=t", "panic=-1"].map(String::from).to_vec();
    if !config.debug {
        params.push("quiet".into());
    }
    if let (Accel::Tcg, Some(khz)) = (accel, tsc_khz) {
        params.push(format!("tsc_early_khz={khz}"));
        // TCG's TSC follows the host clock, but the kernel checks it every 0.5 s against jiffies, which lag
        // when the host is loaded. Under load the check then marked the TSC unstable and the guest fell back to
        // jiffies for its clock; idle, the checks were 2 of the ~5 vCPU wakeups a second.
        params.push("tsc=reliable".into());
    }
    params.extend(config.kernel_params.iter().cloned());
    params
}

/// QEMU's arguments (without the program itself) for `config` running with `accel`. `tsc_khz` is the host TSC
/// frequency; it is passed to the guest only under TCG.
pub fn qemu_args(config: &VmConfig, accel: Accel, tsc_khz: Option<u32>) -> Vec<String> {
    let paths = VmPaths::new(&config.work_dir);
    let bus = Bus::of(config.qemu.machine);
    let mem = format!("{}M", config.memory_mib);
    let mut args = Args::default();

    if !config.name.is_empty() {
        // debug-threads names the vCPU threads (`CPU 0/TCG`), so the runtime can place them in the pod's cgroup.
        args.push2("-name", format!("{},debug-threads=on", config.name));
    }
    if let Some(sandbox) = config.qemu.seccomp_sandbox.as_deref().filter(|s| !s.is_empty()) {
        args.push2("-sandbox", sandbox);
    }
    let machine = match config.qemu.machine {
        // isa-serial carries the console. rtc=on: without it a TCG boot takes ~3 s longer. The PIT is only for
        // calibrating the TSC, which `tsc_early_khz` does under TCG (see `kernel_params`); left in its reset
        // mode, QEMU's PIT wakes the main loop 36 times a second for as long as the VM runs: more than half of an
        // idle pod's main-loop CPU time. Without a TSC hint (or under KVM, whose PIT is in the host kernel) it
        // stays.
        MachineType::Microvm => {
            let pit = if accel == Accel::Tcg && tsc_khz.is_some() { "off" } else { "on" };
            format!("microvm,pit={pit},pic=off,isa-serial=on,rtc=on,memory-backend=mem")
        }
        MachineType::Q35 => "q35,memory-backend=mem".to_string(),
    };
    args.push2("-machine", machine);
    args.push2(
        "-accel",
        match accel {
            Accel::Kvm => "kvm".to_string(),
            // TCG's translation buffer defaults to 1 GiB and a booted guest fills tens of MiB of it: the
            // largest part of an idle VM's host memory. A small guest runs as fast with a capped buffer.
            Accel::Tcg => format!("tcg,tb-size={}", config.qemu.tcg_tb_size_mib),
        },
    );
    args.push2(
        "-cpu",
        match accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        },
    );
    // Room to grow (q35 only): CPU slots beyond the boot vCPUs, DIMM slots and a ceiling for hot-plugged memory.
    let growth = Growth::of(config);
    args.push2(
        "-smp",
        match growth.max_vcpus {
            Some(max) => format!("{},maxcpus={max}", config.vcpus),
            None => config.vcpus.to_string(),
        },
    );
    args.push2(
        "-m",
        match growth.max_memory_mib {
            Some(max) => format!("{mem},slots={MEMORY_SLOTS},maxmem={max}M"),
            None => mem.clone(),
        },
    );
    args.push2("-object", memory_backend(&config.memory, &mem));
    args.push_all(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    if let GuestMemory::Clone { .. } = config.memory {
        // The state is loaded over QMP once QEMU is up (`migrate-incoming`), with the capability it needs.
        args.push2("-incoming", "defer");
    }
    if config.qemu.machine == MachineType::Microvm {
        // QEMU defaults virtio-mmio to the legacy (virtio 0.9) register layout for old guests. Our kernel speaks
        // virtio 1.x, the layout the vhost-user backends and other VMMs (Firecracker, Cloud Hypervisor) use.
        args.push2("-global", "virtio-mmio.force-legacy=false");
    }

    args.push2("-kernel", path_str(&config.kernel));
    if let Some(initrd) = &config.initrd {
        args.push2("-initrd", path_str(initrd));
    }
    args.push2("-append", kernel_params(config, accel, tsc_khz).join(" "));

    // A connected socket passed as an fd: QEMU needs no path and never learns where the output goes.
    args.push2("-chardev", format!("socket,id=console,fd={CONSOLE_FD}"));
    args.push2("-serial", "chardev:console");
    args.push2("-chardev", format!("socket,id=qmp,path={},server=on,wait=off", path_str(&paths.qmp_socket())));
    args.push2("-mon", "chardev=qmp,mode=control");

    if config.free_page_reporting {
        // The guest reports free 2 MiB blocks a few seconds after freeing them; QEMU then punches them out of
        // the memfd, so the host gets back what booting touched once (the initrd and its unpacking).
        args.push2("-device", format!("virtio-balloon-{},free-page-reporting=on", bus.suffix()));
    }
    if config.agent == Some(AgentTransport::HybridVsock) {
        args.push2("-chardev", format!("socket,id=vsock,path={}", path_str(&paths.vhost_vsock_socket())));
        args.push2("-device", format!("vhost-user-vsock-{},chardev=vsock", bus.suffix()));
    }
    if let Some(AgentTransport::Serial { port: name }) = &config.agent {
        args.push2("-device", format!("virtio-serial-{},max_ports=2", bus.suffix()));
        args.push2(
            "-chardev",
            format!("socket,id=agent,path={},server=on,wait=off", path_str(&paths.agent_serial_socket())),
        );
        args.push2("-device", format!("virtserialport,chardev=agent,name={name}"));
    }
    match &config.shared_fs {
        SharedFs::VirtioFs { .. } => {
            args.push2("-chardev", format!("socket,id=virtiofs,path={}", path_str(&paths.virtiofsd_socket())));
            args.push2("-device", format!("vhost-user-fs-{},chardev=virtiofs,tag={SHARED_FS_TAG}", bus.suffix()));
        }
        SharedFs::Virtio9p { shared_dir } => {
            args.push2(
                "-fsdev",
                format!("local,id=shared9p,path={},security_model=none,multidevs=remap", path_str(shared_dir)),
            );
            args.push2("-device", format!("virtio-9p-{},fsdev=shared9p,mount_tag={SHARED_FS_TAG}", bus.suffix()));
        }
        SharedFs::None => {}
    }
    let mut next_fd = CONSOLE_FD + 1;
    for (i, net) in config.net_devices.iter().enumerate() {
        match &net.fd {
            Some(_) => {
                // No vnet_hdr=: QEMU refuses it with fd= and probes IFF_VNET_HDR on the fd instead. vhost=off: the
                // hosts we test on have no /dev/vhost-net, and userspace virtio-net is what VM templating can
                // migrate.
                args.push2("-netdev", format!("tap,id={},fd={next_fd},vhost=off", net.id));
                next_fd += 1;
            }
            // A hub with this one port: frames go nowhere.
            None => args.push2("-netdev", format!("hubport,id={},hubid={}", net.id, 1000 + i)),
        }
        let device = match bus {
            Bus::Mmio => format!("virtio-net-device,netdev={},mac={}", net.id, net.mac),
            // romfile=: direct kernel boot never runs the iPXE option ROM, so do not require it on the host.
            Bus::Pci => format!("virtio-net-pci,netdev={},mac={},romfile=", net.id, net.mac),
        };
        args.push2("-device", device);
    }
    args.0
}

/// The `-object` for guest RAM.
fn memory_backend(memory: &GuestMemory, size: &str) -> String {
    match memory {
        // vhost-user daemons map guest memory, so it must be a shareable file descriptor.
        GuestMemory::Memfd => format!("memory-backend-memfd,id=mem,size={size},share=on"),
        // Shared: the guest's writes land in the file, which is the template's memory once saved.
        GuestMemory::Template { file } => {
            format!("memory-backend-file,id=mem,size={size},mem-path={},share=on", path_str(file))
        }
        // Private: the clone reads the template's pages and gets its own copy of a page when it writes one.
        GuestMemory::Clone { file, .. } => {
            format!("memory-backend-file,id=mem,size={size},mem-path={},share=off", path_str(file))
        }
    }
}

/// The URI of `migrate` (saving a template) and `migrate-incoming` (loading a clone): the state file, opened by
/// us and handed to QEMU with `getfd` as [`MIGRATION_FD_NAME`]. Not `exec:`, which `-sandbox spawn=deny`
/// forbids, and QEMU never opens a path of ours.
pub fn migration_uri() -> String {
    format!("fd:{MIGRATION_FD_NAME}")
}

/// Arguments for the per-VM `vhost-device-vsock`.
pub fn vsock_daemon_args(paths: &VmPaths) -> Vec<String> {
    vec![
        "--vm".into(),
        format!(
            "guest-cid={GUEST_CID},socket={},uds-path={}",
            path_str(&paths.vhost_vsock_socket()),
            path_str(&paths.agent_socket())
        ),
    ]
}

/// Arguments for the per-VM `virtiofsd`. No `--tag`: QEMU 7 crashes when the daemon advertises one.
pub fn virtiofsd_args(paths: &VmPaths, shared_dir: &Path, extra_args: &[String]) -> Vec<String> {
    let mut args = vec![
        format!("--socket-path={}", path_str(&paths.virtiofsd_socket())),
        format!("--shared-dir={}", path_str(shared_dir)),
        "--cache=auto".into(),
    ];
    args.extend(extra_args.iter().cloned());
    args
}

#[derive(Debug, Clone, Copy)]
enum Bus {
    Mmio,
    Pci,
}

impl Bus {
    fn of(machine: MachineType) -> Self {
        match machine {
            MachineType::Microvm => Bus::Mmio,
            MachineType::Q35 => Bus::Pci,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Bus::Mmio => "device",
            Bus::Pci => "pci",
        }
    }
}

#[derive(Debug, Default)]
struct Args(Vec<String>);

impl Args {
    fn push2(&mut self, flag: &str, value: impl AsRef<str>) {
        self.0.push(flag.to_owned());
        self.0.push(value.as_ref().to_owned());
    }
    fn push_all<const N: usize>(&mut self, flags: [&str; N]) {
        self.0.extend(flags.map(String::from));
    }
}

/// QEMU options are strings; non-UTF-8 paths are rejected earlier by `QemuVm::prepare`.
fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::AccelChoice;
    use crate::config::NetDevice;

    fn base(machine: MachineType) -> VmConfig {
        let mut c = VmConfig::new("vm1", "/k/vmlinux", "/run/vm1");
        c.initrd = Some("/k/initrd.img".into());
        c.qemu.machine = machine;
        c.accel = AccelChoice::Auto;
        c.vcpus = 2;
        c.memory_mib = 512;
        c
    }

    /// The value following `flag`, for each occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    fn append(args: &[String]) -> Vec<&str> {
        values(args, "-append")[0].split(' ').collect()
    }

    #[test]
    fn microvm_tcg_basics() {
        let args = qemu_args(&base(MachineType::Microvm), Accel::Tcg, Some(2_596_140));
        assert_eq!(values(&args, "-machine"), ["microvm,pit=off,pic=off,isa-serial=on,rtc=on,memory-backend=mem"]);
        assert_eq!(values(&args, "-accel"), ["tcg,tb-size=64"]);
        assert_eq!(values(&args, "-cpu"), ["max"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-m"), ["512M"]);
        assert_eq!(values(&args, "-object"), ["memory-backend-memfd,id=mem,size=512M,share=on"]);
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "missing {flag}");
        }
        assert!(!args.iter().any(|a| a == "-daemonize"));
        assert_eq!(values(&args, "-global"), ["virtio-mmio.force-legacy=false"]);
        assert_eq!(values(&args, "-kernel"), ["/k/vmlinux"]);
        assert_eq!(values(&args, "-initrd"), ["/k/initrd.img"]);
        assert_eq!(
            append(&args),
            ["console=ttyS0", "reboot=t", "panic=-1", "quiet", "tsc_early_khz=2596140", "tsc=reliable"]
        );
        assert_eq!(values(&args, "-chardev")[0], "socket,id=console,fd=3");
        assert_eq!(values(&args, "-serial"), ["chardev:console"]);
        assert!(values(&args, "-chardev").contains(&"socket,id=qmp,path=/run/vm1/qmp.sock,server=on,wait=off"));
        assert_eq!(values(&args, "-mon"), ["chardev=qmp,mode=control"]);
        assert!(values(&args, "-device").is_empty(), "no devices were configured");
    }

    /// The whole command line of a default VM, so any change to it shows here.
    #[test]
    fn golden_default_microvm_tcg() {
        let args = qemu_args(&base(MachineType::Microvm), Accel::Tcg, Some(2_596_140));
        assert_eq!(
            args.join(" "),
            "-name vm1,debug-threads=on \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -machine microvm,pit=off,pic=off,isa-serial=on,rtc=on,memory-backend=mem -accel tcg,tb-size=64 -cpu max \
             -smp 2 -m 512M -object memory-backend-memfd,id=mem,size=512M,share=on \
             -nodefaults -no-user-config -nographic -no-reboot -global virtio-mmio.force-legacy=false \
             -kernel /k/vmlinux -initrd /k/initrd.img -append console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=2596140 tsc=reliable \
             -chardev socket,id=console,fd=3 -serial chardev:console \
             -chardev socket,id=qmp,path=/run/vm1/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control"
        );
    }

    #[test]
    fn q35_with_room_to_grow_gets_cpu_and_memory_slots() {
        let mut config = base(MachineType::Q35);
        config.max_vcpus = 4;
        config.max_memory_mib = 2048;
        let args = qemu_args(&config, Accel::Tcg, None);
        assert_eq!(values(&args, "-smp"), ["2,maxcpus=4"]);
        assert_eq!(values(&args, "-m"), ["512M,slots=8,maxmem=2048M"]);
        assert_eq!(values(&args, "-object"), ["memory-backend-memfd,id=mem,size=512M,share=on"], "boot RAM as before");
        assert_eq!(values(&args, "-machine"), ["q35,memory-backend=mem"]);
    }

    #[test]
    fn maxmem_leaves_room_for_whole_memory_blocks() {
        let mut config = base(MachineType::Q35);
        config.memory_mib = 300;
        config.max_memory_mib = 1000;
        let args = qemu_args(&config, Accel::Tcg, None);
        // 700 MiB of room rounded up to 6 blocks of 128 MiB.
        assert_eq!(values(&args, "-m"), ["300M,slots=8,maxmem=1068M"]);
        assert_eq!(values(&args, "-smp"), ["2"], "no room for vCPUs");
    }

    #[test]
    fn no_room_to_grow_keeps_the_plain_sizes() {
        for (max_vcpus, max_memory_mib) in [(0, 0), (2, 512), (1, 256)] {
            let mut config = base(MachineType::Q35);
            config.max_vcpus = max_vcpus;
            config.max_memory_mib = max_memory_mib;
            let args = qemu_args(&config, Accel::Tcg, None);
            assert_eq!(values(&args, "-smp"), ["2"], "max {max_vcpus}");
            assert_eq!(values(&args, "-m"), ["512M"], "max {max_memory_mib}");
        }
    }

    #[test]
    fn microvm_ignores_the_maxima() {
        let mut config = base(MachineType::Microvm);
        config.max_vcpus = 4;
        config.max_memory_mib = 2048;
        let args = qemu_args(&config, Accel::Tcg, None);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-m"), ["512M"]);
    }

    #[test]
    fn seccomp_sandbox_follows_the_config() {
        let mut config = base(MachineType::Q35);
        config.qemu.seccomp_sandbox = Some("on,spawn=deny".into());
        assert_eq!(values(&qemu_args(&config, Accel::Kvm, None), "-sandbox"), ["on,spawn=deny"]);
        for off in [None, Some(String::new())] {
            config.qemu.seccomp_sandbox = off;
            let args = qemu_args(&config, Accel::Kvm, None);
            assert!(!args.iter().any(|a| a == "-sandbox"), "{args:?}");
        }
    }

    #[test]
    fn microvm_kvm_uses_host_cpu_and_no_tsc_hint() {
        let mut config = base(MachineType::Microvm);
        config.kernel_params = vec!["agent.log=debug".into(), "init=/init".into()];
        let args = qemu_args(&config, Accel::Kvm, Some(2_596_140));
        assert!(values(&args, "-machine")[0].starts_with("microvm,pit=on,"));
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
        assert_eq!(append(&args), ["console=ttyS0", "reboot=t", "panic=-1", "quiet", "agent.log=debug", "init=/init"]);
    }

    #[test]
    fn debug_drops_quiet_and_unknown_tsc_is_omitted() {
        let mut config = base(MachineType::Microvm);
        config.debug = true;
        let args = qemu_args(&config, Accel::Tcg, None);
        assert_eq!(append(&args), ["console=ttyS0", "reboot=t", "panic=-1"]);
        // Nothing else to calibrate the TSC with.
        assert!(values(&args, "-machine")[0].starts_with("microvm,pit=on,"));
    }

    #[test]
    fn free_page_reporting_adds_a_balloon_on_the_machine_bus() {
        for (machine, device) in [
            (MachineType::Microvm, "virtio-balloon-device,free-page-reporting=on"),
            (MachineType::Q35, "virtio-balloon-pci,free-page-reporting=on"),
        ] {
            let mut config = base(machine);
            config.free_page_reporting = true;
            assert_eq!(values(&qemu_args(&config, Accel::Tcg, None), "-device"), [device]);
        }
    }

    #[test]
    fn microvm_virtiofs_and_vsock_use_mmio_devices() {
        let mut config = base(MachineType::Microvm);
        config.agent = Some(AgentTransport::HybridVsock);
        config.qemu.vsock_daemon = Some("/usr/bin/vhost-device-vsock".into());
        config.shared_fs = SharedFs::VirtioFs {
            daemon: "/usr/libexec/virtiofsd".into(),
            extra_args: vec![],
            shared_dir: "/run/shared".into(),
        };
        let args = qemu_args(&config, Accel::Tcg, None);
        let chardevs = values(&args, "-chardev");
        assert!(chardevs.contains(&"socket,id=vsock,path=/run/vm1/vhost-vsock.sock"));
        assert!(chardevs.contains(&"socket,id=virtiofs,path=/run/vm1/virtiofsd.sock"));
        assert_eq!(
            values(&args, "-device"),
            ["vhost-user-vsock-device,chardev=vsock", "vhost-user-fs-device,chardev=virtiofs,tag=kataShared"]
        );
        assert!(values(&args, "-fsdev").is_empty());
    }

    #[test]
    fn q35_uses_pci_devices_and_no_mmio_global() {
        let mut config = base(MachineType::Q35);
        config.agent = Some(AgentTransport::HybridVsock);
        config.qemu.vsock_daemon = Some("/usr/bin/vhost-device-vsock".into());
        config.shared_fs = SharedFs::VirtioFs {
            daemon: "/usr/libexec/virtiofsd".into(),
            extra_args: vec![],
            shared_dir: "/run/shared".into(),
        };
        let args = qemu_args(&config, Accel::Kvm, None);
        assert_eq!(values(&args, "-machine"), ["q35,memory-backend=mem"]);
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert!(values(&args, "-global").is_empty());
        assert_eq!(
            values(&args, "-device"),
            ["vhost-user-vsock-pci,chardev=vsock", "vhost-user-fs-pci,chardev=virtiofs,tag=kataShared"]
        );
    }

    #[test]
    fn virtio_9p_microvm_and_q35() {
        for (machine, device) in [(MachineType::Microvm, "virtio-9p-device"), (MachineType::Q35, "virtio-9p-pci")] {
            let mut config = base(machine);
            config.shared_fs = SharedFs::Virtio9p { shared_dir: "/run/shared".into() };
            let args = qemu_args(&config, Accel::Tcg, None);
            assert_eq!(
                values(&args, "-fsdev"),
                ["local,id=shared9p,path=/run/shared,security_model=none,multidevs=remap"]
            );
            assert_eq!(values(&args, "-device"), [format!("{device},fsdev=shared9p,mount_tag=kataShared")]);
            assert!(!values(&args, "-chardev").iter().any(|c| c.contains("virtiofs")));
        }
    }

    fn tap(id: &str, mac: &str) -> NetDevice {
        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        NetDevice { id: id.into(), mac: mac.into(), fd: Some(std::sync::Arc::new(file.into())) }
    }

    #[test]
    fn agent_serial_port_on_the_machine_bus() {
        for (machine, bus) in [(MachineType::Microvm, "virtio-serial-device"), (MachineType::Q35, "virtio-serial-pci")]
        {
            let mut config = base(machine);
            config.agent = Some(AgentTransport::Serial { port: "agent.channel.0".into() });
            let args = qemu_args(&config, Accel::Tcg, None);
            assert_eq!(
                values(&args, "-device"),
                [format!("{bus},max_ports=2"), "virtserialport,chardev=agent,name=agent.channel.0".to_string()]
            );
            assert!(values(&args, "-chardev")
                .contains(&"socket,id=agent,path=/run/vm1/agent-serial.sock,server=on,wait=off"));
        }
    }

    #[test]
    fn template_and_clone_memory() {
        let mut config = base(MachineType::Microvm);
        config.memory = GuestMemory::Template { file: "/t/memory".into() };
        let args = qemu_args(&config, Accel::Tcg, None);
        assert_eq!(values(&args, "-object"), ["memory-backend-file,id=mem,size=512M,mem-path=/t/memory,share=on"]);
        assert!(values(&args, "-incoming").is_empty());

        config.memory = GuestMemory::Clone { file: "/t/memory".into(), state: "/t/state".into() };
        let args = qemu_args(&config, Accel::Tcg, None);
        assert_eq!(values(&args, "-object"), ["memory-backend-file,id=mem,size=512M,mem-path=/t/memory,share=off"]);
        assert_eq!(values(&args, "-incoming"), ["defer"]);
        assert_eq!(migration_uri(), "fd:migration");
        assert!(!args.iter().any(|a| a.contains("exec:")));
    }

    #[test]
    fn net_devices_get_inherited_fds_in_order() {
        for (machine, device, extra) in
            [(MachineType::Microvm, "virtio-net-device", ""), (MachineType::Q35, "virtio-net-pci", ",romfile=")]
        {
            let mut config = base(machine);
            config.net_devices = vec![tap("net0", "02:00:ca:fe:00:01"), tap("net1", "02:00:ca:fe:00:02")];
            let args = qemu_args(&config, Accel::Tcg, None);
            assert_eq!(values(&args, "-netdev"), ["tap,id=net0,fd=4,vhost=off", "tap,id=net1,fd=5,vhost=off"]);
            assert_eq!(
                values(&args, "-device"),
                [
                    format!("{device},netdev=net0,mac=02:00:ca:fe:00:01{extra}"),
                    format!("{device},netdev=net1,mac=02:00:ca:fe:00:02{extra}"),
                ]
            );
            assert!(!args.iter().any(|a| a.contains("vnet_hdr")));
        }
    }

    #[test]
    fn a_nic_without_tap_is_on_a_hub_of_its_own_and_takes_no_fd() {
        let mut config = base(MachineType::Microvm);
        let mut unplugged = tap("net0", "02:00:ca:fe:00:01");
        unplugged.fd = None;
        config.net_devices = vec![unplugged, tap("net1", "02:00:ca:fe:00:02")];
        let args = qemu_args(&config, Accel::Tcg, None);
        assert_eq!(values(&args, "-netdev"), ["hubport,id=net0,hubid=1000", "tap,id=net1,fd=4,vhost=off"]);
        assert_eq!(values(&args, "-device")[0], "virtio-net-device,netdev=net0,mac=02:00:ca:fe:00:01");
    }

    #[test]
    fn no_net_devices_no_netdev() {
        let args = qemu_args(&base(MachineType::Q35), Accel::Tcg, None);
        assert!(values(&args, "-netdev").is_empty());
    }

    #[test]
    fn helper_args() {
        let paths = VmPaths::new("/run/vm1");
        assert_eq!(
            vsock_daemon_args(&paths),
            ["--vm", "guest-cid=3,socket=/run/vm1/vhost-vsock.sock,uds-path=/run/vm1/kata.sock"]
        );
        let args = virtiofsd_args(&paths, Path::new("/run/shared"), &["--sandbox=none".to_string()]);
        assert_eq!(
            args,
            ["--socket-path=/run/vm1/virtiofsd.sock", "--shared-dir=/run/shared", "--cache=auto", "--sandbox=none"]
        );
        assert!(!args.iter().any(|a| a.starts_with("--tag")));
    }
}
