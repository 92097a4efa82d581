//! Kubernetes pods through `kata-runtime` as an OCI runtime (issue #15). The how-to's `katacli` handler
//! (`io.containerd.runc.v1`, `BinaryName` = kata-runtime) runs the pause container in a VM and the pod's
//! containers in that same VM; logs, exec and exit codes behave; a killed stand-in ends its container only;
//! nothing is left after the pod is removed. The how-to's `runtime_engine` setup (an untrusted workload through
//! containerd's v1 runtime and `containerd-shim`) runs a pod in a VM the same way.
//!
//! Needs what `cri_kata.rs` needs, plus `kata-runtime` in the shim dir; skips with the reason otherwise.
//! Network safety: the pod's network is the test's own bridge; nothing is sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::checks::{check_clean_stop, poll, step, Checks};
use e2e::cri::{
    boot_ids, import_pod_images, parse_cri_log, qemu_processes, vm_lock, CniNetwork, ContainerSpec, CriClient,
    KataPodFootprint, PodCleanup, PodSpec,
};
use e2e::kata::{sandbox_dir, KataConf};
use e2e::leaks::{mounts_under, netns_entries, processes};
use e2e::{Containerd, ContainerdOptions, CriOptions, BUSYBOX_IMAGE};
use k8s_cri::v1::ContainerState;

const CRI_DEADLINE: Duration = Duration::from_secs(90);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the v1 runc shim keeps its containers (its default root, in CRI's namespace).
const RUNC_ROOT: &str = "/run/containerd/runc/k8s.io";

/// The `katacli` handler of `config/containerd/v2/katacli.toml`, with `kata-runtime` at `binary`.
fn katacli_handler(binary: &Path) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.katacli]
  runtime_type = "io.containerd.runc.v1"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.katacli.options]
  BinaryName = "{}"
"#,
        binary.display()
    )
}

/// The stand-ins (`kata-runtime __standin ... ID`) of container `id`.
fn standins_of(id: &str) -> Vec<(u32, String)> {
    processes(|argv| argv.iter().any(|a| a == "__standin") && argv.iter().any(|a| a == id))
}

fn exited_with(cri: &CriClient, id: &str) -> Option<i32> {
    let status = cri.container_status(id).ok()?;
    (status.state == ContainerState::ContainerExited as i32).then_some(status.exit_code)
}

fn create_and_start(
    cri: &CriClient,
    containerd: &Containerd,
    pod_id: &str,
    spec: &ContainerSpec,
    pod: &PodSpec,
) -> String {
    let id = step(&format!("CreateContainer {}", spec.name), || {
        cri.create_container(pod_id, &spec.build(), &pod.build())
            .unwrap_or_else(|e| panic!("CreateContainer {}: {e}\n{}", spec.name, containerd.log_tail(60)))
    });
    step(&format!("StartContainer {}", spec.name), || {
        cri.start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer {}: {e}\n{}", spec.name, containerd.log_tail(60)))
    });
    id
}

/// The how-to's `runtime_engine` setup: untrusted workloads through containerd's v1 runtime and
/// `containerd-shim`, with kata-runtime (at `binary`) as the engine.
fn runtime_engine(binary: &Path) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri".containerd.untrusted_workload_runtime]
  runtime_type = "io.containerd.runtime.v1.linux"
  runtime_engine = "{}"
"#,
        binary.display()
    )
}

/// What each test needs: the parts, containerd with CRI and `config` (given kata-runtime's path), the images.
struct Setup {
    release: String,
    containerd: Containerd,
    _conf: KataConf,
    _net: CniNetwork,
}

fn setup(parts: e2e::kata::KataParts, what: &str, config: fn(&Path) -> String) -> Setup {
    let kata_runtime = parts.shim_dir.join("kata-runtime");
    assert!(kata_runtime.is_file(), "{} missing: cargo build --release -p kata-runtime", kata_runtime.display());
    let release = parts.kernel_release().expect("kernel has a version banner");
    let conf = KataConf::write(&parts).expect("kata configuration written");
    let net = CniNetwork::create().expect("CNI network config");
    let containerd = step(&format!("containerd with CRI and {what}"), || {
        Containerd::start(ContainerdOptions {
            namespace: "k8s.io".to_owned(),
            shim_dir: Some(parts.shim_dir.clone()),
            cri: Some(CriOptions::new(net.conf_dir())),
            extra_config: config(&kata_runtime),
            env: vec![("KATA_CONF_FILE".into(), conf.path.display().to_string())],
            ctr_timeout: CRI_DEADLINE,
            ..ContainerdOptions::default()
        })
        .expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    Setup { release, containerd, _conf: conf, _net: net }
}

#[test]
fn a_katacli_pod_runs_its_containers_in_the_pause_containers_vm() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let Setup { release, containerd, _conf, _net } = setup(parts, "the katacli handler", katacli_handler);
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();
    let logs = tempfile::tempdir().expect("log dir");
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("host boot id");

    let netns_before = netns_entries();
    let pod = PodSpec::new("katacli-pod", logs.path());
    let pod_id = step("RunPodSandbox (katacli)", || {
        cri.run_pod_sandbox(&pod.build(), "katacli")
            .unwrap_or_else(|e| panic!("RunPodSandbox with handler katacli: {e}\n{}", containerd.log_tail(60)))
    });
    let footprint = KataPodFootprint::take(&pod_id, netns_before);
    checks.check("one QEMU process names the pod", footprint.qemu.len() == 1, || format!("{:?}", footprint.qemu));

    let first =
        ContainerSpec::new("first", BUSYBOX_IMAGE, &["sh", "-c", "uname -r; echo to-stderr >&2; exec sleep 3600"]);
    let first_id = create_and_start(&cri, &containerd, &pod_id, &first, &pod);
    let second_id = create_and_start(
        &cri,
        &containerd,
        &pod_id,
        &ContainerSpec::new("second", BUSYBOX_IMAGE, &["sleep", "3600"]),
        &pod,
    );
    for id in [&first_id, &second_id] {
        let status = cri.container_status(id).expect("ContainerStatus");
        checks.check("both containers run", status.state == ContainerState::ContainerRunning as i32, || {
            format!("{id}: {status:?}")
        });
    }
    let qemu_now = qemu_processes(&pod_id);
    checks.check("still the one QEMU of the pod after two containers started", qemu_now == footprint.qemu, || {
        format!("before {:?}, now {qemu_now:?}", footprint.qemu)
    });
    let own_vms: Vec<_> = [&first_id, &second_id].iter().flat_map(|id| qemu_processes(id)).collect();
    checks.check("no container has a VM of its own", own_vms.is_empty(), || format!("{own_vms:?}"));

    let boot_ids = boot_ids(&cri, &[&first_id, &second_id], EXEC_TIMEOUT);
    checks.check(
        "both containers share one guest (same boot id), not the host's",
        boot_ids[0] == boot_ids[1] && boot_ids[0].len() == 36 && boot_ids[0] != host_boot_id.trim(),
        || format!("boot ids {boot_ids:?}, host {}", host_boot_id.trim()),
    );
    let out = cri.exec_sync(&second_id, &["uname", "-r"], EXEC_TIMEOUT);
    checks.check(
        "exec in the second container sees the guest kernel",
        out.as_ref().is_ok_and(|o| o.stdout.trim() == release),
        || format!("{out:?}, guest kernel {release}"),
    );
    let out = cri.exec_sync(&first_id, &["sh", "-c", "echo err >&2; exit 3"], EXEC_TIMEOUT);
    checks.check(
        "ExecSync exit 3 with stderr",
        out.as_ref().is_ok_and(|o| o.exit_code == 3 && o.stderr == "err\n"),
        || format!("{out:?}"),
    );
    let log_path = logs.path().join(&first.log_path);
    let lines = poll(Duration::from_secs(15), || {
        let lines = parse_cri_log(&std::fs::read_to_string(&log_path).unwrap_or_default());
        (lines.len() >= 2).then_some(lines)
    })
    .unwrap_or_default();
    checks.check(
        "the first container's log has the guest kernel on stdout and a line on stderr",
        lines.iter().any(|l| l.stream == "stdout" && l.text == release)
            && lines.iter().any(|l| l.stream == "stderr" && l.text == "to-stderr"),
        || format!("{}: {lines:?}", log_path.display()),
    );

    // A container that ends by itself reports its status, and leaves the VM when removed.
    let third_id = create_and_start(
        &cri,
        &containerd,
        &pod_id,
        &ContainerSpec::new("third", BUSYBOX_IMAGE, &["sh", "-c", "exit 7"]),
        &pod,
    );
    let exit = poll(Duration::from_secs(60), || exited_with(&cri, &third_id));
    checks.check("a container that exits 7 is exited with code 7", exit == Some(7), || format!("{exit:?}"));
    let removed = cri.remove_container(&third_id);
    checks.check("RemoveContainer of the exited container", removed.is_ok(), || format!("{removed:?}"));

    // kill -9 of a container's stand-in ends that container only; removing it leaves nothing of it.
    let standin = standins_of(&second_id);
    checks.check("the second container has one stand-in", standin.len() == 1, || format!("{standin:?}"));
    if let [(pid, _)] = standin[..] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
            .expect("kill -9");
        let exit = poll(Duration::from_secs(60), || exited_with(&cri, &second_id));
        checks.check("killing the stand-in ends its container (137)", exit == Some(137), || format!("{exit:?}"));
        let removed = cri.remove_container(&second_id);
        checks.check("RemoveContainer after its stand-in was killed", removed.is_ok(), || format!("{removed:?}"));
        let out = cri.exec_sync(&first_id, &["true"], EXEC_TIMEOUT);
        checks.check("the pod's other container still runs", out.as_ref().is_ok_and(|o| o.exit_code == 0), || {
            format!("{out:?}")
        });
    }
    for id in [&third_id, &second_id] {
        let dir = PathBuf::from(RUNC_ROOT).join(id);
        checks.check("a removed container's directory is gone", !dir.exists(), || format!("{} left", dir.display()));
        let mounts = sandbox_dir(&pod_id).join("mounts").join(id);
        let under = mounts_under(&mounts);
        checks.check(
            "a removed container's mounts in the running pod are gone",
            under.is_empty() && !mounts.exists(),
            || format!("{}: {under:?}", mounts.display()),
        );
    }

    footprint.remove_and_check(&cri, &containerd, &[&first_id], &mut checks);
    let left = e2e::kata::standins(&[]);
    checks.check("no stand-in left", left.is_empty(), || format!("{left:?}"));
    for id in [&pod_id, &first_id] {
        let dir = PathBuf::from(RUNC_ROOT).join(id);
        checks.check("no container directory left", !dir.exists(), || format!("{} left", dir.display()));
    }
    drop(cleanup);
    check_clean_stop(containerd, &mut checks);
    checks.finish();
}

#[test]
fn an_untrusted_pod_runs_in_a_vm_through_the_v1_shim_with_kata_runtime_as_engine() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    testutil::skip_unless!((!Path::new("/usr/bin/containerd-shim").is_file())
        .then_some("containerd's v1 shim /usr/bin/containerd-shim is missing (Debian package containerd)"));
    let _vm = vm_lock();
    let Setup { release, containerd, _conf, _net } = setup(parts, "the runtime_engine setup", runtime_engine);
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();
    let logs = tempfile::tempdir().expect("log dir");
    let netns_before = netns_entries();
    let mut pod = PodSpec::new("engine-pod", logs.path());
    pod.annotations.insert("io.kubernetes.cri.untrusted-workload".to_owned(), "true".to_owned());
    let pod_id = step("RunPodSandbox (untrusted workload)", || {
        cri.run_pod_sandbox(&pod.build(), "")
            .unwrap_or_else(|e| panic!("RunPodSandbox untrusted: {e}\n{}", containerd.log_tail(60)))
    });
    let footprint = KataPodFootprint::take(&pod_id, netns_before);
    checks.check("one QEMU process names the pod", footprint.qemu.len() == 1, || format!("{:?}", footprint.qemu));
    let v1_shims = processes(|argv| {
        argv.first().is_some_and(|a| a.ends_with("/containerd-shim") || a == "containerd-shim")
            && argv.iter().any(|a| a.contains(&pod_id))
    });
    checks
        .check("containerd's v1 shim runs the pod", !v1_shims.is_empty(), || "no containerd-shim names the pod".into());
    let app_id = create_and_start(
        &cri,
        &containerd,
        &pod_id,
        &ContainerSpec::new("app", BUSYBOX_IMAGE, &["sleep", "3600"]),
        &pod,
    );
    let out = cri.exec_sync(&app_id, &["uname", "-r"], EXEC_TIMEOUT);
    checks.check("the container sees the guest kernel", out.as_ref().is_ok_and(|o| o.stdout.trim() == release), || {
        format!("{out:?}, guest kernel {release}")
    });
    let qemu_now = qemu_processes(&pod_id);
    checks.check(
        "the container runs in the pod's VM",
        qemu_now == footprint.qemu && qemu_processes(&app_id).is_empty(),
        || format!("before {:?}, now {qemu_now:?}", footprint.qemu),
    );
    footprint.remove_and_check(&cri, &containerd, &[&app_id], &mut checks);
    let left = e2e::kata::standins(&[]);
    checks.check("no stand-in left", left.is_empty(), || format!("{left:?}"));
    drop(cleanup);
    check_clean_stop(containerd, &mut checks);
    checks.finish();
}
