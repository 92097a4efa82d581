//! CRI streaming into a Kata pod (issue #5): what `crictl exec -it`, `crictl attach` and `kubectl port-forward`
//! do, through the websocket of containerd's streaming server, into containers running in the pod's VM: exec
//! with stdin, with a tty (resize, exit code) and with stderr apart, attach to a container's stdin and stdout,
//! with and without a tty, and port-forward to a server in the pod. One pod VM serves every check; removing it
//! must leave nothing behind. `cri_runc.rs` runs the same streaming checks with runc, which proves the client
//! apart from kata.
//!
//! Needs what `cri_kata.rs` needs (root, containerd, runc, busybox-static, containernetworking-plugins,
//! `ip`, `nsenter`, QEMU and the parts `scripts/test.sh` exports); skips with the reason otherwise.
//!
//! Network safety: the streaming server listens on 127.0.0.1; the pod's network is the test's own bridge.

use std::time::Duration;

use e2e::checks::{check_clean_stop, error_chain, step, Checks};
use e2e::cri::{
    attach_target, check_attach, check_exec_streams, check_port_forward, import_pod_images, port_forward_target,
    start_containerd, vm_lock, CniNetwork, ContainerSpec, CriClient, KataPodFootprint, PodCleanup, PodSpec,
};
use e2e::kata::KataConf;
use e2e::leaks::netns_entries;
use e2e::{Containerd, BUSYBOX_IMAGE};
use k8s_cri::v1::PodSandboxConfig;

/// Every CRI call may wait for a VM boot or a guest round trip under TCG on a busy machine.
const CRI_DEADLINE: Duration = Duration::from_secs(90);
/// How long any one read of a stream may wait.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates `spec` in the pod (panics with containerd's log if that fails) and starts it. A failed start
/// is a failed check, not a panic, so that the checks of the other containers still run; returns the id
/// and whether the container started.
fn run_container(
    cri: &CriClient,
    containerd: &Containerd,
    pod: (&str, &PodSandboxConfig),
    spec: &ContainerSpec,
    checks: &mut Checks,
) -> (String, bool) {
    let id = step(&format!("CreateContainer {}", spec.name), || {
        cri.create_container(pod.0, &spec.build(), pod.1).unwrap_or_else(|e| {
            panic!("CreateContainer {}: {}\n{}", spec.name, error_chain(&e), containerd.log_tail(60))
        })
    });
    let started = step(&format!("StartContainer {}", spec.name), || cri.start_container(&id));
    checks.check("StartContainer", started.is_ok(), || {
        let error = started.as_ref().err().map(|e| error_chain(e));
        format!("{} (tty {}): {}", spec.name, spec.tty, error.unwrap_or_default())
    });
    (id, started.is_ok())
}

#[test]
fn streaming_exec_and_attach_reach_containers_in_the_pod_vm() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let conf = KataConf::write(&parts).expect("kata configuration written");
    let mut net = CniNetwork::create().expect("CNI network config");
    let containerd = step("containerd with CRI and the kata handler", || {
        start_containerd(&parts, &conf.path, &net, CRI_DEADLINE).expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();
    let logs = tempfile::tempdir().expect("temp dir");

    let netns_before = netns_entries();
    let pod_config = PodSpec::new("kata-stream", logs.path()).build();
    let pod_id = step("RunPodSandbox (kata)", || {
        cri.run_pod_sandbox(&pod_config, "kata")
            .unwrap_or_else(|e| panic!("RunPodSandbox: {}\n{}", error_chain(&e), containerd.log_tail(60)))
    });
    let footprint = KataPodFootprint::take(&pod_id, netns_before);
    checks.check("one QEMU process names the pod sandbox id", footprint.qemu.len() == 1, || {
        format!("{:?}", footprint.qemu)
    });
    let pod = (pod_id.as_str(), &pod_config);
    // PID 1 of a container ignores SIGTERM unless it handles it: trap it so that StopContainer does not
    // wait out its grace period.
    let shell = ContainerSpec::new("shell", BUSYBOX_IMAGE, &["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]);
    let (shell_id, shell_runs) = run_container(&cri, &containerd, pod, &shell, &mut checks);
    let attach = attach_target("attach", BUSYBOX_IMAGE, false);
    let (attach_id, attach_runs) = run_container(&cri, &containerd, pod, &attach, &mut checks);
    let attach_tty = attach_target("attach-tty", BUSYBOX_IMAGE, true);
    let (attach_tty_id, attach_tty_runs) = run_container(&cri, &containerd, pod, &attach_tty, &mut checks);
    let echo = port_forward_target("echo", BUSYBOX_IMAGE);
    let (echo_id, echo_runs) = run_container(&cri, &containerd, pod, &echo, &mut checks);
    let release = parts.kernel_release().expect("kernel has a version banner");
    let uname = cri.exec_sync(&shell_id, &["uname", "-r"], STREAM_TIMEOUT);
    checks.check(
        "the container runs on the guest kernel",
        uname.as_ref().is_ok_and(|o| o.stdout.trim() == release),
        || format!("expected {release}; ExecSync uname -r: {uname:?}"),
    );

    step("streaming Exec and Attach", || {
        if shell_runs {
            check_exec_streams(&cri, &shell_id, STREAM_TIMEOUT, &mut checks);
        }
        for (id, tty, runs) in [(&attach_id, false, attach_runs), (&attach_tty_id, true, attach_tty_runs)] {
            if runs {
                check_attach(&cri, id, tty, STREAM_TIMEOUT, &mut checks);
            }
        }
    });

    // containerd dials the port in the pod's network namespace on the host; the server listens in the VM.
    if echo_runs {
        step("PortForward", || check_port_forward(&cri, &pod_id, STREAM_TIMEOUT, &mut checks));
    }

    let containers = [shell_id.as_str(), &attach_id, &attach_tty_id, &echo_id];
    footprint.remove_and_check(&cri, &containerd, &containers, &mut checks);
    drop(cleanup);
    drop(cri);
    check_clean_stop(containerd, &mut checks);
    net.remove().expect("bridge removed");
    checks.finish();
}
