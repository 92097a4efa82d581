//! Helpers shared by the VM tests: a busybox rootfs, guest specs made the way the shim makes them, and
//! running one container to completion.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use runtime::agent::{AgentClient, ProcessRef};

pub fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).filter(|p| p.exists())
}

/// The paths the variables `names` hold, or, when one is unset or does not exist, why the test cannot run.
pub fn env_paths<const N: usize>(names: [&str; N]) -> Result<[PathBuf; N], String> {
    let paths = names.map(env_path);
    if paths.iter().all(Option::is_some) {
        return Ok(paths.map(Option::unwrap_or_default));
    }
    let listed = match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(format!("set {listed} to existing files"))
}

/// Whether `pid` is alive: it exists and is not a zombie (a zombie is dead; its parent reaps it).
pub fn running(pid: u32) -> bool {
    hypervisor::pid_alive(pid)
}

/// A busybox rootfs: Debian's static busybox plus one link per applet. The links are made
/// here, relative, because `busybox --install -s DIR` would point them at the host path.
pub fn make_rootfs(root: &Path) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy busybox");
    let list = Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
}

pub const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

pub fn process_json(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// A host-style spec (a network namespace path, no cgroupsPath), turned into the guest's by the same
/// `runtime::spec::for_guest` the shim uses: the agent refuses specs that were not.
pub fn spec_json(id: &str, args: &[&str], terminal: bool) -> Vec<u8> {
    spec_json_with(id, args, terminal, serde_json::json!({}))
}

/// [`spec_json`] with `resources` as the spec's `linux.resources`.
pub fn spec_json_with(id: &str, args: &[&str], terminal: bool, resources: serde_json::Value) -> Vec<u8> {
    runtime::spec::for_guest(&host_spec(args, terminal, resources), id, None, true).expect("guest spec").0
}

/// The host spec containerd would hand the shim for `args`.
pub fn host_spec(args: &[&str], terminal: bool, resources: serde_json::Value) -> oci_spec::runtime::Spec {
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process_json(args, terminal),
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "kata-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network", "path": "/var/run/netns/host-only"}],
            "resources": resources,
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"]
        }
    });
    serde_json::from_value(spec).expect("spec")
}

/// Creates, starts and waits for a container, returning (exit status, stdout, stderr).
pub async fn run_container(agent: &AgentClient, id: &str, args: &[&str]) -> (i32, String, String) {
    run_spec(agent, id, &spec_json(id, args, false)).await
}

/// Runs one container from the guest spec `spec` to completion: (exit status, stdout, stderr).
pub async fn run_spec(agent: &AgentClient, id: &str, spec: &[u8]) -> (i32, String, String) {
    agent.create_container(id, spec, "rootfs", true).await.unwrap_or_else(|e| panic!("create {id}: {e}"));
    let p = ProcessRef::init(id);
    let mut out = agent.read_stdout(&p).await.expect("stdout stream");
    let mut err = agent.read_stderr(&p).await.expect("stderr stream");
    let outs = tokio::spawn(async move { out.read_to_end().await });
    let errs = tokio::spawn(async move { err.read_to_end().await });
    agent.start_container(id).await.unwrap_or_else(|e| panic!("start {id}: {e}"));
    let exit = agent.wait_process(&p).await.expect("wait");
    let stdout = String::from_utf8_lossy(&outs.await.expect("join").expect("stdout")).into_owned();
    let stderr = String::from_utf8_lossy(&errs.await.expect("join").expect("stderr")).into_owned();
    agent.remove_container(id).await.unwrap_or_else(|e| panic!("remove {id}: {e}"));
    (exit.status, stdout, stderr)
}

pub fn step(name: &str, t0: Instant) {
    println!("PASS {name} ({:.2}s)", t0.elapsed().as_secs_f64());
}

/// Cleans up a sandbox by id when dropped, as `containerd-shim-kata-v2 delete` would: a failing test leaves no
/// VM running and nothing mounted (a VM outlives the value that started it).
pub struct CleanupOnDrop {
    pub root: PathBuf,
    pub id: String,
}

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        let paths = runtime::paths::SandboxPaths::new(&self.root, &self.id);
        if !paths.root.exists() {
            return;
        }
        let cleaned = on_own_runtime(async move { runtime::state::cleanup(&runtime::mounts::Syscalls, &paths).await });
        if !matches!(cleaned, Ok(Ok(_))) {
            eprintln!("cleaning up sandbox {} after the test failed: {cleaned:?}", self.id);
        }
    }
}

/// Ends a test's VMs when dropped, so that a failed assertion leaves no QEMU running. `cleanup_vm` kills a
/// recorded process only while its command line (and start time) still match, so a VM the test already
/// stopped, whose PID may since be reused, is left alone.
pub struct VmsOnDrop(pub Vec<(Vec<hypervisor::VmProcess>, PathBuf)>);

impl Drop for VmsOnDrop {
    fn drop(&mut self) {
        let vms = std::mem::take(&mut self.0);
        let cleaned = on_own_runtime(async move {
            for (processes, work_dir) in &vms {
                if let Err(e) = hypervisor::cleanup_vm(processes, work_dir).await {
                    eprintln!("ending a VM after the test: {e}");
                }
            }
        });
        if cleaned.is_err() {
            eprintln!("ending the test's VMs panicked");
        }
    }
}

/// Runs `work` to completion on a thread with a runtime of its own: a `Drop` inside the test's runtime cannot
/// block on it. `Err` when the work panicked.
fn on_own_runtime<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::Result<T> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(work)
    })
    .join()
}
