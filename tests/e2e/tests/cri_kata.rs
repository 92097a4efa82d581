//! Kubernetes pods in Kata VMs through containerd's CRI plugin (issue #5): one VM per pod shared by its
//! containers, the pod's network mirrored into the VM, volumes, exec, logs, stats, every way the how-to
//! routes a pod to Kata (RuntimeClass handler, untrusted-workload annotation, default runtime; v1 and v2
//! config formats), and nothing left after the pod is removed.
//!
//! Needs root, containerd, runc, busybox-static, containernetworking-plugins, `ip`, `nsenter`, QEMU and the
//! parts `scripts/test.sh` exports (kernel, agent initrd, helper daemons, the shim); skips with the reason
//! otherwise. At most one pod VM of this file runs at a time.
//!
//! Network safety: the only traffic sent goes from the host to the pod's address on the test's own bridge,
//! and inside the pod over its loopback; the pod's DNS server is its own loopback.

use std::path::Path;
use std::time::Duration;

use e2e::checks::{check_clean_stop, poll, step, Checks};
use e2e::config_files::{cri_plugin, merge, private_cri_config};
use e2e::cri::{
    boot_ids, http_get, import_pod_images, kata_taps_anywhere, parse_cri_log, qemu_processes, start_containerd,
    vm_lock, CniNetwork, ContainerSpec, CriClient, KataPodFootprint, PodCleanup, PodSpec, WebVolumes,
};
use e2e::kata::{sandbox_dir, KataConf};
use e2e::leaks::{links, netns_entries};
use e2e::{Containerd, ContainerdOptions, BUSYBOX_IMAGE};
use k8s_cri::v1::{ContainerState, LinuxContainerResources};

/// Every CRI call may wait for a VM boot or a guest round trip under TCG on a busy machine.
const CRI_DEADLINE: Duration = Duration::from_secs(90);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
const UNTRUSTED_ANNOTATION: &str = "io.kubernetes.cri.untrusted-workload";

/// The main test: one pod VM serves every check that does not need a VM of its own.
#[test]
fn pod_vm_shared_by_containers_with_network_volumes_exec_logs_and_stats() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let conf = KataConf::write(&parts).expect("kata configuration written");
    let mut net = CniNetwork::create().expect("CNI network config");
    eprintln!("bridge {} subnet {}", net.bridge(), net.subnet());
    let containerd = step("containerd with CRI and the kata handler", || {
        start_containerd(&parts, &conf.path, &net, CRI_DEADLINE).expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();

    let volumes = WebVolumes::create("kata").expect("host volumes");
    let WebVolumes { ro, rw, logs, page, .. } = &volumes;
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("host boot id");

    let netns_before = netns_entries();
    let pod = PodSpec::new("kata-web", logs);
    let pod_config = pod.build();
    let pod_id = step("RunPodSandbox (kata)", || {
        cri.run_pod_sandbox(&pod_config, "kata")
            .unwrap_or_else(|e| panic!("RunPodSandbox with handler kata: {e}\n{}", containerd.log_tail(60)))
    });
    let footprint = KataPodFootprint::take(&pod_id, netns_before);
    let (qemu, pod_netns) = (&footprint.qemu, &footprint.netns);
    checks.check("one QEMU process names the pod sandbox id", qemu.len() == 1, || format!("{qemu:?}"));
    eprintln!("pod {pod_id}: netns {pod_netns:?}");
    let pod_links = pod_netns.as_deref().map(|ns| links(Some(ns)));
    checks.check(
        "the pod's network namespace holds a kata tap while the pod runs",
        matches!(&pod_links, Some(Ok(l)) if l.iter().any(|n| n.ends_with("_kata"))),
        || format!("links of {pod_netns:?}: {pod_links:?}"),
    );

    let server = volumes.httpd();
    let server_id = step("CreateContainer httpd", || {
        cri.create_container(&pod_id, &server.build(), &pod_config)
            .unwrap_or_else(|e| panic!("CreateContainer httpd: {e}\n{}", containerd.log_tail(60)))
    });
    step("StartContainer httpd", || {
        cri.start_container(&server_id)
            .unwrap_or_else(|e| panic!("StartContainer httpd: {e}\n{}", containerd.log_tail(60)))
    });
    let client = ContainerSpec::new("client", BUSYBOX_IMAGE, &["sleep", "3600"]);
    let client_id = step("CreateContainer client", || {
        cri.create_container(&pod_id, &client.build(), &pod_config)
            .unwrap_or_else(|e| panic!("CreateContainer client: {e}\n{}", containerd.log_tail(60)))
    });
    step("StartContainer client", || {
        cri.start_container(&client_id)
            .unwrap_or_else(|e| panic!("StartContainer client: {e}\n{}", containerd.log_tail(60)))
    });
    for id in [&server_id, &client_id] {
        let status = cri.container_status(id).expect("ContainerStatus");
        checks.check("containers are running", status.state == ContainerState::ContainerRunning as i32, || {
            format!("{id}: {status:?}")
        });
    }
    let qemu_now = qemu_processes(&pod_id);
    checks.check("still one QEMU for the pod after two containers started", qemu_now == *qemu, || {
        format!("before {qemu:?}, now {qemu_now:?}")
    });

    // One VM: both containers see the same guest kernel boot, which is not the host's.
    let boot_ids = boot_ids(&cri, &[&server_id, &client_id], EXEC_TIMEOUT);
    checks.check(
        "both containers share one guest (same boot id), not the host's",
        boot_ids[0] == boot_ids[1] && boot_ids[0].len() == 36 && boot_ids[0] != host_boot_id.trim(),
        || format!("boot ids {boot_ids:?}, host {}", host_boot_id.trim()),
    );

    // The containers share the pod's network namespace in the guest: localhost reaches the server.
    let local = poll(Duration::from_secs(30), || {
        cri.exec_sync(&client_id, &["wget", "-qO-", "http://127.0.0.1:8080/index.html"], EXEC_TIMEOUT)
            .ok()
            .filter(|o| o.exit_code == 0)
    });
    checks.check(
        "the client container reaches the server over localhost",
        local.as_ref().is_some_and(|o| o.stdout == *page),
        || format!("{local:?}"),
    );

    // The pod's IP answers from the host: bridge -> veth -> tc redirect -> tap -> VM.
    let ip = cri.pod_ip(&pod_id);
    eprintln!("pod IP: {ip:?}");
    checks.check(
        "PodSandboxStatus has an IP in the test subnet",
        ip.as_ref().is_ok_and(|ip| net.contains(*ip)),
        || format!("{ip:?} (subnet {})", net.subnet()),
    );
    if let Ok(ip) = ip {
        let mut last = String::new();
        let response = poll(Duration::from_secs(30), || match http_get(ip, 8080, "/index.html") {
            Ok(r) => Some(r),
            Err(e) => {
                last = e.to_string();
                None
            }
        });
        checks.check(
            "TCP from the host to the pod IP reaches httpd in the VM",
            response.as_ref().is_some_and(|r| r.starts_with("HTTP/1.") && r.ends_with(page.as_str())),
            || format!("{ip}:8080: {response:?}, last error: {last}"),
        );
    }

    // ExecSync: output and exit codes.
    let out = cri.exec_sync(&server_id, &["echo", "hi"], EXEC_TIMEOUT);
    checks.check("ExecSync echo hi", out.as_ref().is_ok_and(|o| o.stdout == "hi\n" && o.exit_code == 0), || {
        format!("{out:?}")
    });
    let out = cri.exec_sync(&server_id, &["sh", "-c", "echo err >&2; exit 3"], EXEC_TIMEOUT);
    checks.check(
        "ExecSync exit 3 with stderr",
        out.as_ref().is_ok_and(|o| o.exit_code == 3 && o.stderr == "err\n"),
        || format!("{out:?}"),
    );

    // Volumes: read-only is readable and not writable; read-write round-trips.
    let out = cri.exec_sync(&server_id, &["cat", "/ro/file"], EXEC_TIMEOUT);
    checks.check("read-only volume is readable", out.as_ref().is_ok_and(|o| o.stdout == "read-only content\n"), || {
        format!("{out:?}")
    });
    let out = cri.exec_sync(&server_id, &["sh", "-c", "echo x > /ro/new"], EXEC_TIMEOUT);
    checks.check(
        "read-only volume is not writable",
        out.as_ref().is_ok_and(|o| o.exit_code != 0 && o.stderr.contains("Read-only file system"))
            && !ro.join("new").exists(),
        || format!("{out:?}; host file exists: {}", ro.join("new").exists()),
    );
    let out = cri.exec_sync(&server_id, &["sh", "-c", "cat /rw/in && echo from-container > /rw/out"], EXEC_TIMEOUT);
    let back = std::fs::read_to_string(rw.join("out"));
    checks.check(
        "read-write volume round-trips a file",
        out.as_ref().is_ok_and(|o| o.stdout == "from-host\n" && o.exit_code == 0)
            && back.as_deref().is_ok_and(|b| b == "from-container\n"),
        || format!("{out:?}; host sees {back:?}"),
    );

    // The CRI log file has both streams of the server's first lines.
    let log_path = logs.join(&server.log_path);
    let lines = poll(Duration::from_secs(15), || {
        let lines = parse_cri_log(&std::fs::read_to_string(&log_path).unwrap_or_default());
        (lines.len() >= 2).then_some(lines)
    })
    .unwrap_or_else(|| parse_cri_log(&std::fs::read_to_string(&log_path).unwrap_or_default()));
    checks.check(
        "CRI log file has stdout and stderr lines",
        lines.iter().any(|l| l.stream == "stdout" && l.text == format!("started-{}", pod.hostname))
            && lines.iter().any(|l| l.stream == "stderr" && l.text == "to-stderr"),
        || format!("{}: {lines:?}", log_path.display()),
    );

    // Stats come from the guest's cgroups.
    let stats = cri.container_stats(&server_id);
    let (cpu, memory) = stats.as_ref().map_or((0, 0), |s| {
        (
            s.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map_or(0, |v| v.value),
            s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value),
        )
    });
    checks.check("ContainerStats cpu and memory are non-zero", cpu > 0 && memory > 0, || format!("{stats:?}"));

    // UpdateContainerResources reaches the container's cgroup v2 in the guest.
    let limit: i64 = 96 * 1024 * 1024;
    let updated = cri.update_container_resources(
        &server_id,
        &LinuxContainerResources { memory_limit_in_bytes: limit, ..Default::default() },
    );
    let max = cri.exec_sync(
        &server_id,
        &["sh", "-c", "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max"],
        Duration::from_secs(60),
    );
    checks.check(
        "UpdateContainerResources sets memory.max in the guest",
        updated.is_ok() && max.as_ref().is_ok_and(|o| o.stdout.trim() == limit.to_string()),
        || format!("update: {updated:?}; memory.max: {max:?}"),
    );

    // The pod's hostname and DNS configuration from CRI reach the containers in the VM.
    let names = cri.exec_sync(&server_id, &["sh", "-c", "hostname; cat /etc/resolv.conf"], Duration::from_secs(60));
    checks.check(
        "hostname and resolv.conf come from the pod config",
        names.as_ref().is_ok_and(|o| {
            o.stdout.lines().next() == Some(pod.hostname.as_str())
                && o.stdout.lines().any(|l| l.trim() == "nameserver 127.0.0.1")
        }),
        || format!("{names:?}"),
    );

    // Teardown through CRI.
    footprint.remove_and_check(&cri, &containerd, &[&server_id, &client_id], &mut checks);
    if let Ok(ip) = ip {
        checks
            .check("the pod IP no longer answers", http_get(ip, 8080, "/").is_err(), || format!("{ip} still answers"));
    }

    drop(cleanup);
    drop(cri);
    check_clean_stop(containerd, &mut checks);
    net.remove().expect("bridge removed");
    checks.finish();
}

/// A complete private containerd config of format `version` (paths under `{dir}`, CRI with our pause image
/// and the test's CNI directory) with the repository's `config/containerd/v<version>/<file>` merged over it,
/// and every kata runtime's `ConfigPath` pointed at `conf` (the shipped files name /etc/kata-containers).
fn config_from_repo(version: i64, file: &str, cni_conf_dir: &Path, conf: &Path) -> String {
    let cri = cri_plugin(version);
    let path = testutil::package_dir().join(format!("../../config/containerd/v{version}/{file}"));
    let snippet: toml::Table = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut table = private_cri_config(version, &cni_conf_dir.display().to_string());
    merge(&mut table, snippet);
    let runtimes = table
        .get_mut("plugins")
        .and_then(toml::Value::as_table_mut)
        .and_then(|t| t.get_mut(cri))
        .and_then(toml::Value::as_table_mut)
        .and_then(|t| t.get_mut("containerd"))
        .and_then(toml::Value::as_table_mut)
        .and_then(|t| t.get_mut("runtimes"))
        .and_then(toml::Value::as_table_mut);
    for runtime in runtimes.into_iter().flat_map(|r| r.iter_mut().map(|(_, v)| v)) {
        if let Some(path) =
            runtime.get_mut("options").and_then(toml::Value::as_table_mut).and_then(|o| o.get_mut("ConfigPath"))
        {
            *path = toml::Value::String(conf.display().to_string());
        }
    }
    toml::to_string(&table).expect("config serializes")
}

/// Starts containerd with the repository's `v<version>/<file>` and runs pods: every `(handler, untrusted)`
/// in `kata_pods` must boot a VM whose container runs on the guest kernel; every one in `runc_pods` must
/// not. Everything is removed and checked for leftovers.
fn routes_pods(version: i64, file: &str, kata_pods: &[(&str, bool)], runc_pods: &[(&str, bool)]) {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let conf = KataConf::write(&parts).expect("kata configuration written");
    let net = CniNetwork::create().expect("CNI network config");
    let text = config_from_repo(version, file, net.conf_dir(), &conf.path);
    let containerd = Containerd::start(ContainerdOptions {
        namespace: "k8s.io".to_owned(),
        shim_dir: Some(parts.shim_dir.clone()),
        config_text: Some(text),
        // untrusted_workload_runtime has no options table in the how-to: its shim finds the config here.
        env: vec![("KATA_CONF_FILE".to_owned(), conf.path.display().to_string())],
        ctr_timeout: CRI_DEADLINE,
        ..ContainerdOptions::default()
    })
    .unwrap_or_else(|e| panic!("containerd with v{version}/{file}: {e}"));
    import_pod_images(&containerd).expect("images imported");
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let release = parts.kernel_release().expect("kernel has a version banner");
    let logs = tempfile::tempdir().expect("temp dir");
    let mut checks = Checks::default();
    let mut ids: Vec<String> = Vec::new();
    let pods = kata_pods.iter().map(|p| (p, true)).chain(runc_pods.iter().map(|p| (p, false)));
    for (n, (&(handler, untrusted), expect_vm)) in pods.enumerate() {
        let what = format!("v{version}/{file}: handler {handler:?}, untrusted {untrusted}");
        let mut pod = PodSpec::new(&format!("route{n}"), logs.path());
        if untrusted {
            pod.annotations.insert(UNTRUSTED_ANNOTATION.to_owned(), "true".to_owned());
        }
        let pod_config = pod.build();
        let pod_id = step(&format!("RunPodSandbox ({what})"), || {
            cri.run_pod_sandbox(&pod_config, handler)
                .unwrap_or_else(|e| panic!("RunPodSandbox {what}: {e}\n{}", containerd.log_tail(60)))
        });
        let qemu = qemu_processes(&pod_id);
        eprintln!("{what}: QEMU {qemu:?}");
        let spec = ContainerSpec::new(&format!("c{n}"), BUSYBOX_IMAGE, &["sleep", "3600"]);
        let ctr_id = cri.create_container(&pod_id, &spec.build(), &pod_config).expect("CreateContainer");
        cri.start_container(&ctr_id).expect("StartContainer");
        let uname = cri.exec_sync(&ctr_id, &["uname", "-r"], EXEC_TIMEOUT).map(|o| o.stdout.trim().to_owned());
        if expect_vm {
            checks.check("a kata pod boots one QEMU naming the pod", qemu.len() == 1, || format!("{what}: {qemu:?}"));
            checks.check(
                "its container runs on the guest kernel",
                uname.as_deref().is_ok_and(|u| u == release),
                || format!("{what}: uname -r {uname:?}, guest kernel {release}"),
            );
        } else {
            checks.check("a runc pod boots no VM", qemu.is_empty(), || format!("{what}: {qemu:?}"));
            checks.check("its container runs on the host kernel", uname.as_deref().is_ok_and(|u| u != release), || {
                format!("{what}: uname -r {uname:?}")
            });
        }
        cri.stop_pod_sandbox(&pod_id).expect("StopPodSandbox");
        cri.remove_pod_sandbox(&pod_id).expect("RemovePodSandbox");
        let left = poll(Duration::from_secs(30), || qemu_processes(&pod_id).is_empty().then_some(()));
        checks.check("no QEMU left after RemovePodSandbox", left.is_some(), || {
            format!("{what}: {:?}", qemu_processes(&pod_id))
        });
        checks.check("/run/kata-rs/<pod id> is gone", !sandbox_dir(&pod_id).exists(), || what.clone());
        ids.push(pod_id);
        ids.push(ctr_id);
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let report = containerd.leaks(&id_refs).expect("leak check runs");
    checks.check("the leak finder finds nothing", report.is_empty(), || format!("{report}"));
    let taps = kata_taps_anywhere();
    checks.check("no kata tap left in any namespace", taps.is_empty(), || format!("{taps:?}"));
    drop(cleanup);
    drop(cri);
    check_clean_stop(containerd, &mut checks);
    drop(net);
    checks.finish();
}

#[test]
fn runtimeclass_handler_routes_pods_v2() {
    routes_pods(2, "runtimeclass.toml", &[("kata", false)], &[("", false)]);
}

#[test]
fn runtimeclass_handler_routes_pods_v1() {
    routes_pods(1, "runtimeclass.toml", &[("kata", false)], &[("", false)]);
}

#[test]
fn untrusted_workload_annotation_routes_pods_v2() {
    routes_pods(2, "untrusted.toml", &[("", true)], &[("", false)]);
}

#[test]
fn untrusted_workload_annotation_routes_pods_v1() {
    routes_pods(1, "untrusted.toml", &[("", true)], &[("", false)]);
}

#[test]
fn default_runtime_kata_routes_pods_v2() {
    routes_pods(2, "default.toml", &[("", false)], &[]);
}

/// With `privileged_without_host_devices = true` (the how-to's RuntimeClass setting, used by this file's kata
/// handler) a privileged container is privileged inside the VM but gets none of the host's devices.
#[test]
fn privileged_container_gets_no_host_devices() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let conf = KataConf::write(&parts).expect("kata configuration written");
    let mut net = CniNetwork::create().expect("CNI network config");
    let containerd = start_containerd(&parts, &conf.path, &net, CRI_DEADLINE).expect("containerd with CRI starts");
    import_pod_images(&containerd).expect("images imported");
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();
    let logs = tempfile::tempdir().expect("temp dir");

    let pod = PodSpec { privileged: true, ..PodSpec::new("kata-privileged", logs.path()) };
    let pod_config = pod.build();
    let pod_id = cri
        .run_pod_sandbox(&pod_config, "kata")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail(60)));
    let spec = ContainerSpec { privileged: true, ..ContainerSpec::new("priv", BUSYBOX_IMAGE, &["sleep", "3600"]) };
    let ctr_id = cri
        .create_container(&pod_id, &spec.build(), &pod_config)
        .unwrap_or_else(|e| panic!("CreateContainer privileged: {e}\n{}", containerd.log_tail(60)));
    cri.start_container(&ctr_id).unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", containerd.log_tail(60)));

    // The host's block devices (e.g. vda): with host devices passed, they would appear in the container's /dev.
    let host_disks: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let host_disks: Vec<String> = host_disks.into_iter().filter(|d| Path::new("/dev").join(d).exists()).collect();
    let dev = cri.exec_sync(&ctr_id, &["ls", "/dev"], Duration::from_secs(60));
    checks.check(
        "no host block device in the privileged container's /dev",
        !host_disks.is_empty()
            && dev
                .as_ref()
                .is_ok_and(|o| o.exit_code == 0 && o.stdout.lines().all(|l| !host_disks.contains(&l.to_string()))),
        || format!("host disks {host_disks:?}; container /dev: {dev:?}"),
    );
    // Privileged inside the VM: the full capability set (CAP_SYS_ADMIN among them).
    let caps = cri.exec_sync(&ctr_id, &["sh", "-c", "grep CapEff /proc/self/status"], Duration::from_secs(60));
    checks.check(
        "the container is privileged in the guest (all capabilities)",
        caps.as_ref().is_ok_and(|o| {
            o.stdout
                .split_whitespace()
                .nth(1)
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .is_some_and(|c| c & (1 << 21) != 0)
        }),
        || format!("{caps:?}"),
    );

    let _ = cri.stop_container(&ctr_id, Duration::from_secs(10));
    let _ = cri.remove_container(&ctr_id);
    cri.stop_pod_sandbox(&pod_id).expect("StopPodSandbox");
    cri.remove_pod_sandbox(&pod_id).expect("RemovePodSandbox");
    let report = containerd.leaks(&[&pod_id, &ctr_id]).expect("leak check runs");
    checks
        .check("nothing of the pod left", report.is_empty() && !sandbox_dir(&pod_id).exists(), || format!("{report}"));
    drop(cleanup);
    drop(cri);
    let report = containerd.stop();
    checks.check("containerd shut down with nothing to clean", report.remaining.is_empty(), || format!("{report:?}"));
    net.remove().expect("bridge removed");
    checks.finish();
}
