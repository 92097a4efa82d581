//! A single-node Kubernetes cluster for one test, from real components: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and a kubelet (`--container-runtime=remote`, cgroupfs) against a
//! private containerd. Everything listens on 127.0.0.1 on free ports and keeps its state in a private
//! directory; dropping the [`Cluster`] stops the processes (kubelet first), restores the sysctls the kubelet
//! rewrote and removes what the kubelet made on the host (its cgroups, `/var/log/pods`).
//!
//! The binaries come from `scripts/build-kubernetes.sh` (`KATA_TEST_K8S_BIN`); etcd from Debian's etcd-server.

pub mod pki;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::process::{output_with_timeout, terminate_child};

pub use pki::Pki;

/// The kubelet's node name (its certificate says `system:node:<NODE>`).
pub const NODE: &str = "kata-e2e-node";
/// The node's address: the kubelet refuses a loopback one, so it gets a link of its own in the host
/// namespace (a bridge with no ports: nothing sent to it leaves the host), removed when the cluster stops.
const NODE_LINK: &str = "kata-e2e-node";
const NODE_IP: &str = "10.254.254.1";
const ETCD: &str = "/usr/bin/etcd";
const BINARIES: [&str; 5] = ["kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"];
/// What the kubelet rewrites at start; put back when the cluster stops.
const KUBELET_SYSCTLS: [&str; 5] =
    ["vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops", "kernel.keys.root_maxkeys"];
/// Host paths the kubelet writes whatever its flags say.
const KUBELET_HOST_DIRS: [&str; 2] = ["/var/log/pods", "/var/log/containers"];
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// Where the Kubernetes binaries are, or why the test cannot run.
pub fn kube_bin() -> Result<PathBuf, String> {
    let dir = std::env::var_os("KATA_TEST_K8S_BIN")
        .map(PathBuf::from)
        .ok_or("KATA_TEST_K8S_BIN is not set (scripts/test.sh builds Kubernetes with scripts/build-kubernetes.sh)")?;
    for b in BINARIES {
        if !dir.join(b).is_file() {
            return Err(format!("{} is missing (scripts/build-kubernetes.sh)", dir.join(b).display()));
        }
    }
    if !Path::new(ETCD).is_file() {
        return Err(format!("{ETCD} is missing (Debian package etcd-server)"));
    }
    if crate::find_in_path("openssl".as_ref()).is_none() {
        return Err("openssl is missing (Debian package openssl)".into());
    }
    Ok(dir)
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// Adds (or removes) the node's link with [`NODE_IP`].
fn node_link(up: bool) -> Result<(), String> {
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().map_err(|e| format!("run ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    let _ = ip(&["link", "del", NODE_LINK]);
    if !up {
        return Ok(());
    }
    ip(&["link", "add", NODE_LINK, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", NODE_LINK])?;
    ip(&["link", "set", NODE_LINK, "up"])
}

/// The names in `dir`, or `None` when it does not exist.
fn entries(dir: &Path) -> Option<Vec<std::ffi::OsString>> {
    let list = std::fs::read_dir(dir).ok()?;
    Some(list.flatten().map(|e| e.file_name()).collect())
}

/// The kubelet's cgroup hierarchy roots (`kubepods` in each v1 controller, or under the v2 root).
fn kubepods_dirs() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.join("kubepods"), root.join("kubepods.slice")];
    }
    std::fs::read_dir(root).map(|d| d.flatten().map(|e| e.path().join("kubepods")).collect()).unwrap_or_default()
}

/// Removes an empty cgroup tree, deepest first (the kernel refuses a cgroup with processes).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Started components, in start order; stopped in reverse.
    procs: Vec<(&'static str, Child)>,
    pub kubeconfig: PathBuf,
    sysctls: Vec<(String, String)>,
    /// The entries of each of [`KUBELET_HOST_DIRS`] before the cluster started (`None`: it did not exist).
    host_dirs_before: Vec<Option<Vec<std::ffi::OsString>>>,
    kubepods_before: Vec<bool>,
}

impl Cluster {
    /// Starts the cluster against containerd's CRI socket `cri_socket`; returns once the node is Ready and the
    /// default service account exists.
    pub fn start(bin: &Path, cri_socket: &Path) -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("kata-e2e-k8s-").tempdir().map_err(|e| e.to_string())?;
        let sysctls = KUBELET_SYSCTLS
            .iter()
            .filter_map(|k| std::fs::read_to_string(sysctl_path(k)).ok().map(|v| (k.to_string(), v.trim().to_owned())))
            .collect();
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            kubeconfig: dir.path().join("admin.kubeconfig"),
            dir,
            procs: Vec::new(),
            sysctls,
            host_dirs_before: KUBELET_HOST_DIRS.iter().map(|d| entries(Path::new(d))).collect(),
            kubepods_before: kubepods_dirs().iter().map(|d| d.exists()).collect(),
        };
        cluster.boot(cri_socket)?;
        Ok(cluster)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn(&mut self, name: &'static str, program: &Path, args: &[String]) -> Result<(), String> {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))?;
        self.procs.push((name, child));
        Ok(())
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf, String> {
        let path = self.path(name);
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(path)
    }

    fn boot(&mut self, cri_socket: &Path) -> Result<(), String> {
        node_link(true)?;
        let pki = Pki::create(&self.path("pki"), NODE)?;
        let (etcd_port, peer_port, api_port, kubelet_port) = (free_port(), free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            "--name=e2e".into(),
            format!("--data-dir={}", self.path("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=e2e={peer_url}"),
        ];
        self.spawn("etcd", Path::new(ETCD), &etcd_args)?;

        let server = format!("https://127.0.0.1:{api_port}");
        let d = |p: &Path| p.display().to_string();
        let api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            "--insecure-port=0".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            format!("--cert-dir={}", self.path("apiserver").display()),
            format!("--client-ca-file={}", d(&pki.ca.cert)),
            format!("--tls-cert-file={}", d(&pki.apiserver.cert)),
            format!("--tls-private-key-file={}", d(&pki.apiserver.key)),
            format!("--kubelet-client-certificate={}", d(&pki.apiserver_kubelet.cert)),
            format!("--kubelet-client-key={}", d(&pki.apiserver_kubelet.key)),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--service-account-key-file={}", d(&pki.service_account_pub)),
            format!("--service-account-signing-key-file={}", d(&pki.service_account_key)),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ];
        let bin = self.bin.clone();
        self.spawn("kube-apiserver", &bin.join("kube-apiserver"), &api_args)?;
        std::fs::write(&self.kubeconfig, pki.kubeconfig(&pki.admin, &server)).map_err(|e| e.to_string())?;
        self.wait("the API server to be ready", "kube-apiserver", |c| {
            c.kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|o| o.status.success())
        })?;

        let cm_conf = self.write("controller-manager.kubeconfig", &pki.kubeconfig(&pki.controller_manager, &server))?;
        let cm_args = vec![
            format!("--kubeconfig={}", d(&cm_conf)),
            format!("--service-account-private-key-file={}", d(&pki.service_account_key)),
            format!("--root-ca-file={}", d(&pki.ca.cert)),
            "--use-service-account-credentials=true".into(),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
        ];
        self.spawn("kube-controller-manager", &bin.join("kube-controller-manager"), &cm_args)?;
        let sched_conf = self.write("scheduler.kubeconfig", &pki.kubeconfig(&pki.scheduler, &server))?;
        let sched_args = vec![
            format!("--kubeconfig={}", d(&sched_conf)),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
        ];
        self.spawn("kube-scheduler", &bin.join("kube-scheduler"), &sched_args)?;

        let kubelet_conf = self.write("kubelet.kubeconfig", &pki.kubeconfig(&pki.kubelet, &server))?;
        // Pods resolve names with their own loopback only: no query leaves the host.
        let resolv = self.write("resolv.conf", "nameserver 127.0.0.1\n")?;
        let config = self.write(
            "kubelet.yaml",
            &format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\naddress: {NODE_IP}\n\
                 port: {kubelet_port}\nreadOnlyPort: 0\nhealthzPort: 0\ncgroupDriver: cgroupfs\nfailSwapOn: false\n\
                 authentication:\n  anonymous:\n    enabled: false\n  webhook:\n    enabled: false\n  x509:\n    \
                 clientCAFile: {ca}\nauthorization:\n  mode: AlwaysAllow\nresolvConf: {resolv}\n\
                 makeIPTablesUtilChains: false\nimageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
                 evictionHard:\n  memory.available: 50Mi\n  nodefs.available: 1%\n  imagefs.available: 1%\n  \
                 nodefs.inodesFree: 1%\nruntimeRequestTimeout: 5m\nsyncFrequency: 10s\n",
                ca = d(&pki.ca.cert),
                resolv = d(&resolv),
            ),
        )?;
        let kubelet_args = vec![
            format!("--config={}", d(&config)),
            format!("--kubeconfig={}", d(&kubelet_conf)),
            "--container-runtime=remote".into(),
            format!("--container-runtime-endpoint=unix://{}", cri_socket.display()),
            format!("--hostname-override={NODE}"),
            format!("--node-ip={NODE_IP}"),
            format!("--root-dir={}", self.path("kubelet").display()),
            format!("--cert-dir={}", self.path("kubelet-pki").display()),
            format!("--volume-plugin-dir={}", self.path("volume-plugins").display()),
        ];
        self.spawn("kubelet", &bin.join("kubelet"), &kubelet_args)?;
        self.wait("the node to be Ready", "kubelet", |c| {
            c.kubectl(&["get", "node", NODE, "-o", r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#])
                .is_ok_and(|o| o.status.success() && o.stdout == b"True")
        })?;
        self.wait("the default service account", "kube-controller-manager", |c| {
            c.kubectl(&["get", "serviceaccount", "default"]).is_ok_and(|o| o.status.success())
        })
    }

    fn wait(&mut self, what: &str, component: &str, ready: impl Fn(&Self) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(self) {
                return Ok(());
            }
            let exited = self.procs.iter_mut().find_map(|(name, c)| c.try_wait().ok().flatten().map(|_| *name));
            if let Some(name) = exited {
                return Err(format!("{name} exited while waiting for {what}:\n{}", self.log_tail(name, 30)));
            }
            if Instant::now() > deadline {
                return Err(format!("timed out waiting for {what}:\n{}", self.log_tail(component, 30)));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A `kubectl` command for the admin user.
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display())).args(args);
        cmd
    }

    /// Runs `kubectl ARGS` (60 s at most).
    pub fn kubectl(&self, args: &[&str]) -> Result<Output, String> {
        output_with_timeout(&mut self.kubectl_command(args), Duration::from_secs(60)).map_err(|e| e.to_string())
    }

    /// `kubectl ARGS` that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` with `yaml` on stdin.
    pub fn apply(&self, yaml: &str) -> Result<(), String> {
        let mut child = self
            .kubectl_command(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!("kubectl apply: {}\n{yaml}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Waits until pod `name` is in `phase` (`Running`, `Succeeded`, ...); `Err` with its description if not.
    pub fn wait_pod_phase(&self, name: &str, phase: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let got = self.kubectl(&["get", "pod", name, "-o", "jsonpath={.status.phase}"]);
            if got.is_ok_and(|o| o.stdout == phase.as_bytes()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let describe =
            self.kubectl(&["describe", "pod", name]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        Err(format!("pod {name} is not {phase} after {timeout:?}:\n{}", describe.unwrap_or_default()))
    }

    /// A JSONPath of pod `name`.
    pub fn pod_field(&self, name: &str, jsonpath: &str) -> String {
        self.kubectl(&["get", "pod", name, "-o", &format!("jsonpath={jsonpath}")])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Stops every component, kubelet first (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        while let Some((name, mut child)) = self.procs.pop() {
            if let Err(e) = terminate_child(&mut child, Duration::from_secs(10)) {
                eprintln!("e2e: stop {name}: {e}");
            }
        }
        for (key, value) in &self.sysctls {
            let _ = std::fs::write(sysctl_path(key), value);
        }
        for (dir, existed) in kubepods_dirs().iter().zip(&self.kubepods_before) {
            if !existed {
                remove_cgroup_tree(dir);
            }
        }
        // The kubelet removes a deleted pod's log directory only in its next garbage collection (every minute):
        // what the cluster's pods left goes now.
        for (dir, before) in KUBELET_HOST_DIRS.iter().zip(&self.host_dirs_before) {
            let dir = Path::new(dir);
            let kept = before.clone().unwrap_or_default();
            for name in entries(dir).unwrap_or_default().into_iter().filter(|n| !kept.contains(n)) {
                let path = dir.join(name);
                let _ = match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
            }
            if before.is_none() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        for mount in crate::leaks::mounts_under(self.dir.path()) {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = node_link(false);
        if std::thread::panicking() {
            self.keep_logs();
        }
    }

    /// Copies the components' logs somewhere that outlives the test, for a failure to be understood.
    fn keep_logs(&self) {
        let Ok(kept) = tempfile::Builder::new().prefix("kata-e2e-k8s-logs-").tempdir().map(tempfile::TempDir::keep)
        else {
            return;
        };
        for name in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"] {
            let _ = std::fs::copy(self.path(&format!("{name}.log")), kept.join(format!("{name}.log")));
        }
        eprintln!("e2e: the cluster's logs are in {}", kept.display());
    }

    /// What the stop left that the cluster made: kubepods cgroups and kubelet host dirs it created.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (dir, existed) in kubepods_dirs().iter().zip(&self.kubepods_before) {
            if !existed && dir.exists() {
                left.push(dir.display().to_string());
            }
        }
        for (dir, before) in KUBELET_HOST_DIRS.iter().zip(&self.host_dirs_before) {
            match (before, entries(Path::new(dir))) {
                (None, Some(_)) => left.push(dir.to_string()),
                (Some(before), Some(now)) if now.iter().any(|n| !before.contains(n)) => {
                    left.push(format!("{dir}: {now:?}"))
                }
                _ => {}
            }
        }
        left
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
