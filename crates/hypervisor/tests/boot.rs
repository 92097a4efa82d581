//! Boots real VMs with QEMU under TCG. Needs a guest kernel:
//!
//!   KATA_TEST_KERNEL=/var/cache/kata-rs/kernel-*/vmlinux      (required, else the tests skip)
//!   KATA_TEST_HV_INITRD=...        (optional; default: a throw-away busybox initrd built here)
//!   KATA_TEST_VSOCK_DAEMON=.../vhost-device-vsock   KATA_TEST_VIRTIOFSD=.../virtiofsd   (optional)
//!   KATA_TEST_QEMU=/usr/bin/qemu-system-x86_64      (optional)
//!
//! The tests run at most two VMs at a time. With a custom KATA_TEST_HV_INITRD the guest must print
//! `KATA_TEST_READY` on the console.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use hypervisor::qemu::QemuVm;
use hypervisor::{
    cleanup_vm, AccelChoice, AgentTransport, MachineType, NetDevice, ProcessRole, SharedFs, Vm, VmConfig, VmSize,
    VmStatus,
};

const READY: &str = "KATA_TEST_READY";
/// An initrd whose init prints [`READY`]; the default busybox one also prints what the tests check.
const INITRD_ENV: &str = "KATA_TEST_HV_INITRD";
const SHARED_CONTENT: &str = "hello-from-the-host";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Console lines the tests look at: all the host keeps (the guest's markers come last).
const CONSOLE_LINES: usize = hypervisor::console::MAX_LINES;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
if mount -t virtiofs kataShared /mnt 2>/dev/null || mount -t 9p -o trans=virtio,version=9p2000.L kataShared /mnt; then
  echo "SHARED:$(cat /mnt/hello.txt)"
fi
echo "VIRTIO-IDS:$(cat /sys/bus/virtio/devices/*/device | tr '\n' ' ')"
for d in /sys/bus/virtio/drivers/virtio_balloon/virtio*; do [ -e "$d" ] && echo "BALLOON:$(cat $d/features)"; done
for i in /sys/class/net/*; do [ "${i##*/}" = lo ] || echo "NET:${i##*/}=$(cat $i/address)"; done
for arg in $(cat /proc/cmdline); do
  case $arg in hvtest.ping_mac=*) ping_mac=${arg#*=};; hvtest.ping_ip=*) ping_ip=${arg#*=};; hvtest.ping_peer=*) ping_peer=${arg#*=};; hvtest.hotplug) hotplug=1;; esac
done
if [ -n "$ping_mac" ]; then
  for i in /sys/class/net/*; do [ "$(cat $i/address)" = "$ping_mac" ] && nic=${i##*/}; done
  ip link set "$nic" up && ip addr add "$ping_ip" dev "$nic"
  result=fail
  for try in 1 2 3 4 5; do ping -c 1 -W 3 "$ping_peer" >/dev/null 2>&1 && { result=ok; break; }; done
  echo "PING:$nic:$result"
fi
echo KATA_TEST_READY
# With hvtest.hotplug: the CPUs and memory blocks the guest kernel has, whenever they change.
while [ -n "$hotplug" ]; do
  now="HOTPLUG:cpus=$(cat /sys/devices/system/cpu/present) blocks=$(ls -d /sys/devices/system/memory/memory* 2>/dev/null | wc -l)"
  [ "$now" = "$last" ] || echo "$now"
  last=$now
  sleep 0.2
done
while true; do sleep 3600; done
"#;

/// At most two VMs at a time, whatever `--test-threads` says: the test machines have two cores.
static VM_SLOTS: Semaphore = Semaphore::const_new(2);

async fn vm_slot() -> SemaphorePermit<'static> {
    VM_SLOTS.acquire().await.expect("semaphore never closes")
}

struct Assets {
    qemu: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    custom_initrd: bool,
    _dir: tempfile::TempDir,
}

/// The test's assets, or `None` after [`testutil::skip`] said why the test cannot run.
fn assets(test: &str) -> Option<Assets> {
    assets_with(test, true)
}

/// Like [`assets`]; without `custom_initrd_ok` the busybox initrd is built even when KATA_TEST_HV_INITRD is set,
/// for tests that read what its init prints.
fn assets_with(test: &str, custom_initrd_ok: bool) -> Option<Assets> {
    let skip = |reason: String| {
        testutil::skip(test, reason);
        None
    };
    let kernel = match std::env::var_os("KATA_TEST_KERNEL") {
        None => return skip("KATA_TEST_KERNEL is not set (path of a guest vmlinux)".into()),
        Some(k) if !Path::new(&k).is_file() => {
            return skip(format!("KATA_TEST_KERNEL={} does not exist", Path::new(&k).display()))
        }
        Some(k) => PathBuf::from(k),
    };
    let qemu = std::env::var_os("KATA_TEST_QEMU").map_or_else(|| "/usr/bin/qemu-system-x86_64".into(), PathBuf::from);
    if !qemu.is_file() {
        return skip(format!("{} not found (install qemu-system-x86 or set KATA_TEST_QEMU)", qemu.display()));
    }
    let dir = tempfile::Builder::new().prefix("kata-hv-").tempdir_in("/tmp").expect("tempdir");
    // Not KATA_TEST_INITRD: scripts/test.sh sets that to the agent initrd, which never prints the marker.
    let custom = std::env::var_os(INITRD_ENV).filter(|_| custom_initrd_ok);
    let (initrd, custom_initrd) = match custom {
        Some(i) if Path::new(&i).is_file() => (PathBuf::from(i), true),
        Some(i) => return skip(format!("{INITRD_ENV}={} does not exist", Path::new(&i).display())),
        None => {
            let busybox = Path::new("/bin/busybox");
            if !busybox.is_file() {
                return skip(format!("{INITRD_ENV} is not set and /bin/busybox (busybox-static) is missing"));
            }
            let initrd = dir.path().join("initrd.cpio");
            std::fs::write(&initrd, busybox_initrd(busybox)).expect("write initrd");
            (initrd, false)
        }
    };
    Some(Assets { qemu, kernel, initrd, custom_initrd, _dir: dir })
}

/// A helper binary from `var`, or `None` after [`testutil::skip`] said which part of the test cannot run.
fn helper(test: &str, var: &str) -> Option<PathBuf> {
    let reason = match std::env::var_os(var) {
        Some(p) if Path::new(&p).is_file() => return Some(PathBuf::from(p)),
        Some(p) => format!("{var}={} does not exist", Path::new(&p).display()),
        None => format!("{var} is not set"),
    };
    testutil::skip(&format!("part of {test}"), reason);
    None
}

fn vm_config(assets: &Assets, name: &str, work_dir: &Path) -> VmConfig {
    let mut config = VmConfig::new(name, &assets.kernel, work_dir);
    config.qemu.path = assets.qemu.clone();
    config.initrd = Some(assets.initrd.clone());
    config.accel = AccelChoice::Tcg;
    config.memory_mib = 256;
    config.vcpus = 1;
    config.kernel_params = vec!["rdinit=/init".into()];
    config
}

fn shared_dir(root: &Path) -> PathBuf {
    let dir = root.join("shared");
    std::fs::create_dir_all(&dir).expect("shared dir");
    std::fs::write(dir.join("hello.txt"), SHARED_CONTENT).expect("shared file");
    dir
}

/// Polls the console until `marker` appears; returns how long it took.
async fn wait_for_console(vm: &QemuVm, marker: &str, started: Instant) -> Duration {
    loop {
        let console = vm.console().tail(CONSOLE_LINES);
        if console.contains(marker) {
            return started.elapsed();
        }
        if started.elapsed() > BOOT_TIMEOUT {
            let qemu = vm.qemu_output().map(|output| output.tail(CONSOLE_LINES)).unwrap_or_default();
            panic!("no {marker} after {BOOT_TIMEOUT:?}; console:\n{console}\nqemu:\n{qemu}");
        }
        if let Ok(VmStatus::Stopped(exit)) = vm.status().await {
            panic!("VM exited ({exit:?}) before {marker}; console:\n{console}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The guest's balloon driver is bound and negotiated free page reporting (feature bit 5,
/// `VIRTIO_BALLOON_F_REPORTING`; sysfs prints the features as a string of 0/1, bit 0 first).
fn assert_free_page_reporting(console: &str) {
    let features = console
        .lines()
        .find_map(|l| l.strip_prefix("BALLOON:"))
        .unwrap_or_else(|| panic!("no virtio_balloon device bound in the guest; console:\n{console}"));
    assert_eq!(features.chars().nth(5), Some('1'), "free page reporting not negotiated: features {features}");
}

fn alive(pid: u32) -> bool {
    hypervisor::pid_alive(pid)
}

/// Kills the VM's processes that are still the ones started when dropped: a VM outlives its value, so a failing
/// test must not leave it running.
struct KillOnDrop(Vec<hypervisor::VmProcess>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for process in self.0.iter().filter(|p| p.is_running()) {
            let pid = nix::unistd::Pid::from_raw(process.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_boots_pauses_resumes_and_stops() {
    let test = "microvm_boots_pauses_resumes_and_stops";
    let Some(assets) = assets(test) else { return };
    let _slot = vm_slot().await;
    let root = tempfile::Builder::new().prefix("kata-hv-").tempdir_in("/tmp").expect("tempdir");
    let work = root.path().join("vm");
    let mut config = vm_config(&assets, "microvm-test", &work);
    config.free_page_reporting = true;
    config.qemu.vsock_daemon = helper(test, "KATA_TEST_VSOCK_DAEMON");
    config.agent = config.qemu.vsock_daemon.as_ref().map(|_| AgentTransport::HybridVsock);
    config.shared_fs = match helper(test, "KATA_TEST_VIRTIOFSD") {
        Some(daemon) => SharedFs::VirtioFs {
            daemon,
            extra_args: std::env::var("KATA_TEST_VIRTIOFSD_ARGS")
                .map(|a| a.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            shared_dir: shared_dir(root.path()),
        },
        None => SharedFs::Virtio9p { shared_dir: shared_dir(root.path()) },
    };
    let vm = QemuVm::new(config);

    let started = Instant::now();
    vm.start().await.expect("start");
    eprintln!("QEMU args: {}", vm.qemu_args().unwrap_or_default().join(" "));
    let boot = wait_for_console(&vm, READY, started).await;
    eprintln!("{test}: start() to {READY} in {boot:.2?} under TCG");

    if !assets.custom_initrd {
        let console = vm.console().tail(CONSOLE_LINES);
        assert!(console.contains(&format!("SHARED:{SHARED_CONTENT}")), "shared fs not readable; console:\n{console}");
    }
    if !assets.custom_initrd {
        // The guest must see the devices: virtio device ids 0x0013 vsock, 0x001a virtio-fs, 0x0009 9p.
        let console = vm.console().tail(CONSOLE_LINES);
        let ids = console.lines().find(|l| l.starts_with("VIRTIO-IDS:")).expect("virtio ids line");
        eprintln!("{test}: guest sees {ids}");
        if vm.config().qemu.vsock_daemon.is_some() {
            assert!(ids.contains("0x0013"), "no vsock device in the guest: {ids}");
        }
        if matches!(vm.config().shared_fs, SharedFs::VirtioFs { .. }) {
            assert!(ids.contains("0x001a"), "no virtio-fs device in the guest: {ids}");
        }
        assert_free_page_reporting(&console);
    }
    let pids = vm.pids();
    let expected = 1
        + usize::from(vm.config().qemu.vsock_daemon.is_some())
        + usize::from(matches!(vm.config().shared_fs, SharedFs::VirtioFs { .. }));
    assert_eq!(pids.len(), expected, "{pids:?}");
    assert!(pids.iter().all(|p| alive(p.pid)));
    // Under TCG QEMU runs without transparent huge pages (its translation buffer would take 2 MiB steps).
    let qemu = pids.iter().find(|p| p.role == ProcessRole::Vmm).expect("QEMU pid");
    let status = std::fs::read_to_string(format!("/proc/{}/status", qemu.pid)).expect("QEMU status");
    assert!(status.contains("THP_enabled:\t0"), "QEMU has huge pages on: {status}");
    // QEMU runs under its seccomp sandbox (filter mode 2) by default.
    assert!(status.contains("Seccomp:\t2"), "QEMU runs without seccomp: {status}");
    if let Some(hypervisor::AgentEndpoint::HybridVsock(socket)) = vm.agent_endpoint() {
        assert!(socket.exists(), "agent socket {} missing", socket.display());
    }

    assert_eq!(vm.status().await.expect("status"), VmStatus::Running);
    vm.pause().await.expect("pause");
    assert_eq!(vm.status().await.expect("status"), VmStatus::Paused);
    vm.resume().await.expect("resume");
    assert_eq!(vm.status().await.expect("status"), VmStatus::Running);

    let stopping = Instant::now();
    vm.stop().await.expect("stop");
    eprintln!("{test}: stop() took {:.2?}", stopping.elapsed());
    for p in &pids {
        assert!(!alive(p.pid), "{} (pid {}) still alive after stop", p.role, p.pid);
    }
    assert!(vm.pids().is_empty());
    assert!(!work.exists(), "work dir {} left behind", work.display());
    assert!(matches!(vm.status().await.expect("status"), VmStatus::Stopped(Some(_))));
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait()).await.expect("wait resolves").expect("wait");
    eprintln!("{test}: QEMU exit: {exit}");
    // The console is kept in memory, not in the (removed) work dir, and outlives QEMU.
    let tail = vm.console().tail(20);
    assert_ne!(tail, hypervisor::console::NO_OUTPUT);
    assert!(tail.contains(READY), "console tail after stop:\n{tail}");
    assert!(!work.join("console.log").exists());
}

/// q35 with 9p, then crash cleanup from persisted pids instead of `stop()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_with_9p_boots_and_crash_cleanup_kills_it() {
    let test = "q35_with_9p_boots_and_crash_cleanup_kills_it";
    let Some(assets) = assets(test) else { return };
    let _slot = vm_slot().await;
    let root = tempfile::Builder::new().prefix("kata-hv-").tempdir_in("/tmp").expect("tempdir");
    let work = root.path().join("vm");
    let mut config = vm_config(&assets, "q35-test", &work);
    config.qemu.machine = MachineType::Q35;
    config.free_page_reporting = true;
    config.shared_fs = SharedFs::Virtio9p { shared_dir: shared_dir(root.path()) };
    config.qemu.vsock_daemon = helper(test, "KATA_TEST_VSOCK_DAEMON");
    config.agent = config.qemu.vsock_daemon.as_ref().map(|_| AgentTransport::HybridVsock);
    let vm = QemuVm::new(config);

    let started = Instant::now();
    vm.start().await.expect("start");
    let boot = wait_for_console(&vm, READY, started).await;
    eprintln!("{test}: start() to {READY} in {boot:.2?} under TCG");
    if !assets.custom_initrd {
        let console = vm.console().tail(CONSOLE_LINES);
        assert!(console.contains(&format!("SHARED:{SHARED_CONTENT}")), "9p share not readable; console:\n{console}");
        assert_free_page_reporting(&console);
    }

    // What the shim would have persisted before dying.
    let persisted = vm.pids();
    let report = cleanup_vm(&persisted, &work).await.expect("cleanup");
    // Helpers may already be gone: QEMU's exit makes the VM reap them. None may survive.
    assert_eq!(report.killed.first(), Some(&persisted[0].pid), "QEMU first: {report:?}");
    assert_eq!(report.killed.len() + report.skipped.len(), persisted.len(), "{report:?}");
    assert!(!work.exists());
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait()).await.expect("QEMU reaped").expect("wait");
    assert_eq!(exit.signal, Some(9), "{exit}");
    vm.stop().await.expect("stop after external cleanup");
    for p in &persisted {
        assert!(!alive(p.pid), "{} (pid {}) still alive", p.role, p.pid);
    }
}

/// A VM outlives the value that started it: dropped without `stop()`, it keeps running, and is attached to
/// again from what `saved()` recorded, driven over QMP and stopped, leaving nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_vm_keeps_running_and_is_attached_to_and_stopped() {
    let test = "a_dropped_vm_keeps_running_and_is_attached_to_and_stopped";
    let Some(assets) = assets(test) else { return };
    let _slot = vm_slot().await;
    let root = tempfile::Builder::new().prefix("kata-hv-").tempdir_in("/tmp").expect("tempdir");
    let work = root.path().join("vm");
    let mut config = vm_config(&assets, "drop-test", &work);
    config.qemu.vsock_daemon = helper(test, "KATA_TEST_VSOCK_DAEMON");
    config.agent = config.qemu.vsock_daemon.as_ref().map(|_| AgentTransport::HybridVsock);
    let vm = QemuVm::new(config);
    vm.start().await.expect("start");
    let saved = vm.saved();
    let pids = vm.pids();
    let _cleanup = KillOnDrop(pids.clone());
    drop(vm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pids.iter().all(|p| p.is_running()), "dropping the value ends nothing: {pids:?}");

    let vm = QemuVm::attach(saved).await.expect("attach over QMP");
    assert_eq!(vm.status().await.expect("status"), VmStatus::Running);
    vm.pause().await.expect("pause");
    assert_eq!(vm.status().await.expect("status"), VmStatus::Paused);
    vm.resume().await.expect("resume");
    assert_eq!(vm.pids().len(), pids.len(), "the attached VM reports the same processes");
    vm.stop().await.expect("stop");
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|p| alive(p.pid)) {
        assert!(Instant::now() < deadline, "still alive after stop: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!work.exists(), "stop removes the work dir");
    assert!(QemuVm::attach(vm.saved()).await.is_err(), "a stopped VM cannot be attached to");
}

/// A q35 VM booted with 1 vCPU / 256 MiB and room for 4 / 1024 grows to 2 / 512 (the guest kernel sees the new
/// CPU and memory blocks), is found again by `attach` at its grown size and grows further from there; a microvm
/// refuses to grow, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q35_grows_cpus_and_memory_and_microvm_says_it_cannot() {
    let test = "q35_grows_cpus_and_memory_and_microvm_says_it_cannot";
    let Some(assets) = assets_with(test, false) else { return };
    let _slot = vm_slot().await;
    let root = tempfile::Builder::new().prefix("kata-hv-").tempdir_in("/tmp").expect("tempdir");
    let work = root.path().join("vm");
    let mut config = vm_config(&assets, "resize-test", &work);
    config.qemu.machine = MachineType::Q35;
    (config.max_vcpus, config.max_memory_mib) = (4, 1024);
    config.kernel_params.push("hvtest.hotplug".into());
    // Memory must stay mappable by vhost-user daemons after it grew: run the vsock daemon when there is one.
    config.qemu.vsock_daemon = helper(test, "KATA_TEST_VSOCK_DAEMON");
    config.agent = config.qemu.vsock_daemon.as_ref().map(|_| AgentTransport::HybridVsock);
    let vm = QemuVm::new(config);
    let started = Instant::now();
    vm.start().await.expect("start");
    let _cleanup = KillOnDrop(vm.pids());
    let boot = wait_for_console(&vm, READY, started).await;
    eprintln!("{test}: q35 start() to {READY} in {boot:.2?} under TCG");
    let args = vm.qemu_args().unwrap_or_default();
    assert!(args.windows(2).any(|w| w == ["-smp", "1,maxcpus=4"]), "{args:?}");
    assert!(args.windows(2).any(|w| w == ["-m", "256M,slots=8,maxmem=1024M"]), "{args:?}");
    assert!(vm.can_resize());
    wait_for_console(&vm, "HOTPLUG:cpus=0 blocks=2", started).await;
    assert_eq!(vm.size().await.expect("size"), VmSize { vcpus: 1, memory_mib: 256 });

    let resizing = Instant::now();
    let grown = vm.resize(VmSize { vcpus: 2, memory_mib: 512 }).await.expect("resize");
    eprintln!("{test}: resize to 2 vCPUs / 512 MiB took {:.2?} under TCG", resizing.elapsed());
    assert_eq!(grown, VmSize { vcpus: 2, memory_mib: 512 });
    assert_eq!(vm.size().await.expect("size"), grown);
    // The guest kernel took them (resize waits for its ACPI acknowledgement): one more CPU, two more blocks.
    wait_for_console(&vm, "HOTPLUG:cpus=0-1 blocks=4", started).await;
    assert_eq!(vm.resize(VmSize { vcpus: 1, memory_mib: 256 }).await.expect("no-op"), grown, "never shrinks");
    let err = vm.resize(VmSize { vcpus: 5, memory_mib: 512 }).await.expect_err("over the maximum").to_string();
    assert!(err.contains("hypervisor.qemu.default_maxvcpus (4)"), "{err}");

    // Another process (here: a new value) finds the VM at its grown size and grows it further.
    let saved = vm.saved();
    drop(vm);
    let vm = QemuVm::attach(saved).await.expect("attach");
    assert_eq!(vm.size().await.expect("size after attach"), grown);
    let resizing = Instant::now();
    let grown = vm.resize(VmSize { vcpus: 3, memory_mib: 600 }).await.expect("resize after attach");
    eprintln!("{test}: resize to 3 vCPUs / 600 MiB took {:.2?} under TCG", resizing.elapsed());
    assert_eq!(grown, VmSize { vcpus: 3, memory_mib: 640 }, "memory grows in 128 MiB blocks");
    vm.stop().await.expect("stop");
    // The console is this process's since attaching: the guest's later lines are not checked here.

    let work = root.path().join("microvm");
    let mut config = vm_config(&assets, "resize-microvm", &work);
    (config.max_vcpus, config.max_memory_mib) = (4, 1024);
    let vm = QemuVm::new(config);
    let started = Instant::now();
    vm.start().await.expect("start microvm");
    let _cleanup = KillOnDrop(vm.pids());
    wait_for_console(&vm, READY, started).await;
    let args = vm.qemu_args().unwrap_or_default();
    assert!(args.windows(2).any(|w| w == ["-smp", "1"]) && args.windows(2).any(|w| w == ["-m", "256M"]), "{args:?}");
    assert!(!vm.can_resize());
    let size = vm.size().await.expect("microvm size");
    assert_eq!(size, VmSize { vcpus: 1, memory_mib: 256 });
    assert_eq!(vm.resize(size).await.expect("a no-op is fine on microvm"), size);
    let err = vm.resize(VmSize { vcpus: 2, memory_mib: 256 }).await.expect_err("microvm cannot grow");
    assert!(matches!(err, hypervisor::Error::Resize { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot grow the VM: microvm cannot hot-plug CPUs or memory: size the pod at start, or use machine_type = \"q35\""
    );
    vm.stop().await.expect("stop microvm");
}

/// QEMU refusing to start (here: a kernel that is not one) gives an error quoting QEMU, and leaves nothing
/// behind, helpers included. Needs QEMU but no guest kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_failing_at_start_leaves_nothing_behind() {
    let test = "qemu_failing_at_start_leaves_nothing_behind";
    let qemu = std::env::var_os("KATA_TEST_QEMU").map_or_else(|| "/usr/bin/qemu-system-x86_64".into(), PathBuf::from);
    testutil::skip_unless!((!qemu.is_file()).then(|| format!("{} not found", qemu.display())));
    let root = tempfile::Builder::new().prefix("kata-hv-").tempdir_in("/tmp").expect("tempdir");
    let kernel = root.path().join("not-a-kernel");
    std::fs::write(&kernel, b"garbage").expect("write");
    let work = root.path().join("vm");
    let mut config = VmConfig::new("fail-test", &kernel, &work);
    config.qemu.path = qemu.clone();
    config.accel = AccelChoice::Tcg;
    config.qemu.vsock_daemon = helper(test, "KATA_TEST_VSOCK_DAEMON");
    config.agent = config.qemu.vsock_daemon.as_ref().map(|_| AgentTransport::HybridVsock);
    let vm = QemuVm::new(config);

    let err = vm.start().await.expect_err("QEMU cannot load this kernel");
    let message = err.to_string();
    eprintln!("{test}: start failed as expected: {message}");
    assert!(matches!(err, hypervisor::Error::VmmExited { .. }), "{message}");
    assert!(message.contains("exit code 1"), "{message}");
    assert!(message.to_lowercase().contains("kernel"), "QEMU's complaint is quoted: {message}");
    assert!(vm.pids().is_empty());
    let leftovers = processes_mentioning(&work);
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
    for socket in ["qmp.sock", "vhost-vsock.sock", "kata.sock"] {
        assert!(!work.join(socket).exists(), "{socket} left behind");
    }
    vm.stop().await.expect("stop after a failed start");
    assert!(!work.exists());
}

/// Guest NICs backed by taps passed by fd, on microvm (virtio-net-device) and q35 (virtio-net-pci): the guest
/// sees each with its MAC, and a ping from the guest through the first one is answered by the host side of its
/// tap. The taps live in a network namespace of their own that disappears with the last fd; no traffic
/// leaves it. Needs root (unshare) and /dev/net/tun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_fds_become_guest_nics_with_their_macs() {
    let test = "tap_fds_become_guest_nics_with_their_macs";
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { nix::libc::geteuid() } == 0;
    testutil::skip_unless!((!root).then_some("needs root to create a network namespace and taps"));
    testutil::skip_unless!((!Path::new("/dev/net/tun").exists()).then_some("/dev/net/tun is missing"));
    let Some(assets) = assets_with(test, false) else {
        return;
    };
    for (machine, name) in [(MachineType::Microvm, "net-microvm"), (MachineType::Q35, "net-q35")] {
        let _slot = vm_slot().await;
        // Each VM gets its own namespace, so the two runs cannot see each other's taps.
        let taps = std::thread::spawn(|| private_netns_taps(&["tap0_hvtest", "tap1_hvtest"]))
            .join()
            .expect("netns thread")
            .expect("taps in a private network namespace");
        let macs = ["02:00:ca:fe:00:01", "02:00:ca:fe:00:02"];
        let root = tempfile::Builder::new().prefix("kata-hv-").tempdir_in("/tmp").expect("tempdir");
        let mut config = vm_config(&assets, name, &root.path().join("vm"));
        config.qemu.machine = machine;
        config.kernel_params.extend([
            format!("hvtest.ping_mac={}", macs[0]),
            format!("hvtest.ping_ip={GUEST_IP}/24"),
            format!("hvtest.ping_peer={HOST_IP}"),
        ]);
        config.net_devices = taps
            .into_iter()
            .zip(macs)
            .enumerate()
            .map(|(i, (fd, mac))| NetDevice { id: format!("net{i}"), mac: mac.into(), fd: Some(Arc::new(fd)) })
            .collect();
        let vm = QemuVm::new(config);
        let started = Instant::now();
        vm.start().await.expect("start");
        let args = vm.qemu_args().unwrap_or_default();
        eprintln!(
            "{test} {machine:?}: net args: {}",
            args.windows(2)
                .filter(|w| w[0] == "-netdev" || w[1].starts_with("virtio-net"))
                .map(|w| format!("{} {}", w[0], w[1]))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let boot = wait_for_console(&vm, READY, started).await;
        let console = vm.console().tail(CONSOLE_LINES);
        let nics: Vec<(&str, &str)> = console.lines().filter_map(|l| l.strip_prefix("NET:")?.split_once('=')).collect();
        eprintln!("{test} {machine:?}: up in {boot:.2?}, guest NICs {nics:?}");
        let mut seen: Vec<&str> = nics.iter().map(|(_, mac)| *mac).collect();
        seen.sort_unstable();
        assert_eq!(seen, macs, "guest NICs {nics:?}; console:\n{console}");
        assert!(
            nics.iter().any(|(name, _)| *name == "eth0") && nics.iter().any(|(name, _)| *name == "eth1"),
            "{nics:?}"
        );
        let ping = console.lines().find_map(|l| l.strip_prefix("PING:")).unwrap_or("(no PING line)");
        eprintln!("{test} {machine:?}: guest ping of the tap's host side: {ping}");
        assert!(ping.ends_with(":ok"), "guest could not ping {HOST_IP} through the tap: {ping}; console:\n{console}");
        vm.stop().await.expect("stop");
        // The VM's config held the last copies of the tap fds: the taps and their namespace are gone now.
    }
}

/// Host and guest ends of the ping, inside the test's private namespace only.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 2);

/// Runs on a thread of its own, which it moves into a new network namespace: creates non-persistent taps
/// there (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, close-on-exec, as the runtime makes them), the first one up
/// with [`HOST_IP`]/24. The open fds keep the namespace alive after the thread exits; closing the last one
/// deletes the tap and, with the last tap, the namespace.
fn private_netns_taps(names: &[&str]) -> std::io::Result<Vec<OwnedFd>> {
    use nix::libc;
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: unshare only changes this thread's namespace; the thread does nothing else afterwards.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
    let ifreq = |name: &str| {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    };
    let mut taps = Vec::new();
    for name in names {
        let tun =
            std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/net/tun")?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: an open /dev/net/tun fd and a valid ifreq that outlives the call.
        check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &req) })?;
        taps.push(OwnedFd::from(tun));
    }
    // SAFETY: plain socket(2); the result is checked and owned below.
    let sock = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `sock` is a new fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let sockaddr = |ip: Ipv4Addr| {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in and sockaddr have the same size on Linux; the kernel reads it by family.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    };
    let mut req = ifreq(names[0]);
    req.ifr_ifru.ifru_addr = sockaddr(HOST_IP);
    // SAFETY: valid socket and ifreq, as above.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) })?;
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::new(255, 255, 255, 0));
    // SAFETY: valid socket and ifreq, as above.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) })?;
    req.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
    // SAFETY: valid socket and ifreq, as above.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(taps)
}

/// Live processes whose command line mentions `path`.
fn processes_mentioning(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) && alive(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// A newc cpio archive: /init, busybox, and the few nodes the kernel and the script need.
fn busybox_initrd(busybox: &Path) -> Vec<u8> {
    let busybox = std::fs::read(busybox).expect("read busybox");
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "mnt", "tmp"] {
        cpio.entry(dir, 0o040755, 0, &[]);
    }
    cpio.entry("dev/console", 0o020600, (5 << 8) | 1, &[]);
    cpio.entry("bin/busybox", 0o100755, 0, &busybox);
    cpio.entry("init", 0o100755, 0, INIT.as_bytes());
    cpio.entry("TRAILER!!!", 0, 0, &[]);
    cpio.bytes
}

#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// `rdev` is `major << 8 | minor` for device nodes.
    fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.bytes.len() & 3 != 0 {
            self.bytes.push(0);
        }
    }
}
