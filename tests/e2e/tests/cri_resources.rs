//! A pod's VM is sized by its limits and the host accounts for it (issue #14), through containerd's CRI plugin
//! and `ctr`: a container limited to 512 MiB and 2 CPUs sees them in the guest and can use 400 MiB; QEMU runs in
//! the pod's host cgroup (its vCPUs, with `sandbox_cgroup_only = false`, the rest in `kata_overhead`); the
//! host cgroup is limited to the VM's size; `UpdateContainerResources` to 1 GiB grows a q35 guest and is refused
//! with the reason on microvm; nothing of the cgroups is left after removal.
//!
//! Needs what `cri_kata.rs` needs; skips with the reason otherwise. Network safety: the pods' network is the
//! test's own bridge; nothing is sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::checks::{check_clean_stop, error_chain, step, Checks};
use e2e::cri::{
    import_pod_images, kata_handler_config, qemu_processes, vm_lock, CniNetwork, ContainerSpec, CriClient, PodCleanup,
    PodSpec,
};
use e2e::{Containerd, ContainerdOptions, CriOptions, RunOptions, BUSYBOX_IMAGE};
use k8s_cri::v1::{LinuxContainerConfig, LinuxContainerResources, LinuxPodSandboxConfig};

const CRI_DEADLINE: Duration = Duration::from_secs(90);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: i64 = 1024 * 1024;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn limits(memory_mib: i64, cpus: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: cpus * 100_000,
        memory_limit_in_bytes: memory_mib * MIB,
        ..Default::default()
    }
}

/// The cgroup hierarchies to look in: the root on v2, each controller's directory on v1.
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| d.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.retain(|d| !d.ends_with("unified") && !d.ends_with("systemd"));
    dirs
}

/// Every directory named `id` at `parent/id` in any hierarchy.
fn cgroups_of(id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for h in hierarchies() {
        for parent in ["k8s.io", "kata_overhead"] {
            let dir = h.join(parent).join(id);
            if dir.exists() {
                found.push(dir);
            }
        }
    }
    found
}

/// The cgroup of `pid` (or one thread of it) in the memory (v1) or unified (v2) hierarchy.
fn memory_cgroup(proc_dir: &str) -> String {
    let text = std::fs::read_to_string(format!("{proc_dir}/cgroup")).unwrap_or_default();
    let v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let ours = if v2 { controllers.is_empty() } else { controllers.split(',').any(|c| c == "cpu") };
            ours.then(|| path.to_string())
        })
        .unwrap_or_default()
}

/// The vCPU threads of QEMU `pid` (`CPU n/TCG`, `CPU n/KVM`).
fn vcpu_threads(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("CPU ")))
        .map(|t| t.path().display().to_string())
        .collect()
}

fn host_memory_limit(id: &str) -> Option<u64> {
    let v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
    let file = match v2 {
        true => Path::new(CGROUP_ROOT).join("k8s.io").join(id).join("memory.max"),
        false => Path::new(CGROUP_ROOT).join("memory/k8s.io").join(id).join("memory.limit_in_bytes"),
    };
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn exec(cri: &CriClient, id: &str, cmd: &[&str]) -> String {
    match cri.exec_sync(id, cmd, EXEC_TIMEOUT) {
        Ok(out) => format!(
            "{}{}",
            out.stdout.trim(),
            if out.exit_code == 0 {
                String::new()
            } else {
                format!(" (exit {}: {})", out.exit_code, out.stderr.trim())
            }
        ),
        Err(e) => format!("<ExecSync failed: {}>", error_chain(&e)),
    }
}

fn mem_total_mib(cri: &CriClient, id: &str) -> u64 {
    let line = exec(cri, id, &["grep", "MemTotal", "/proc/meminfo"]);
    line.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()).map(|kib| kib / 1024).unwrap_or(0)
}

/// One pod with a 512 MiB / 2 CPU container on `handler`; `grows`: the handler's VM can hot-plug (q35);
/// `only`: its `sandbox_cgroup_only`.
fn check_pod(
    cri: &CriClient,
    containerd: &Containerd,
    handler: &str,
    grows: bool,
    only: bool,
    logs: &Path,
    checks: &mut Checks,
) {
    let mut config = PodSpec::new(&format!("sized-{handler}"), logs).build();
    config.linux = Some(LinuxPodSandboxConfig { resources: Some(limits(512, 2)), ..Default::default() });
    let pod = step(&format!("RunPodSandbox ({handler})"), || {
        cri.run_pod_sandbox(&config, handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox: {}\n{}", error_chain(&e), containerd.log_tail(60)))
    });
    let mut container = ContainerSpec::new("app", BUSYBOX_IMAGE, &["sleep", "3600"]).build();
    container.linux = Some(LinuxContainerConfig { resources: Some(limits(512, 2)), ..Default::default() });
    let app = cri.create_container(&pod, &container, &config).and_then(|id| cri.start_container(&id).map(|()| id));
    let app = match app {
        Ok(id) => id,
        Err(e) => {
            checks.check("a container with limits starts", false, || format!("{handler}: {}", error_chain(&e)));
            let _ = cri.stop_pod_sandbox(&pod);
            let _ = cri.remove_pod_sandbox(&pod);
            return;
        }
    };

    let nproc = exec(cri, &app, &["nproc"]);
    checks.check("a 2-CPU container sees at least 2 CPUs", nproc.parse::<u32>().is_ok_and(|n| n >= 2), || {
        format!("{handler}: nproc {nproc}")
    });
    let total = mem_total_mib(cri, &app);
    checks.check("a 512 MiB container sees at least 512 MiB", total >= 512, || {
        format!("{handler}: MemTotal {total} MiB")
    });
    let allocated = exec(cri, &app, &["dd", "if=/dev/zero", "of=/dev/null", "bs=400M", "count=1"]);
    checks
        .check("allocating 400 MiB in it succeeds", !allocated.contains("(exit"), || format!("{handler}: {allocated}"));

    let qemu = qemu_processes(&pod).first().map(|(pid, _)| *pid);
    let pod_cgroup = format!("/k8s.io/{pod}");
    match qemu {
        Some(pid) => {
            let main = memory_cgroup(&format!("/proc/{pid}"));
            let vcpus: Vec<String> = vcpu_threads(pid).iter().map(|t| memory_cgroup(t)).collect();
            let v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
            let placed = if only || v2 {
                main == pod_cgroup
            } else {
                main == format!("/kata_overhead/{pod}") && !vcpus.is_empty() && vcpus.iter().all(|c| *c == pod_cgroup)
            };
            checks.check(
                "QEMU is in the pod's cgroup (its vCPUs, or all of it, per sandbox_cgroup_only)",
                placed,
                || format!("{handler}: QEMU in {main:?}, its vCPU threads in {vcpus:?}"),
            );
        }
        None => checks.check(
            "QEMU is in the pod's cgroup (its vCPUs, or all of it, per sandbox_cgroup_only)",
            false,
            || format!("{handler}: no QEMU found"),
        ),
    }
    let limit = host_memory_limit(&pod);
    checks.check(
        "the pod's host cgroup is limited to the VM's memory plus the VMM's overhead",
        limit.is_some_and(|l| l >= (256 + 512 + 256) * MIB as u64 && l < 4096 * MIB as u64),
        || format!("{handler}: {limit:?}"),
    );

    let updated = cri.update_container_resources(&app, &limits(1024, 2)).map_err(|e| error_chain(&e));
    if grows {
        let total = mem_total_mib(cri, &app);
        checks.check("UpdateContainerResources to 1 GiB grows a q35 guest", updated.is_ok() && total >= 1024, || {
            format!("{handler}: {updated:?}, MemTotal {total} MiB")
        });
        let limit = host_memory_limit(&pod);
        checks.check(
            "the host cgroup follows the grown VM",
            limit.is_some_and(|l| l >= (256 + 1024) * MIB as u64),
            || format!("{handler}: {limit:?}"),
        );
    } else {
        checks.check(
            "UpdateContainerResources beyond a microvm's size is refused with the reason",
            updated.as_ref().is_err_and(|e| e.contains("microvm cannot hot-plug")),
            || format!("{handler}: {updated:?}"),
        );
    }

    let _ = cri.stop_container(&app, Duration::from_secs(2));
    let _ = cri.remove_container(&app);
    cri.stop_pod_sandbox(&pod).unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", containerd.log_tail(60)));
    cri.remove_pod_sandbox(&pod).unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    let left = cgroups_of(&pod);
    checks.check("no host cgroup is left after removal", left.is_empty(), || format!("{handler}: {left:?}"));
}

/// `ctr run` with the task's own limits: the VM is sized from them.
fn check_ctr_task(containerd: &Containerd, conf: &Path, checks: &mut Checks) {
    let mut opts = RunOptions::runtime("io.containerd.kata.v2");
    opts.extra_flags =
        ["--runtime-config-path", &conf.display().to_string(), "--memory-limit", "536870912", "--cpus", "2"]
            .map(str::to_string)
            .to_vec();
    let id = e2e::unique_id("sized-ctr");
    let out = containerd.run(&opts, BUSYBOX_IMAGE, &id, &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"]);
    let text = out.as_ref().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut lines = text.lines();
    let nproc = lines.next().and_then(|l| l.trim().parse::<u32>().ok()).unwrap_or(0);
    let total = lines.next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0) / 1024;
    checks.check(
        "a ctr task with --memory-limit 512M --cpus 2 gets a VM that size",
        nproc >= 2 && total >= 512,
        || format!("{out:?}"),
    );
    let left = cgroups_of(&id);
    checks.check("no host cgroup is left after a ctr task", left.is_empty(), || format!("{left:?}"));
}

#[test]
fn pods_are_sized_by_their_limits_and_accounted_on_the_host() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let microvm = dir.path().join("microvm.toml");
    std::fs::write(&microvm, parts.configuration("")).expect("write config");
    let q35 = dir.path().join("q35.toml");
    let q35_text = parts.configuration("").replace("machine_type = \"microvm\"", "machine_type = \"q35\"")
        + "[runtime]\nsandbox_cgroup_only = true\n";
    std::fs::write(&q35, q35_text).expect("write config");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("mkdir");
    let mut net = CniNetwork::create().expect("CNI network config");
    let q35_handler = kata_handler_config(&q35)
        .replace("runtimes.kata]", "runtimes.kata-q35]")
        .replace("runtimes.kata.options]", "runtimes.kata-q35.options]");
    let containerd = step("containerd with CRI and the kata handlers", || {
        Containerd::start(ContainerdOptions {
            namespace: "k8s.io".to_owned(),
            shim_dir: Some(parts.shim_dir.clone()),
            cri: Some(CriOptions::new(net.conf_dir())),
            extra_config: format!("{}\n{q35_handler}", kata_handler_config(&microvm)),
            ctr_timeout: CRI_DEADLINE,
            ..ContainerdOptions::default()
        })
        .expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);

    let mut checks = Checks::default();
    check_pod(&cri, &containerd, "kata", false, false, &logs, &mut checks);
    check_pod(&cri, &containerd, "kata-q35", true, true, &logs, &mut checks);
    check_ctr_task(&containerd, &microvm, &mut checks);

    drop(cleanup);
    drop(cri);
    check_clean_stop(containerd, &mut checks);
    net.remove().expect("bridge removed");
    checks.finish();
}
