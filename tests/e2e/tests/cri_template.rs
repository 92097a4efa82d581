//! A Kubernetes pod with a network, cloned from a VM template (`[factory] enable_template = true`): the clone
//! gets the pod's tap behind the template's NIC, the agent gives that NIC the pod's MAC, and the pod's IP
//! answers from the host. Nothing is left after the pod is removed.
//!
//! Needs what `cri_kata.rs` needs; skips with the reason otherwise. Network safety as there: the only
//! traffic goes from the host to the pod's address on the test's own bridge.

use std::time::Duration;

use e2e::checks::{check_clean_stop, poll, step, Checks};
use e2e::cri::{
    http_get, import_pod_images, start_containerd, veth_mac, vm_lock, CniNetwork, CriClient, KataPodFootprint,
    PodCleanup, PodSpec, WebVolumes,
};
use e2e::leaks::{netns_entries, processes};

const CRI_DEADLINE: Duration = Duration::from_secs(90);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_pod_with_a_network_is_a_clone_with_its_own_mac() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let templates = dir.path().join("templates");
    let conf = dir.path().join("configuration.toml");
    let text = parts.configuration("").replace("shared_fs = \"virtio-fs\"", "shared_fs = \"virtio-9p\"")
        + &format!("[factory]\nenable_template = true\ntemplate_path = \"{}\"\n", templates.display());
    std::fs::write(&conf, text).expect("configuration written");
    let mut net = CniNetwork::create().expect("CNI network config");
    let containerd = step("containerd with CRI and the kata handler (templating on)", || {
        start_containerd(&parts, &conf, &net, CRI_DEADLINE).expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();
    let volumes = WebVolumes::create("kata-template").expect("host volumes");

    let netns_before = netns_entries();
    let pod = PodSpec::new("kata-clone", &volumes.logs);
    let pod_config = pod.build();
    let pod_id = step("RunPodSandbox (kata, templating on)", || {
        cri.run_pod_sandbox(&pod_config, "kata")
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail(60)))
    });
    let footprint = KataPodFootprint::take(&pod_id, netns_before);
    let cmdline = footprint.qemu.first().map(|(_, c)| c.clone()).unwrap_or_default();
    checks.check("the pod's VM is a clone of the template", cmdline.contains("-incoming defer"), || cmdline.clone());
    let template_vms =
        processes(|argv| argv.iter().any(|a| a.contains(&templates.display().to_string()) && a.contains("share=on")));
    checks.check("the template VM is gone once saved", template_vms.is_empty(), || format!("{template_vms:?}"));

    let server = volumes.httpd();
    let server_id = step("CreateContainer + StartContainer httpd", || {
        let id = cri
            .create_container(&pod_id, &server.build(), &pod_config)
            .unwrap_or_else(|e| panic!("CreateContainer httpd: {e}\n{}", containerd.log_tail(60)));
        cri.start_container(&id).unwrap_or_else(|e| panic!("StartContainer httpd: {e}\n{}", containerd.log_tail(60)));
        id
    });

    let guest_mac = cri.exec_sync(&server_id, &["cat", "/sys/class/net/eth0/address"], EXEC_TIMEOUT);
    let pod_mac = footprint.netns.as_deref().and_then(veth_mac);
    checks.check(
        "the clone's NIC has the pod's MAC, not the template's",
        matches!((&guest_mac, &pod_mac), (Ok(g), Some(p)) if g.stdout.trim() == p && p != runtime::factory::TEMPLATE_NIC_MAC),
        || format!("guest {guest_mac:?}, pod veth {pod_mac:?}"),
    );

    let ip = cri.pod_ip(&pod_id);
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
            "TCP from the host to the pod IP reaches httpd in the clone",
            response.as_ref().is_some_and(|r| r.starts_with("HTTP/1.") && r.ends_with(volumes.page.as_str())),
            || format!("{ip}:8080: {response:?}, last error: {last}"),
        );
    } else {
        checks.check("PodSandboxStatus has an IP", false, || format!("{ip:?}"));
    }

    footprint.remove_and_check(&cri, &containerd, &[&server_id], &mut checks);
    drop(cleanup);
    drop(cri);
    check_clean_stop(containerd, &mut checks);
    net.remove().expect("bridge removed");
    checks.finish();
}
