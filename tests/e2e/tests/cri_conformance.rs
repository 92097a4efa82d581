//! What the kubelet expects of a runtime, checked through containerd's CRI plugin side by side with runc
//! (issue #13): a stop right after start reaches the program's handler, a binary on a volume runs, a pod's
//! containers share its IPC and UTS namespaces (and sysctls) and, with `shareProcessNamespace`, its PID
//! namespace; seccomp profiles are enforced; `rslave`/`rshared` volumes are created and see mounts the host
//! makes under them later. Each pod runs first with the `runc` handler, which proves the expectation, then with
//! `kata`.
//!
//! Needs what `cri_kata.rs` needs (root, containerd, runc, busybox-static, containernetworking-plugins, `ip`,
//! `nsenter`, QEMU and the parts `scripts/test.sh` exports); skips with the reason otherwise.
//!
//! Network safety: the pods' network is the test's own bridge; nothing is sent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use e2e::checks::{check_clean_stop, error_chain, poll, step, Checks};
use e2e::cri::{
    import_pod_images, start_containerd, vm_lock, CniNetwork, ContainerSpec, CriClient, PodCleanup, PodSpec,
};
use e2e::kata::KataConf;
use e2e::{Containerd, BUSYBOX_IMAGE};
use k8s_cri::v1::{
    ContainerConfig, ContainerState, LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    MountPropagation, NamespaceMode, NamespaceOption, PodSandboxConfig, SecurityProfile,
};

const CRI_DEADLINE: Duration = Duration::from_secs(90);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// A profile that refuses `mkdir` and `mkdirat` (allowed to any container otherwise) with EPERM.
const NO_MKDIR_PROFILE: &str = r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
"syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#;

/// Host parts of the pod: a volume holding a script, a profile file, and a shared mount for propagation.
struct HostSide {
    _dir: tempfile::TempDir,
    logs: PathBuf,
    scripts: PathBuf,
    profile: PathBuf,
    /// A directory bind-mounted onto itself and made shared, as kubelet requires for propagated volumes.
    shared: PathBuf,
}

impl HostSide {
    fn create() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let logs = dir.path().join("logs");
        let scripts = dir.path().join("scripts");
        let shared = dir.path().join("shared");
        for d in [&logs, &scripts, &shared] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let script = scripts.join("run.sh");
        std::fs::write(&script, "#!/bin/sh\necho from-volume\nexec sleep 3600\n").expect("write script");
        run(&["chmod", "0755", &script.display().to_string()]);
        let profile = dir.path().join("no-mkdir.json");
        std::fs::write(&profile, NO_MKDIR_PROFILE).expect("write profile");
        let s = shared.display().to_string();
        run(&["mount", "--bind", &s, &s]);
        run(&["mount", "--make-rshared", &s]);
        HostSide { _dir: dir, logs, scripts, profile, shared }
    }

    /// What the host mounts under the shared volume after the containers started.
    fn mount_later(&self, name: &str) {
        let target = self.shared.join(name);
        std::fs::create_dir_all(&target).expect("mkdir");
        run(&["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", &target.display().to_string()]);
        std::fs::write(target.join("seen"), "propagated\n").expect("write");
    }

    fn unmount(&self) {
        let _ = std::process::Command::new("umount")
            .arg("-R")
            .arg(&self.shared)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for HostSide {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn run(args: &[&str]) {
    let status = std::process::Command::new(args[0]).args(&args[1..]).status().expect(args[0]);
    assert!(status.success(), "{args:?}: {status}");
}

fn pod_config(name: &str, host: &HostSide, pid: NamespaceMode) -> PodSandboxConfig {
    let mut config = PodSpec::new(name, &host.logs).build();
    config.linux = Some(LinuxPodSandboxConfig {
        sysctls: HashMap::from([
            ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
            ("kernel.msgmax".to_string(), "12345".to_string()),
        ]),
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Pod as i32,
                pid: pid as i32,
                ipc: NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

fn with_seccomp(mut config: ContainerConfig, profile: SecurityProfile) -> ContainerConfig {
    let linux = config.linux.get_or_insert_with(Default::default);
    let context = linux.security_context.get_or_insert_with(LinuxContainerSecurityContext::default);
    context.seccomp = Some(profile);
    config
}

struct Pod<'a> {
    cri: &'a CriClient,
    containerd: &'a Containerd,
    id: String,
    config: PodSandboxConfig,
    /// The PID namespace mode of the pod, which kubelet repeats in each container's config.
    pid: NamespaceMode,
    containers: Vec<String>,
}

impl<'a> Pod<'a> {
    fn run(
        cri: &'a CriClient,
        containerd: &'a Containerd,
        config: PodSandboxConfig,
        pid: NamespaceMode,
        handler: &str,
    ) -> Self {
        let id = step(&format!("RunPodSandbox ({handler})"), || {
            cri.run_pod_sandbox(&config, handler)
                .unwrap_or_else(|e| panic!("RunPodSandbox: {}\n{}", error_chain(&e), containerd.log_tail(60)))
        });
        Pod { cri, containerd, id, config, pid, containers: Vec::new() }
    }

    fn create(&mut self, config: &ContainerConfig) -> Result<String, String> {
        let mut config = config.clone();
        let linux = config.linux.get_or_insert_with(Default::default);
        let context = linux.security_context.get_or_insert_with(LinuxContainerSecurityContext::default);
        context.namespace_options = Some(NamespaceOption {
            network: NamespaceMode::Pod as i32,
            pid: self.pid as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        });
        let id = self.cri.create_container(&self.id, &config, &self.config).map_err(|e| error_chain(&e))?;
        self.containers.push(id.clone());
        Ok(id)
    }

    /// Creates and starts; the error names the step.
    fn start(&mut self, config: &ContainerConfig) -> Result<String, String> {
        let id = self.create(config).map_err(|e| format!("CreateContainer: {e}"))?;
        self.cri.start_container(&id).map_err(|e| format!("StartContainer: {}", error_chain(&e)))?;
        Ok(id)
    }

    fn exec(&self, id: &str, cmd: &[&str]) -> String {
        match self.cri.exec_sync(id, cmd, EXEC_TIMEOUT) {
            Ok(out) => format!(
                "{}{}",
                out.stdout.trim(),
                if out.exit_code == 0 { String::new() } else { format!(" (exit {})", out.exit_code) }
            ),
            Err(e) => format!("<ExecSync failed: {}>", error_chain(&e)),
        }
    }

    fn remove(self) {
        for id in &self.containers {
            let _ = self.cri.stop_container(id, Duration::from_secs(2));
            let _ = self.cri.remove_container(id);
        }
        self.cri
            .stop_pod_sandbox(&self.id)
            .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", self.containerd.log_tail(60)));
        self.cri.remove_pod_sandbox(&self.id).unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    }
}

fn sleeper(name: &str) -> ContainerConfig {
    ContainerSpec::new(name, BUSYBOX_IMAGE, &["sleep", "3600"]).build()
}

/// The pod with a PID namespace per container (kubelet's default).
fn check_pod(cri: &CriClient, containerd: &Containerd, handler: &str, host: &HostSide, checks: &mut Checks) {
    let pid = NamespaceMode::Container;
    let mut pod = Pod::run(cri, containerd, pod_config(&format!("conf-{handler}"), host, pid), pid, handler);

    // Stop right after start: the TERM handler must run (exit 42), not the grace period end in SIGKILL (137).
    let stopper =
        ContainerSpec::new("stopper", BUSYBOX_IMAGE, &["sh", "-c", "trap 'exit 42' TERM; while :; do sleep 0.1; done"])
            .build();
    let stopped = pod.start(&stopper).and_then(|id| {
        cri.stop_container(&id, Duration::from_secs(30)).map_err(|e| error_chain(&e))?;
        let status = cri.container_status(&id).map_err(|e| error_chain(&e))?;
        Ok((status.state, status.exit_code))
    });
    checks.check(
        "a stop right after start reaches the program's TERM handler",
        matches!(stopped, Ok((s, 42)) if s == ContainerState::ContainerExited as i32),
        || format!("{handler}: {stopped:?}"),
    );

    // A binary from a volume.
    let scripted = ContainerSpec::new("scripted", BUSYBOX_IMAGE, &["/scripts/run.sh"])
        .mount(&host.scripts, "/scripts", true)
        .build();
    let started = pod.start(&scripted).and_then(|id| {
        let status = cri.container_status(&id).map_err(|e| error_chain(&e))?;
        Ok(status.state)
    });
    checks.check("a binary on a volume runs", started == Ok(ContainerState::ContainerRunning as i32), || {
        format!("{handler}: {started:?}")
    });

    // Two containers share the pod's IPC and UTS namespaces, and its IPC sysctls.
    let (a, b) = match (pod.start(&sleeper("a")), pod.start(&sleeper("b"))) {
        (Ok(a), Ok(b)) => (a, b),
        other => {
            checks.check("two plain containers start", false, || format!("{handler}: {other:?}"));
            pod.remove();
            return;
        }
    };
    for ns in ["ipc", "uts"] {
        let path = format!("/proc/self/ns/{ns}");
        let (in_a, in_b) = (pod.exec(&a, &["readlink", &path]), pod.exec(&b, &["readlink", &path]));
        let name = if ns == "ipc" {
            "a pod's containers share its IPC namespace"
        } else {
            "a pod's containers share its UTS namespace"
        };
        checks.check(name, in_a == in_b && in_a.starts_with(ns), || format!("{handler}: {in_a} vs {in_b}"));
    }
    let sysctls = pod.exec(&a, &["cat", "/proc/sys/kernel/shm_rmid_forced", "/proc/sys/kernel/msgmax"]);
    checks.check("pod sysctls reach every container", sysctls == "1\n12345", || format!("{handler}: {sysctls:?}"));
    let own_pid_1 = pod.exec(&a, &["cat", "/proc/1/cmdline"]);
    checks.check(
        "without shareProcessNamespace a container is PID 1 of its own",
        own_pid_1.starts_with("sleep"),
        || format!("{handler}: /proc/1/cmdline {own_pid_1:?}"),
    );

    // seccomp: RuntimeDefault is a filter; a Localhost profile that refuses mkdir is enforced.
    let default =
        with_seccomp(sleeper("seccomp-default"), SecurityProfile { profile_type: 0, localhost_ref: String::new() });
    let localhost = with_seccomp(
        sleeper("seccomp-local"),
        SecurityProfile { profile_type: 2, localhost_ref: host.profile.display().to_string() },
    );
    match (pod.start(&default), pod.start(&localhost)) {
        (Ok(d), Ok(l)) => {
            let mode = pod.exec(&d, &["grep", "^Seccomp:", "/proc/self/status"]);
            checks.check("RuntimeDefault seccomp filters the container", mode.ends_with('2'), || {
                format!("{handler}: {mode}")
            });
            let mkdir = pod.exec(&l, &["mkdir", "/tmp/refused"]);
            let allowed = pod.exec(&d, &["mkdir", "/tmp/allowed"]);
            checks.check(
                "a Localhost seccomp profile refuses its syscalls",
                mkdir.contains("(exit 1)") && allowed.is_empty(),
                || format!("{handler}: under the profile {mkdir:?}, without it {allowed:?}"),
            );
        }
        other => checks.check("seccomp containers start", false, || format!("{handler}: {other:?}")),
    }

    // Propagated volumes: created, and a mount the host makes under them later shows inside.
    let mut propagated = sleeper("propagated");
    for (path, propagation) in [
        ("/slave", MountPropagation::PropagationHostToContainer),
        ("/shared", MountPropagation::PropagationBidirectional),
    ] {
        propagated.mounts.push(k8s_cri::v1::Mount {
            container_path: path.to_string(),
            host_path: host.shared.display().to_string(),
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    match pod.start(&propagated) {
        Ok(id) => {
            checks.check("rslave and rshared volumes are created", true, String::new);
            let name = format!("later-{handler}");
            host.mount_later(&name);
            for path in ["/slave", "/shared"] {
                let file = format!("{path}/{name}/seen");
                let seen = poll(Duration::from_secs(10), || {
                    let out = pod.exec(&id, &["cat", &file]);
                    (out == "propagated").then_some(out)
                });
                checks.check("a host mount made later under a propagated volume shows inside", seen.is_some(), || {
                    format!("{handler}: {file}: {}", pod.exec(&id, &["ls", "-la", path]))
                });
            }
        }
        Err(e) => checks.check("rslave and rshared volumes are created", false, || format!("{handler}: {e}")),
    }
    pod.remove();
}

/// The pod with `shareProcessNamespace`: its containers see the sandbox's processes.
fn check_shared_pid_pod(cri: &CriClient, containerd: &Containerd, handler: &str, host: &HostSide, checks: &mut Checks) {
    let pid = NamespaceMode::Pod;
    let mut pod = Pod::run(cri, containerd, pod_config(&format!("pidns-{handler}"), host, pid), pid, handler);
    match pod.start(&sleeper("shares-pid")) {
        Ok(id) => {
            let pid_1 = pod.exec(&id, &["cat", "/proc/1/cmdline"]);
            let own = pod.exec(&id, &["sh", "-c", "ps -o comm | grep -c sleep"]);
            checks.check(
                "with shareProcessNamespace, PID 1 is the pod's sandbox",
                pid_1.contains("infinity") || pid_1.contains("pause"),
                || format!("{handler}: /proc/1/cmdline {pid_1:?}, sleeps seen {own:?}"),
            );
        }
        Err(e) => {
            checks.check("with shareProcessNamespace, PID 1 is the pod's sandbox", false, || format!("{handler}: {e}"))
        }
    }
    pod.remove();
}

/// What a VM cannot do, refused with the reason: sharing the host's PID or IPC namespace.
fn check_host_namespaces_refused(cri: &CriClient, host: &HostSide, checks: &mut Checks) {
    for (mode, name) in [("hostPID", "host-pid"), ("hostIPC", "host-ipc")] {
        let mut config = pod_config(name, host, NamespaceMode::Pod);
        let options = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|c| c.namespace_options.as_mut())
            .expect("namespace options");
        if mode == "hostPID" {
            options.pid = NamespaceMode::Node as i32;
        } else {
            options.ipc = NamespaceMode::Node as i32;
        }
        let refused = cri.run_pod_sandbox(&config, "kata").map_err(|e| error_chain(&e));
        let expected = format!("{mode} pods are not supported");
        checks.check(
            "hostPID and hostIPC pods are refused with the reason",
            refused.as_ref().is_err_and(|e| e.contains(&expected)),
            || format!("{mode}: {refused:?}"),
        );
        if let Ok(id) = refused {
            let _ = cri.stop_pod_sandbox(&id);
            let _ = cri.remove_pod_sandbox(&id);
        }
    }
}

#[test]
fn pods_behave_as_with_runc() {
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
    let host = HostSide::create();

    let mut runc = Checks::default();
    check_pod(&cri, &containerd, "runc", &host, &mut runc);
    check_shared_pid_pod(&cri, &containerd, "runc", &host, &mut runc);
    let mut kata = Checks::default();
    check_pod(&cri, &containerd, "kata", &host, &mut kata);
    check_shared_pid_pod(&cri, &containerd, "kata", &host, &mut kata);
    check_host_namespaces_refused(&cri, &host, &mut kata);

    drop(cleanup);
    drop(cri);
    check_clean_stop(containerd, &mut kata);
    net.remove().expect("bridge removed");
    drop(host);
    runc.finish();
    kata.finish();
}
