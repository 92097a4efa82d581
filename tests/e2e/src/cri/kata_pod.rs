//! Kata pods through CRI: what must be installed to run them ([`kata_pod_parts`]), a containerd whose
//! `kata` handler runs them ([`start_containerd`]), one pod VM at a time per test binary ([`vm_lock`]),
//! and what a running pod puts on the host ([`KataPodFootprint`]) so that a test can check that removing
//! the pod takes all of it away.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{cni_skip_reason, CniNetwork, CriClient};
use crate::checks::{step, Checks};
use crate::kata::{sandbox_dir, sandbox_state, KataParts, KATA_RUNTIME};
use crate::leaks::{links, netns_entries, processes, NETNS_DIR};
use crate::{Containerd, ContainerdError, ContainerdOptions, CriOptions};

/// The QEMU the kata configuration of [`KataParts::configuration`] names.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

static VM_LOCK: Mutex<()> = Mutex::new(());

/// One pod VM of a test binary at a time: the machines have two cores and other tests may run VMs too.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    // A test that panicked while holding the lock left nothing shared behind.
    VM_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The kata parts, or why kata pods cannot run here (not root, containerd, CNI plugins, `ip`, `nsenter`
/// or QEMU missing, or a part `scripts/test.sh` exports). Tests start with
/// `let parts = testutil::skip_unless!(kata_pod_parts());`.
pub fn kata_pod_parts() -> Result<KataParts, String> {
    if let Some(reason) = crate::skip_reason().or_else(cni_skip_reason) {
        return Err(reason);
    }
    if crate::find_in_path("nsenter".as_ref()).is_none() {
        return Err("nsenter is not installed (Debian package util-linux)".to_owned());
    }
    if !Path::new(QEMU).is_file() {
        return Err(format!("{QEMU} is missing (Debian package qemu-system-x86)"));
    }
    KataParts::find()
}

/// The `[...containerd.runtimes.kata]` table for containerd's v2 config, pointing at the kata
/// configuration file `conf`.
pub fn kata_handler_config(conf: &Path) -> String {
    format!(
        r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "{KATA_RUNTIME}"
  privileged_without_host_devices = true

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata.options]
  ConfigPath = "{}"
"#,
        conf.display()
    )
}

/// A private containerd with CRI on `net`, the `kata` handler using configuration `conf` and the shim
/// of `parts`; `ctr` calls may take `timeout`.
pub fn start_containerd(
    parts: &KataParts,
    conf: &Path,
    net: &CniNetwork,
    timeout: Duration,
) -> Result<Containerd, ContainerdError> {
    Containerd::start(ContainerdOptions {
        namespace: "k8s.io".to_owned(),
        shim_dir: Some(parts.shim_dir.clone()),
        cri: Some(CriOptions::new(net.conf_dir())),
        extra_config: kata_handler_config(conf),
        ctr_timeout: timeout,
        ..ContainerdOptions::default()
    })
}

/// The guest boot id each container sees (`/proc/sys/kernel/random/boot_id`), or why ExecSync failed: containers
/// in one VM see the same one, which is not the host's.
pub fn boot_ids(cri: &CriClient, ids: &[&str], timeout: Duration) -> Vec<String> {
    ids.iter()
        .map(|id| match cri.exec_sync(id, &["cat", "/proc/sys/kernel/random/boot_id"], timeout) {
            Ok(out) => out.stdout.trim().to_owned(),
            Err(e) => format!("(ExecSync failed: {e})"),
        })
        .collect()
}

/// The PIDs and command lines of live QEMU processes naming `id`.
pub fn qemu_processes(id: &str) -> Vec<(u32, String)> {
    processes(|argv| {
        argv.first().is_some_and(|a| a.rsplit('/').next().unwrap_or(a).starts_with("qemu-system-"))
            && argv.iter().any(|a| a.contains(id))
    })
}

/// The MAC of `eth0` in the network namespace at `netns` (the pod's veth, which CNI made). Asked over
/// netlink with `ip`: /sys would still show the host's namespace.
pub fn veth_mac(netns: &Path) -> Option<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "link", "show", "eth0"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = text.split("link/ether ").nth(1)?;
    after.split_whitespace().next().map(str::to_owned)
}

/// Taps kata-rs made (`tapN_kata`) in the host namespace and in every named one.
pub fn kata_taps_anywhere() -> Vec<String> {
    let mut found = Vec::new();
    let mut spaces: Vec<Option<PathBuf>> = vec![None];
    spaces.extend(netns_entries().into_iter().map(|n| Some(Path::new(NETNS_DIR).join(n))));
    for ns in spaces {
        for link in links(ns.as_deref()).unwrap_or_default() {
            if link.ends_with("_kata") {
                found.push(format!(
                    "{link} in {}",
                    ns.as_deref().map_or("the host namespace".into(), |p| p.display().to_string())
                ));
            }
        }
    }
    found
}

/// What a running kata pod has on the host: its QEMU and its network namespace.
#[derive(Debug, Clone)]
pub struct KataPodFootprint {
    pub pod_id: String,
    /// QEMU processes naming the pod when the footprint was taken.
    pub qemu: Vec<(u32, String)>,
    /// The pod's network namespace (from the sandbox state, else the one new entry of [`NETNS_DIR`]).
    pub netns: Option<PathBuf>,
    netns_before: BTreeSet<String>,
}

impl KataPodFootprint {
    /// Takes the footprint of the running pod `pod_id`; `netns_before` are the [`netns_entries`] from
    /// before `RunPodSandbox`.
    pub fn take(pod_id: &str, netns_before: BTreeSet<String>) -> Self {
        let netns =
            sandbox_state(pod_id).and_then(|s| s["netns"].as_str().map(PathBuf::from)).or_else(
                || match netns_entries().difference(&netns_before).collect::<Vec<_>>()[..] {
                    [one] => Some(Path::new(NETNS_DIR).join(one)),
                    _ => None,
                },
            );
        Self { pod_id: pod_id.to_owned(), qemu: qemu_processes(pod_id), netns, netns_before }
    }

    /// Stops and removes `containers` and then the pod through CRI, and checks that nothing of the pod is
    /// left: no QEMU, helper daemon or shim process, nothing the leak finder finds, no sandbox directory,
    /// network namespace or kata tap.
    pub fn remove_and_check(&self, cri: &CriClient, containerd: &Containerd, containers: &[&str], checks: &mut Checks) {
        let pod_id = self.pod_id.as_str();
        // QEMU and its helpers, as the sandbox persisted them (plus the QEMU seen before, in case it did not).
        let vm_pids: BTreeSet<u32> = sandbox_state(pod_id)
            .and_then(|s| s["processes"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
            .chain(self.qemu.iter().map(|(pid, _)| *pid))
            .collect();
        let shims = processes(|argv| {
            argv[0].ends_with("containerd-shim-kata-v2") && argv.windows(2).any(|w| w[0] == "-id" && w[1] == pod_id)
        });
        eprintln!("VM processes {vm_pids:?}, shims {shims:?}");
        for id in containers {
            let stopped = cri.stop_container(id, Duration::from_secs(10));
            checks.check("StopContainer", stopped.is_ok(), || format!("{id}: {stopped:?}"));
            let removed = cri.remove_container(id);
            checks.check("RemoveContainer", removed.is_ok(), || format!("{id}: {removed:?}"));
        }
        step("StopPodSandbox", || {
            cri.stop_pod_sandbox(pod_id).unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", containerd.log_tail(60)))
        });
        step("RemovePodSandbox", || {
            cri.remove_pod_sandbox(pod_id)
                .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", containerd.log_tail(60)))
        });

        let left = qemu_processes(pod_id);
        checks.check("no QEMU of the pod left", left.is_empty(), || format!("{left:?}"));
        let all_pids: Vec<u32> = vm_pids.iter().copied().chain(shims.iter().map(|(pid, _)| *pid)).collect();
        let alive = crate::process::wait_gone(&all_pids, Duration::from_secs(30));
        checks.check("no QEMU/virtiofsd/vhost-device-vsock/shim process of the pod left", alive.is_empty(), || {
            format!("still alive: {alive:?}")
        });
        let ids: Vec<&str> = std::iter::once(pod_id).chain(containers.iter().copied()).collect();
        let report = containerd.leaks_with_pids(&ids, &all_pids);
        checks.check(
            "the leak finder finds nothing (processes, mounts, state)",
            report.as_ref().is_ok_and(|r| r.is_empty()),
            || match &report {
                Ok(r) => r.to_string(),
                Err(e) => format!("the leak check failed: {e}"),
            },
        );
        checks.check("/run/kata-rs/<pod id> is gone", !sandbox_dir(pod_id).exists(), || {
            format!("{} left", sandbox_dir(pod_id).display())
        });
        let new_netns: Vec<String> = netns_entries().difference(&self.netns_before).cloned().collect();
        checks.check(
            "no network namespace left",
            new_netns.is_empty() && !self.netns.as_deref().is_some_and(Path::exists),
            || format!("new entries {new_netns:?}; pod netns {:?}", self.netns),
        );
        let taps = kata_taps_anywhere();
        checks.check("no kata tap left in any namespace", taps.is_empty(), || format!("{taps:?}"));
    }
}
