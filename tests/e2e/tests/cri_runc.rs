//! Proves the CRI client (streaming Exec and Attach too) and the test CNI network with containerd's runc
//! handler, so that the kata CRI tests only swap the handler. Needs root, the Debian containerd, runc,
//! busybox-static and containernetworking-plugins packages and `ip`; skips with a reason otherwise.
//!
//! Network safety: the only traffic sent goes from the host to the pod's address on the test's own
//! bridge; the pod's DNS server is its own loopback.

use std::time::{Duration, Instant};

use e2e::checks::{step, Checks};
use e2e::cri::{
    attach_target, check_attach, check_exec_streams, check_port_forward, cni_skip_reason, http_get, import_pod_images,
    parse_cri_log, port_forward_target, CniNetwork, CriClient, PodCleanup, PodSpec, WebVolumes,
};
use e2e::leaks::netns_entries;
use e2e::{skip_reason, Containerd, ContainerdOptions, CriOptions, BUSYBOX_IMAGE};
use k8s_cri::v1::{ContainerState, LinuxContainerResources};

const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn pod_with_http_server_exec_logs_stats_and_volumes() {
    testutil::skip_unless!(skip_reason().or_else(cni_skip_reason));
    let mut net = CniNetwork::create().expect("CNI network config");
    eprintln!("bridge {} subnet {}", net.bridge(), net.subnet());
    let containerd = step("containerd with CRI ready", || {
        Containerd::start(ContainerdOptions {
            namespace: "k8s.io".to_owned(),
            cri: Some(CriOptions::new(net.conf_dir())),
            ..ContainerdOptions::default()
        })
        .expect("containerd with CRI starts")
    });
    let config = std::fs::read_to_string(containerd.config_path()).expect("config");
    assert!(
        config.contains("restrict_oom_score_adj = true"),
        "CAP_SYS_RESOURCE is dropped here: the CRI config needs restrict_oom_score_adj"
    );
    step("busybox and pause images built and imported", || import_pod_images(&containerd).expect("images imported"));
    let cri = CriClient::connect(containerd.address()).expect("CRI client connects");
    let cleanup = PodCleanup(&cri);
    let version = cri.version().expect("CRI Version");
    eprintln!("CRI: {} {} API {}", version.runtime_name, version.runtime_version, version.runtime_api_version);
    assert_eq!(version.runtime_api_version, "v1");
    let images = cri.list_images().expect("ListImages");
    assert!(images.iter().any(|i| i == BUSYBOX_IMAGE), "{images:?}");

    // Host side: a document to serve, a read-only and a read-write volume, the pod's log directory.
    let volumes = WebVolumes::create("runc").expect("host volumes");
    let WebVolumes { ro, rw, logs, page, .. } = &volumes;

    let netns_before = netns_entries();
    let pod = PodSpec::new("web", logs);
    let pod_config = pod.build();
    let pod_id = step("RunPodSandbox (runc)", || cri.run_pod_sandbox(&pod_config, "runc").expect("RunPodSandbox"));
    let ip = cri.pod_ip(&pod_id).expect("pod IP");
    eprintln!("pod {pod_id} has IP {ip}");
    assert!(net.contains(ip), "{ip} is not in {}", net.subnet());
    assert!(net.bridge_exists(), "bridge {} was not created", net.bridge());

    let spec = volumes.httpd();
    let ctr_id =
        step("CreateContainer", || cri.create_container(&pod_id, &spec.build(), &pod_config).expect("CreateContainer"));
    step("StartContainer", || cri.start_container(&ctr_id).expect("StartContainer"));
    let status = cri.container_status(&ctr_id).expect("ContainerStatus");
    assert_eq!(status.state, ContainerState::ContainerRunning as i32, "{status:?}");

    // The server answers on the pod's address, from the host.
    let response = step("first HTTP answer from the pod", || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match http_get(ip, 8080, "/index.html") {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("no HTTP answer from {ip}:8080 within 15 s: {e}"),
            }
        }
    });
    let status_line = response.lines().next().unwrap_or_default();
    assert!(status_line.starts_with("HTTP/1.") && status_line.contains(" 200 "), "{response}");
    assert!(response.ends_with(page.as_str()), "{response}");

    let out = step("ExecSync echo hi", || cri.exec_sync(&ctr_id, &["echo", "hi"], EXEC_TIMEOUT).expect("ExecSync"));
    assert_eq!((out.stdout.as_str(), out.exit_code), ("hi\n", 0), "{out:?}");
    let out = cri.exec_sync(&ctr_id, &["sh", "-c", "echo err >&2; exit 3"], EXEC_TIMEOUT).expect("ExecSync exit 3");
    assert_eq!(out.exit_code, 3, "{out:?}");
    assert_eq!(out.stderr, "err\n");
    let out = cri.exec_sync(&ctr_id, &["hostname"], EXEC_TIMEOUT).expect("ExecSync hostname");
    assert_eq!(out.stdout.trim(), pod.hostname);
    let out = cri.exec_sync(&ctr_id, &["cat", "/etc/resolv.conf"], EXEC_TIMEOUT).expect("ExecSync resolv.conf");
    assert!(out.stdout.contains("nameserver 127.0.0.1") && out.stdout.contains("search kata-e2e.test"), "{out:?}");

    // The CRI log file, in the CRI format, has both streams.
    let log_path = logs.join(&spec.log_path);
    let lines = step("log lines present", || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines = parse_cri_log(&text);
            if lines.len() >= 2 || Instant::now() >= deadline {
                break lines;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert!(lines.iter().any(|l| l.stream == "stdout" && l.text == "started-web"), "{lines:?}");
    assert!(lines.iter().any(|l| l.stream == "stderr" && l.text == "to-stderr"), "{lines:?}");

    // Stats.
    let stats = cri.container_stats(&ctr_id).expect("ContainerStats");
    let cpu = stats.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map_or(0, |v| v.value);
    let memory = stats.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value);
    eprintln!("stats: cpu {cpu} ns, working set {memory} bytes");
    assert!(cpu > 0 && memory > 0, "{stats:?}");
    let all = cri.list_container_stats(Some(&pod_id)).expect("ListContainerStats");
    assert!(all.iter().any(|s| s.attributes.as_ref().is_some_and(|a| a.id == ctr_id)), "{all:?}");

    // UpdateContainerResources reaches the container's cgroup (v1 or v2 layout).
    let limit: i64 = 96 * 1024 * 1024;
    cri.update_container_resources(
        &ctr_id,
        &LinuxContainerResources { memory_limit_in_bytes: limit, ..Default::default() },
    )
    .expect("UpdateContainerResources");
    let out = cri
        .exec_sync(
            &ctr_id,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
            ],
            EXEC_TIMEOUT,
        )
        .expect("ExecSync memory limit");
    assert_eq!(out.stdout.trim(), limit.to_string(), "{out:?}");

    // Volumes: read-only is readable and not writable; read-write round-trips.
    let out = cri.exec_sync(&ctr_id, &["cat", "/ro/file"], EXEC_TIMEOUT).expect("ExecSync cat /ro/file");
    assert_eq!(out.stdout, "read-only content\n");
    let out = cri.exec_sync(&ctr_id, &["sh", "-c", "echo x > /ro/new"], EXEC_TIMEOUT).expect("ExecSync write /ro");
    assert_ne!(out.exit_code, 0, "write to a read-only volume succeeded");
    assert!(out.stderr.contains("Read-only file system"), "{out:?}");
    assert!(!ro.join("new").exists());
    let out = cri
        .exec_sync(&ctr_id, &["sh", "-c", "cat /rw/in && echo from-container > /rw/out"], EXEC_TIMEOUT)
        .expect("ExecSync rw");
    assert_eq!((out.stdout.as_str(), out.exit_code), ("from-host\n", 0), "{out:?}");
    assert_eq!(std::fs::read_to_string(rw.join("out")).expect("read rw/out"), "from-container\n");

    // Streaming Exec and Attach (crictl exec -it, crictl attach) through containerd's streaming server.
    let attach_ids: Vec<String> = [("attach", false), ("attach-tty", true)]
        .iter()
        .map(|&(name, tty)| {
            let spec = attach_target(name, BUSYBOX_IMAGE, tty);
            let id = cri.create_container(&pod_id, &spec.build(), &pod_config).expect("CreateContainer attach target");
            cri.start_container(&id).expect("StartContainer attach target");
            id
        })
        .collect();
    let (attach_id, attach_tty_id) = (&attach_ids[0], &attach_ids[1]);
    let mut checks = Checks::default();
    step("streaming Exec and Attach", || {
        check_exec_streams(&cri, &ctr_id, EXEC_TIMEOUT, &mut checks);
        check_attach(&cri, attach_id, false, EXEC_TIMEOUT, &mut checks);
        check_attach(&cri, attach_tty_id, true, EXEC_TIMEOUT, &mut checks);
    });

    // Port-forward (kubectl port-forward) through the streaming server, into the pod's network namespace.
    let echo = port_forward_target("echo", BUSYBOX_IMAGE);
    let echo_id = cri.create_container(&pod_id, &echo.build(), &pod_config).expect("CreateContainer echo");
    cri.start_container(&echo_id).expect("StartContainer echo");
    step("PortForward", || check_port_forward(&cri, &pod_id, EXEC_TIMEOUT, &mut checks));
    checks.finish();
    for id in [attach_id, attach_tty_id, &echo_id] {
        cri.remove_container(id).expect("RemoveContainer");
    }

    // Teardown through CRI.
    step("StopContainer", || cri.stop_container(&ctr_id, Duration::from_secs(5)).expect("StopContainer"));
    let status = cri.container_status(&ctr_id).expect("ContainerStatus");
    assert_eq!(status.state, ContainerState::ContainerExited as i32, "{status:?}");
    step("RemoveContainer", || cri.remove_container(&ctr_id).expect("RemoveContainer"));
    step("StopPodSandbox", || cri.stop_pod_sandbox(&pod_id).expect("StopPodSandbox"));
    step("RemovePodSandbox", || cri.remove_pod_sandbox(&pod_id).expect("RemovePodSandbox"));
    assert!(http_get(ip, 8080, "/").is_err(), "the pod still answers after removal");

    let report = containerd.leaks(&[&pod_id, &ctr_id, attach_id, attach_tty_id, &echo_id]).expect("leak check runs");
    assert!(report.is_empty(), "leaked:\n{report}");
    let new_netns: Vec<String> = netns_entries().difference(&netns_before).cloned().collect();
    assert!(new_netns.is_empty(), "network namespaces left: {new_netns:?}");
    let nat = std::process::Command::new("iptables").args(["-t", "nat", "-S"]).output();
    match nat {
        Ok(o) if o.status.success() => {
            let rules = String::from_utf8_lossy(&o.stdout);
            let ours: Vec<&str> = rules.lines().filter(|l| l.contains(&format!("{ip}/32"))).collect();
            assert!(ours.is_empty(), "ipMasq rules left: {ours:?}");
        }
        other => eprintln!("not checking ipMasq rules: iptables -t nat -S failed: {other:?}"),
    }

    drop(cleanup);
    drop(cri);
    let report = step("containerd stopped", || containerd.stop());
    assert!(report.removed_containers.is_empty(), "{report:?}");
    assert!(report.killed_processes.is_empty(), "{report:?}");
    assert!(report.remaining.is_empty(), "left:\n{}", report.remaining);

    net.remove().expect("bridge removed");
    assert!(!net.bridge_exists(), "bridge {} is still there", net.bridge());
}
