//! Kata pods on a real kubelet (issue #17): a single-node Kubernetes v1.20.2 cluster (etcd, API server,
//! controller manager, scheduler, kubelet) on a private containerd whose `kata` handler runs kata-rs. Every
//! check runs for a `runtimeClassName: kata` pod and, as the baseline, for a runc pod: logs (the guest kernel
//! for kata), `kubectl exec` exit codes and `-i` with immediate end of input (20 times), `kubectl logs -f`,
//! `kubectl port-forward`, configMap/secret/emptyDir and service-account volumes, a restart after a crash
//! (in the same VM for kata), a pod with limits sized per #14, the RuntimeClass overhead, and a deleted pod
//! leaving no VM, helper, mount, tap, network namespace or cgroup.
//!
//! Needs what `cri_kata.rs` needs, plus the Kubernetes binaries (`KATA_TEST_K8S_BIN`, built by
//! `scripts/build-kubernetes.sh`), etcd and openssl; skips with the reason otherwise. Network safety: every
//! component listens on 127.0.0.1; the pods' network is the test's own bridge; pods resolve names with their
//! own loopback; port-forward traffic stays on loopback.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::checks::{check_clean_stop, step, Checks};
use e2e::cri::{
    import_pod_images, kata_taps_anywhere, qemu_processes, start_containerd, vm_lock, CniNetwork, CriClient, PodCleanup,
};
use e2e::kata::sandbox_dir;
use e2e::kubernetes::{kube_bin, Cluster};
use e2e::leaks::netns_entries;
use e2e::process::{kill_and_reap, wait_until};
use e2e::BUSYBOX_IMAGE;

const POD_TIMEOUT: Duration = Duration::from_secs(240);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
const CRI_DEADLINE: Duration = Duration::from_secs(90);
const MIB: u64 = 1024 * 1024;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One runtime under test: its RuntimeClass (none for runc, the default handler) and the kernel its pods see.
struct Runtime {
    name: &'static str,
    class: Option<&'static str>,
    kernel: String,
}

impl Runtime {
    fn class_line(&self) -> String {
        self.class.map(|c| format!("  runtimeClassName: {c}\n")).unwrap_or_default()
    }
}

/// The main pod: a web server, a ticking log, and configMap, secret and emptyDir volumes.
fn main_pod(rt: &Runtime) -> String {
    let name = rt.name;
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}-cm
data:
  greeting: hello-{name}
---
apiVersion: v1
kind: Secret
metadata:
  name: {name}-sec
stringData:
  token: s3cret-{name}
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}-main
  labels: {{rt: {name}}}
spec:
{class}  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["sh", "-c", "uname -r; mkdir -p /tmp/www; echo page-{name} > /tmp/www/index.html; httpd -p 8080 -h /tmp/www; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done"]
    volumeMounts:
    - {{name: cm, mountPath: /cm}}
    - {{name: sec, mountPath: /sec}}
    - {{name: scratch, mountPath: /scratch}}
  volumes:
  - name: cm
    configMap: {{name: {name}-cm}}
  - name: sec
    secret: {{secretName: {name}-sec}}
  - name: scratch
    emptyDir: {{}}
"#,
        class = rt.class_line()
    )
}

fn simple_pod(rt: &Runtime, suffix: &str, command: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}-{suffix}
  labels: {{rt: {name}}}
spec:
{class}  terminationGracePeriodSeconds: 2
  restartPolicy: Always
  containers:
  - name: c
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["sh", "-c", "{command}"]
{extra}"#,
        name = rt.name,
        class = rt.class_line()
    )
}

/// `kubectl exec -i POD -- cat` with `input` on stdin, closed at once: (exit code, stdout).
fn exec_stdin(cluster: &Cluster, pod: &str, input: &[u8]) -> Result<(Option<i32>, String), String> {
    let mut child = cluster
        .kubectl_command(&["exec", "-i", pod, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child.stdin.take().expect("stdin").write_all(input).map_err(|e| e.to_string())?;
    let status = wait_until(&mut child, Instant::now() + EXEC_TIMEOUT).map_err(|e| e.to_string())?;
    let Some(status) = status else {
        kill_and_reap(&mut child);
        return Err(format!("kubectl exec -i did not end within {EXEC_TIMEOUT:?}"));
    };
    let mut out = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok((status.code(), out))
}

/// Lines a long-running `kubectl` prints, as they come.
fn stream_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn recv_until(rx: &mpsc::Receiver<String>, timeout: Duration, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let finished = done(&line);
                seen.push(line);
                if finished {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    seen
}

/// The CRI sandbox of the Kubernetes pod with `uid`.
fn sandbox_of(cri: &CriClient, uid: &str) -> Option<String> {
    cri.list_pod_sandboxes()
        .ok()?
        .into_iter()
        .find(|id| cri.pod_sandbox_status(id).is_ok_and(|s| s.metadata.as_ref().is_some_and(|m| m.uid == uid)))
}

/// Host cgroup directories named `name` anywhere under the kubelet's and kata's trees.
fn cgroups_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                found.push(e.path());
            } else if depth < 4 {
                walk(&e.path(), name, depth + 1, found);
            }
        }
    }
    let mut found = Vec::new();
    for top in ["kubepods", "kata_overhead"] {
        let mut roots = vec![Path::new("/sys/fs/cgroup").join(top)];
        if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup") {
            roots.extend(d.flatten().map(|e| e.path().join(top)));
        }
        for root in roots {
            walk(&root, name, 0, &mut found);
        }
    }
    found
}

fn exec_ok(cluster: &Cluster, pod: &str, cmd: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    let out = cluster.kubectl(&args)?;
    if out.status.success() {
        return Ok(text(&out.stdout));
    }
    Err(format!("exit {:?}: {}", out.status.code(), text(&out.stderr)))
}

fn check_main_pod(cluster: &Cluster, rt: &Runtime, checks: &mut Checks) {
    let pod = format!("{}-main", rt.name);
    let logs = cluster.kubectl(&["logs", &pod]).map(|o| text(&o.stdout)).unwrap_or_default();
    checks.check(
        "kubectl logs starts with the kernel the pod runs on",
        logs.lines().next() == Some(&rt.kernel),
        || format!("{}: expected {}, logs {:?}", rt.name, rt.kernel, logs.lines().take(3).collect::<Vec<_>>()),
    );

    let out = cluster.kubectl(&["exec", &pod, "--", "sh", "-c", "echo err >&2; exit 3"]);
    checks.check(
        "kubectl exec passes the exit code (3)",
        out.as_ref().is_ok_and(|o| o.status.code() == Some(3)),
        || format!("{}: {out:?}", rt.name),
    );

    let mut failures = Vec::new();
    for i in 0..20 {
        let input = format!("line {i}\n");
        match exec_stdin(cluster, &pod, input.as_bytes()) {
            Ok((Some(0), out)) if out == input => {}
            other => failures.push(format!("run {i}: {other:?}")),
        }
    }
    checks.check("kubectl exec -i with immediate end of input, 20 times", failures.is_empty(), || {
        format!("{}: {failures:?}", rt.name)
    });

    // logs -f: after what `kubectl logs` showed, new lines keep coming.
    let shown = cluster.kubectl(&["logs", &pod]).map(|o| text(&o.stdout)).unwrap_or_default();
    let last_tick = shown.lines().filter_map(|l| l.strip_prefix("tick ")?.parse::<u64>().ok()).max().unwrap_or(0);
    let mut follow = cluster
        .kubectl_command(&["logs", "-f", &pod])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("logs -f");
    let rx = stream_lines(&mut follow);
    let seen = recv_until(&rx, Duration::from_secs(30), |l| {
        l.strip_prefix("tick ").and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > last_tick + 2)
    });
    kill_and_reap(&mut follow);
    let newest = seen.iter().filter_map(|l| l.strip_prefix("tick ")?.parse::<u64>().ok()).max();
    checks.check("kubectl logs -f follows new lines", newest.is_some_and(|n| n > last_tick + 2), || {
        format!(
            "{}: last shown tick {last_tick}, followed {:?}",
            rt.name,
            seen.iter().rev().take(3).collect::<Vec<_>>()
        )
    });

    // port-forward: loopback on the host to the pod's port 8080.
    let port = e2e::kubernetes::free_port();
    let mut forward = cluster
        .kubectl_command(&["port-forward", "--address", "127.0.0.1", &format!("pod/{pod}"), &format!("{port}:8080")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl port-forward");
    let rx = stream_lines(&mut forward);
    let ready = recv_until(&rx, Duration::from_secs(30), |l| l.starts_with("Forwarding from"));
    let page = e2e::cri::http_get(std::net::Ipv4Addr::LOCALHOST, port, "/index.html");
    kill_and_reap(&mut forward);
    checks.check(
        "kubectl port-forward reaches the pod's web server",
        page.as_ref().is_ok_and(|p| p.trim_end().ends_with(&format!("page-{}", rt.name))),
        || format!("{}: {ready:?} then {page:?}", rt.name),
    );

    let volumes = exec_ok(
        cluster,
        &pod,
        &["sh", "-c", "cat /cm/greeting; echo; cat /sec/token; echo; echo x > /scratch/f && cat /scratch/f"],
    );
    checks.check(
        "configMap, secret and emptyDir volumes",
        volumes.as_deref() == Ok(format!("hello-{0}\ns3cret-{0}\nx\n", rt.name).as_str()),
        || format!("{}: {volumes:?}", rt.name),
    );
    let token =
        exec_ok(cluster, &pod, &["sh", "-c", "test -s /var/run/secrets/kubernetes.io/serviceaccount/token && echo ok"]);
    checks.check("the service-account token is mounted", token.as_deref() == Ok("ok\n"), || {
        format!("{}: {token:?}", rt.name)
    });
}

/// The pod's memory limit as its container sees it (cgroup v2 in the guest, v1 or v2 on the host).
const MEMORY_LIMIT: &str =
    "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes";

fn check_limits_pod(cluster: &Cluster, rt: &Runtime, checks: &mut Checks) {
    let pod = format!("{}-limits", rt.name);
    let limit = exec_ok(cluster, &pod, &["sh", "-c", MEMORY_LIMIT]);
    checks.check(
        "the container's memory limit is its 512Mi",
        limit.as_deref().map(str::trim) == Ok("536870912"),
        || format!("{}: {limit:?}", rt.name),
    );
    let overhead = cluster.pod_field(&pod, "{.spec.overhead.memory}");
    let want = if rt.class.is_some() { "160Mi" } else { "" };
    checks.check("the RuntimeClass overhead is on the pod (kata only)", overhead == want, || {
        format!("{}: overhead {overhead:?}, want {want:?}", rt.name)
    });
    if rt.class.is_some() {
        let meminfo = exec_ok(cluster, &pod, &["head", "-n", "1", "/proc/meminfo"]);
        let kib: u64 =
            meminfo.as_deref().unwrap_or("").split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        checks.check("the kata pod's VM is sized for its 512Mi limit", kib * 1024 >= 512 * MIB, || {
            format!("{meminfo:?}")
        });
    }
}

fn check_restart(cluster: &Cluster, cri: &CriClient, rt: &Runtime, checks: &mut Checks) {
    let pod = format!("{}-crash", rt.name);
    let uid = cluster.pod_field(&pod, "{.metadata.uid}");
    let sandbox = sandbox_of(cri, &uid);
    let vm_before = sandbox.as_deref().map(qemu_processes).unwrap_or_default();
    let deadline = Instant::now() + POD_TIMEOUT;
    let mut restarts = 0;
    while Instant::now() < deadline && restarts < 1 {
        restarts = cluster.pod_field(&pod, "{.status.containerStatuses[0].restartCount}").parse().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(500));
    }
    checks.check("a crashed container is restarted (restartPolicy Always)", restarts >= 1, || {
        format!("{}: restartCount {restarts}", rt.name)
    });
    if rt.class.is_some() {
        let vm_after = sandbox.as_deref().map(qemu_processes).unwrap_or_default();
        checks.check(
            "the restarted container runs in the pod's same VM",
            !vm_before.is_empty() && vm_before == vm_after,
            || format!("sandbox {sandbox:?}: before {vm_before:?}, after {vm_after:?}"),
        );
    }
}

/// Deletes the runtime's pods; checks nothing of them is left on the host.
fn delete_and_check(
    cluster: &Cluster,
    cri: &CriClient,
    rt: &Runtime,
    netns_before: &BTreeSet<String>,
    checks: &mut Checks,
) {
    let pods: Vec<String> = cluster
        .kubectl_ok(&["get", "pods", "-l", &format!("rt={}", rt.name), "-o", "jsonpath={.items[*].metadata.uid}"])
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let sandboxes: Vec<String> = pods.iter().filter_map(|uid| sandbox_of(cri, uid)).collect();
    let vm_pids: Vec<u32> = sandboxes.iter().flat_map(|s| qemu_processes(s)).map(|(pid, _)| pid).collect();
    let deleted =
        cluster.kubectl(&["delete", "pods", "-l", &format!("rt={}", rt.name), "--wait=true", "--timeout=180s"]);
    checks.check("kubectl delete pods", deleted.as_ref().is_ok_and(|o| o.status.success()), || {
        format!("{}: {deleted:?}", rt.name)
    });
    // The kubelet removes the sandbox after the API object is gone: wait for CRI to forget it.
    let deadline = Instant::now() + POD_TIMEOUT;
    while Instant::now() < deadline && sandboxes.iter().any(|s| cri.pod_sandbox_status(s).is_ok()) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let alive = e2e::process::wait_gone(&vm_pids, Duration::from_secs(60));
    checks.check("no QEMU or helper of a deleted pod is left", alive.is_empty(), || format!("{}: {alive:?}", rt.name));
    let dirs: Vec<PathBuf> = sandboxes.iter().map(|s| sandbox_dir(s)).filter(|d| d.exists()).collect();
    checks.check("no sandbox directory is left", dirs.is_empty(), || format!("{dirs:?}"));
    // The kubelet removes a pod's cgroups in its housekeeping, a little after the pod is gone. On a hybrid host
    // runc also makes the pod's directories in the `unified` v2 hierarchy, which the kubelet (v1 only) never
    // removes: that is runc's and the kubelet's leak, not the pod's, and the cluster's stop removes them.
    let baseline_leak = |p: &PathBuf| rt.class.is_none() && p.starts_with("/sys/fs/cgroup/unified");
    let pod_cgroups = || -> Vec<PathBuf> {
        pods.iter()
            .flat_map(|uid| cgroups_named(&format!("pod{uid}")))
            .chain(sandboxes.iter().flat_map(|s| cgroups_named(s)))
            .filter(|p| !baseline_leak(p))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline && !pod_cgroups().is_empty() {
        std::thread::sleep(Duration::from_secs(1));
    }
    let cgroups = pod_cgroups();
    checks.check("no cgroup of a deleted pod is left", cgroups.is_empty(), || format!("{}: {cgroups:?}", rt.name));
    let taps = kata_taps_anywhere();
    checks.check("no kata tap is left", taps.is_empty(), || format!("{taps:?}"));
    let netns: Vec<String> = netns_entries().difference(netns_before).cloned().collect();
    checks.check("no network namespace is left", netns.is_empty(), || format!("{}: {netns:?}", rt.name));
}

/// Stops the cluster, then the pods CRI still has and containerd; checks that nothing of them is left.
fn finish(mut cluster: Cluster, cleanup: PodCleanup, containerd: e2e::Containerd, mut checks: Checks) {
    step("cluster stopped", || cluster.stop());
    let left = cluster.leftovers();
    checks.check("the cluster leaves no kubepods cgroup or kubelet directory", left.is_empty(), || format!("{left:?}"));
    drop(cluster);
    drop(cleanup);
    check_clean_stop(containerd, &mut checks);
    checks.finish();
}

#[test]
fn kata_pods_on_a_real_kubelet_behave_as_runc_pods() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let bin = testutil::skip_unless!(kube_bin());
    let release = parts.kernel_release().expect("kernel has a version banner");
    let host_kernel =
        text(&std::process::Command::new("uname").arg("-r").output().expect("uname").stdout).trim().to_owned();
    let _vm = vm_lock();
    // q35: a kubelet before 1.27 tells containerd nothing of the pod's size when the sandbox starts, so the VM
    // grows (CPU and memory hotplug) as the containers with limits are created; microvm cannot.
    let conf_dir = tempfile::tempdir().expect("temp dir");
    let conf = conf_dir.path().join("configuration.toml");
    let q35 = parts.configuration("").replace("machine_type = \"microvm\"", "machine_type = \"q35\"");
    std::fs::write(&conf, q35).expect("write the kata configuration");
    let net = CniNetwork::create().expect("CNI network config");
    let containerd = step("containerd with CRI and the kata handler", || {
        start_containerd(&parts, &conf, &net, POD_TIMEOUT).expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();
    let netns_before = netns_entries();

    let cluster = step("Kubernetes cluster (etcd, API server, controller manager, scheduler, kubelet)", || {
        Cluster::start(&bin, containerd.address()).unwrap_or_else(|e| panic!("the cluster starts: {e}"))
    });
    let runtimeclass = testutil::package_dir().join("../../config/kubernetes/runtimeclass.yaml");
    cluster.apply(&std::fs::read_to_string(runtimeclass).expect("runtimeclass.yaml")).expect("RuntimeClass kata");

    let runtimes = [
        Runtime { name: "runc", class: None, kernel: host_kernel },
        Runtime { name: "kata", class: Some("kata"), kernel: release },
    ];
    let limits =
        "    resources:\n      requests: {memory: 64Mi, cpu: 100m}\n      limits: {memory: 512Mi, cpu: \"1\"}\n";
    for rt in &runtimes {
        eprintln!("== {} pods", rt.name);
        let yaml = [
            main_pod(rt),
            simple_pod(rt, "crash", "echo run; sleep 2; exit 1", ""),
            simple_pod(rt, "limits", "sleep 3600", limits),
        ]
        .join("---\n");
        cluster.apply(&yaml).unwrap_or_else(|e| panic!("{e}"));
        for pod in ["main", "limits"] {
            let name = format!("{}-{pod}", rt.name);
            step(&format!("pod {name} running"), || {
                cluster.wait_pod_phase(&name, "Running", POD_TIMEOUT).unwrap_or_else(|e| {
                    panic!(
                        "{e}\nkubelet:\n{}\ncontainerd:\n{}",
                        cluster.log_tail("kubelet", 30),
                        containerd.log_tail(30)
                    )
                })
            });
        }
        check_main_pod(&cluster, rt, &mut checks);
        check_limits_pod(&cluster, rt, &mut checks);
        check_restart(&cluster, &cri, rt, &mut checks);
        delete_and_check(&cluster, &cri, rt, &netns_before, &mut checks);
    }

    finish(cluster, cleanup, containerd, checks);
}

/// The DaemonSet of `deploy/kata-deploy.yaml`, pointed at `host_root` (standing in for the node's `/`) and with
/// containerd's restart left to the test (its containerd is a private process, not a systemd service).
fn daemonset_for(host_root: &Path) -> String {
    let yaml = std::fs::read_to_string(testutil::package_dir().join("../../deploy/kata-deploy.yaml"))
        .expect("deploy/kata-deploy.yaml");
    let restart = r#"--restart-command "/usr/bin/nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd""#;
    assert_eq!(yaml.matches(restart).count(), 2, "kata-deploy.yaml's install and uninstall restart containerd");
    let root = "            path: /\n";
    assert_eq!(yaml.matches(root).count(), 1, "kata-deploy.yaml mounts the node's / once");
    yaml.replace(restart, "--no-restart").replace(root, &format!("            path: {}\n", host_root.display()))
}

/// Every file under `dir` with its bytes (symlinks as their targets).
fn tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            let rel = path.strip_prefix(dir).expect("under dir").to_path_buf();
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    files.insert(rel, Vec::new());
                    stack.push(path);
                }
                Ok(t) if t.is_symlink() => {
                    files.insert(
                        rel,
                        std::fs::read_link(&path).unwrap_or_default().into_os_string().into_encoded_bytes(),
                    );
                }
                _ => {
                    files.insert(rel, std::fs::read(&path).unwrap_or_default());
                }
            }
        }
    }
    files
}

/// The node install: the DaemonSet's installer (from the image `deploy/build-image.sh` makes, imported with
/// `ctr -n k8s.io image import`) adds the `kata` runtime to the node's containerd config; after containerd's
/// restart a `runtimeClassName: kata` pod runs in a VM; deleting the DaemonSet (its preStop uninstall) gives the
/// node's files back byte for byte.
#[test]
fn the_kata_deploy_daemonset_installs_kata_on_the_node_and_takes_it_off() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let bin = testutil::skip_unless!(kube_bin());
    let release = parts.kernel_release().expect("kernel has a version banner");
    let _vm = vm_lock();
    let net = CniNetwork::create().expect("CNI network config");
    let mut containerd = step("containerd with CRI and no kata runtime", || {
        e2e::Containerd::start(e2e::ContainerdOptions {
            namespace: "k8s.io".to_owned(),
            shim_dir: Some(parts.shim_dir.clone()),
            cri: Some(e2e::CriOptions::new(net.conf_dir())),
            ctr_timeout: POD_TIMEOUT,
            ..Default::default()
        })
        .expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    let work = tempfile::tempdir().expect("temp dir");
    let image = work.path().join("kata-rs-deploy.tar");
    step("deploy/build-image.sh", || {
        let script = testutil::package_dir().join("../../deploy/build-image.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(&image)
            .arg("0.1.0")
            .env("KATA_RS_BIN", &parts.shim_dir)
            .output()
            .expect("run build-image.sh");
        assert!(out.status.success(), "build-image.sh: {}", text(&out.stderr));
    });
    containerd.import_image(&image).expect("ctr -n k8s.io image import");

    // The node's / as the installer sees it: containerd's own config at /etc/containerd/config.toml.
    let host_root = work.path().join("node");
    let node_config = host_root.join("etc/containerd/config.toml");
    std::fs::create_dir_all(node_config.parent().expect("parent")).expect("mkdir");
    std::fs::copy(containerd.config_path(), &node_config).expect("copy containerd's config");
    let before = tree(&host_root);
    let cri = CriClient::for_containerd(&containerd, CRI_DEADLINE);
    let cleanup = PodCleanup(&cri);
    let mut checks = Checks::default();
    let cluster = step("Kubernetes cluster", || {
        Cluster::start(&bin, containerd.address()).unwrap_or_else(|e| panic!("the cluster starts: {e}"))
    });

    cluster.apply(&daemonset_for(&host_root)).expect("apply the DaemonSet");
    let rollout =
        cluster.kubectl(&["-n", "kube-system", "rollout", "status", "daemonset/kata-rs-deploy", "--timeout=240s"]);
    checks.check(
        "the DaemonSet's installer pod becomes ready",
        rollout.as_ref().is_ok_and(|o| o.status.success()),
        || format!("{rollout:?}\n{}", cluster.kubectl_ok(&["-n", "kube-system", "describe", "pods"])),
    );
    let merged = std::fs::read_to_string(&node_config).unwrap_or_default();
    checks.check("the node's containerd config has the kata runtime", merged.contains("runtimes.kata]"), || {
        merged.clone()
    });
    let shim = host_root.join("usr/local/bin/containerd-shim-kata-v2");
    checks.check("the shim is installed on the node", shim.is_file(), || format!("{} missing", shim.display()));

    // What `systemctl restart containerd` does on a node: containerd reads the merged config.
    std::fs::copy(&node_config, containerd.config_path()).expect("containerd's config is the node's");
    step("containerd restarted", || containerd.restart().expect("containerd restarts"));
    let runtimeclass = testutil::package_dir().join("../../config/kubernetes/runtimeclass.yaml");
    cluster.apply(&std::fs::read_to_string(runtimeclass).expect("runtimeclass.yaml")).expect("RuntimeClass kata");
    let rt = Runtime { name: "installed", class: Some("kata"), kernel: release };
    cluster.apply(&simple_pod(&rt, "pod", "uname -r; sleep 3600", "")).expect("apply the kata pod");
    let running = cluster.wait_pod_phase("installed-pod", "Running", POD_TIMEOUT);
    checks.check("a kata pod runs through the installed runtime", running.is_ok(), || format!("{running:?}"));
    let logs = cluster.kubectl(&["logs", "installed-pod"]).map(|o| text(&o.stdout)).unwrap_or_default();
    checks.check("its logs show the guest kernel", logs.trim() == rt.kernel, || {
        format!("{logs:?}, guest kernel {}", rt.kernel)
    });
    let deleted = cluster.kubectl(&["delete", "pod", "installed-pod", "--wait=true", "--timeout=180s"]);
    checks.check("the kata pod is deleted", deleted.as_ref().is_ok_and(|o| o.status.success()), || {
        format!("{deleted:?}")
    });

    let deleted = cluster.kubectl(&[
        "-n",
        "kube-system",
        "delete",
        "daemonset",
        "kata-rs-deploy",
        "--wait=true",
        "--timeout=180s",
    ]);
    checks.check("the DaemonSet is deleted", deleted.as_ref().is_ok_and(|o| o.status.success()), || {
        format!("{deleted:?}")
    });
    let deadline = Instant::now() + POD_TIMEOUT;
    while Instant::now() < deadline
        && !cluster.kubectl_ok(&["-n", "kube-system", "get", "pods", "-o", "name"]).trim().is_empty()
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = tree(&host_root);
    let changed: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    checks.check("the preStop uninstall gives the node's files back byte for byte", changed.is_empty(), || {
        format!("changed: {changed:?}")
    });

    finish(cluster, cleanup, containerd, checks);
}
