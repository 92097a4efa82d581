//! The warm VM cache (`[factory] vm_cache_number`): `kata-runtime factory init` keeps VMs ready, a `ctr` task and
//! a CRI pod with a network start from it, each cached VM becomes its pod's own (clock, random state, hostname,
//! MAC), killing the server leaves running pods alone and new pods boot, and nothing is left after.
//!
//! Needs what `cri_kata.rs` needs; skips with the reason otherwise. The only traffic goes to the pods' own
//! network namespaces.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::checks::{check_clean_stop, poll, step, Checks};
use e2e::cri::{
    import_pod_images, kata_handler_config, veth_mac, vm_lock, CniNetwork, ContainerSpec, CriClient, KataPodFootprint,
    PodCleanup, PodSpec,
};
use e2e::kata::{sandbox_state, KataParts, KATA_RUNTIME};
use e2e::leaks::{netns_entries, processes};
use e2e::{unique_id, Containerd, ContainerdOptions, CriOptions, RunOptions, BUSYBOX_IMAGE};
use runtime::vm_cache::CACHE_DIR;

const DEADLINE: Duration = Duration::from_secs(180);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// A template boot and two clones under TCG on a loaded machine.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kata_runtime(parts: &KataParts, conf: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(parts.shim_dir.join("kata-runtime"));
    command.arg("--config").arg(conf).args(args);
    command
}

/// The cache server, killed by PID when the test ends early.
struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    fn start(parts: &KataParts, conf: &Path, log: PathBuf) -> Server {
        let out = std::fs::File::create(&log).expect("server log");
        let child = kata_runtime(parts, conf, &["factory", "init"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone().expect("log fd")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("kata-runtime factory init starts");
        Server { child: Some(child), log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The number of VMs `factory status` says the cache holds ready, once it reaches `want`.
fn wait_ready(parts: &KataParts, conf: &Path, want: usize, server: &Server) -> usize {
    let deadline = Instant::now() + FILL_TIMEOUT;
    loop {
        let out = kata_runtime(parts, conf, &["factory", "status"]).output().expect("factory status runs");
        let status = text(&out.stdout);
        let ready = status.lines().filter(|l| l.ends_with(" cached")).count();
        if ready >= want || Instant::now() > deadline {
            if ready < want {
                eprintln!("factory status:\n{status}\nserver log:\n{}", server.log());
            }
            return ready;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether the sandbox's VM is one the cache started: its QEMU was launched in the cache's directory.
fn from_cache(id: &str) -> bool {
    let Some(pid) = sandbox_state(id).and_then(|s| s["processes"][0]["pid"].as_u64()) else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    text(&cmdline).contains(CACHE_DIR)
}

/// Starts the cache server for `conf` and waits until it holds a VM of each kind.
fn filled_server(parts: &KataParts, conf: &Path, dir: &Path) -> Server {
    let server = Server::start(parts, conf, dir.join("server.log"));
    let ready = step("the cache holds a VM of each kind", || wait_ready(parts, conf, 2, &server));
    assert_eq!(ready, 2, "server log:\n{}", server.log());
    server
}

/// Kills the task `id` and removes it and its container.
fn remove_task(containerd: &e2e::Containerd, id: &str, checks: &mut Checks) {
    containerd.ctr(["task", "kill", "-s", "KILL", id]).expect("kill");
    let gone = poll(DEADLINE, || containerd.ctr(["task", "rm", id]).ok().filter(|o| o.status.success()));
    checks.check("a task from the cache is removed", gone.is_some(), || id.to_owned());
    containerd.ctr(["container", "rm", id]).expect("container rm");
}

/// `factory destroy`, then nothing of the cache is left: no process naming it (QEMU or helper), no VM directory.
fn destroy_and_check(parts: &KataParts, conf: &Path, checks: &mut Checks) {
    let destroyed = kata_runtime(parts, conf, &["factory", "destroy"]).output().expect("factory destroy runs");
    checks.check("factory destroy succeeds", destroyed.status.success(), || text(&destroyed.stderr));
    let left = processes(|argv| argv.iter().any(|a| a.contains(CACHE_DIR)));
    checks.check("no cached VM or helper is left running", left.is_empty(), || format!("{left:?}"));
    let dirs: Vec<_> = std::fs::read_dir(CACHE_DIR)
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()).collect())
        .unwrap_or_default();
    checks.check("no cached VM directory is left", dirs.is_empty(), || format!("{dirs:?}"));
}

/// Asks the cache for its status from a thread running as `nobody` (credentials are per thread for the raw
/// system call): what happened, `connect: ...` or `reply: ...`.
fn as_nobody(endpoint: &Path) -> String {
    use std::io::{Read, Write};
    let endpoint = endpoint.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setresuid on this thread only (the raw call, not libc's all-threads wrapper); the thread ends
        // right after and touches nothing shared.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(rc, 0, "setresuid");
        let mut stream = match std::os::unix::net::UnixStream::connect(&endpoint) {
            Ok(s) => s,
            Err(e) => return format!("connect: {e}"),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.write_all(b"\"status\"\n");
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        format!("reply: {reply:?}")
    })
    .join()
    .expect("the probe thread")
}

/// Random bytes, the clock and the hostname as the guest of `id` sees them.
fn probe(containerd: &e2e::Containerd, id: &str) -> (String, u64, String) {
    let out = containerd
        .ctr([
            "task",
            "exec",
            "--exec-id",
            &unique_id("probe"),
            id,
            "sh",
            "-c",
            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; hostname",
        ])
        .expect("ctr task exec");
    assert!(out.status.success(), "exec in {id}: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let random = lines.next().unwrap_or_default().to_owned();
    let clock = lines.next().and_then(|l| l.parse().ok()).unwrap_or(0);
    (random, clock, lines.next().unwrap_or_default().to_owned())
}

#[test]
fn tasks_and_pods_start_from_the_vm_cache() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let templates = dir.path().join("templates");
    let endpoint = dir.path().join("cache.sock");
    let conf = dir.path().join("configuration.toml");
    let text_conf = parts.configuration("").replace("shared_fs = \"virtio-fs\"", "shared_fs = \"virtio-9p\"")
        + &format!(
            "[factory]\nenable_template = true\ntemplate_path = \"{}\"\nvm_cache_number = 1\nvm_cache_endpoint = \"{}\"\n",
            templates.display(),
            endpoint.display()
        );
    std::fs::write(&conf, text_conf).expect("configuration written");
    let mut checks = Checks::default();

    let mut server = filled_server(&parts, &conf, dir.path());
    let mode = std::fs::metadata(&endpoint).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    checks.check("the cache socket is root-only", matches!(mode, Ok(0o600)), || format!("{mode:?}"));
    let refused = as_nobody(&endpoint);
    checks.check("another user cannot connect to the cache", refused.starts_with("connect:"), || refused.clone());
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod")
    };
    // Open the way for a moment, so only the server's own check stands between that user and the cache.
    chmod(dir.path(), 0o711);
    chmod(&endpoint, 0o666);
    let answered = as_nobody(&endpoint);
    chmod(&endpoint, 0o600);
    chmod(dir.path(), 0o700);
    checks.check("the cache answers no other user even through an open socket", answered == "reply: \"\"", || {
        answered.clone()
    });

    let mut net = CniNetwork::create().expect("CNI network config");
    // The kata handler reads `conf` for CRI pods; KATA_CONF_FILE makes `ctr run` tasks read it too.
    let containerd = step("containerd with CRI and the kata handler (cache on)", || {
        Containerd::start(ContainerdOptions {
            namespace: "k8s.io".to_owned(),
            shim_dir: Some(parts.shim_dir.clone()),
            cri: Some(CriOptions::new(net.conf_dir())),
            extra_config: kata_handler_config(&conf),
            env: vec![("KATA_CONF_FILE".into(), conf.display().to_string())],
            ctr_timeout: DEADLINE,
            ..ContainerdOptions::default()
        })
        .expect("containerd with CRI starts")
    });
    step("images imported", || import_pod_images(&containerd).expect("images imported"));
    let cri = CriClient::for_containerd(&containerd, DEADLINE);
    let cleanup = PodCleanup(&cri);

    // Two CRI pods with a network, one after the other (each removed and checked before anything else runs), each from the cache, with its own hostname and MAC,
    // reaching the pod network's gateway through the tap the cache moved into its namespace.
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let mut macs = Vec::new();
    for name in ["cache-pod-a", "cache-pod-b"] {
        wait_ready(&parts, &conf, 2, &server);
        let netns_before = netns_entries();
        let pod = PodSpec::new(name, &logs);
        let config = pod.build();
        let pod_id = cri
            .run_pod_sandbox(&config, "kata")
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail(60)));
        checks.check("a CRI pod with a network starts from the cache", from_cache(&pod_id), || containerd.log_tail(40));
        let footprint = KataPodFootprint::take(&pod_id, netns_before);
        let spec = ContainerSpec::new("sleeper", BUSYBOX_IMAGE, &["sleep", "600"]);
        let container = cri.create_container(&pod_id, &spec.build(), &config).expect("CreateContainer");
        cri.start_container(&container).expect("StartContainer");
        let probe = cri.exec_sync(&container, &["sh", "-c", "hostname; cat /sys/class/net/eth0/address"], EXEC_TIMEOUT);
        let out = probe.as_ref().map(|o| o.stdout.clone()).unwrap_or_default();
        let mut lines = out.lines();
        let (hostname, mac) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default().to_owned());
        checks.check("a cached pod VM has the pod's hostname", hostname == name, || format!("{probe:?}"));
        let veth = footprint.netns.as_deref().and_then(veth_mac);
        checks.check("a cached pod VM's NIC has the pod's MAC", veth.as_deref() == Some(mac.as_str()), || {
            format!("guest {mac}, pod veth {veth:?}")
        });
        let gateway = net.gateway().to_string();
        let ping = cri.exec_sync(&container, &["ping", "-c", "1", "-W", "5", &gateway], EXEC_TIMEOUT);
        checks.check(
            "a cached pod VM reaches the pod network's gateway",
            ping.as_ref().is_ok_and(|o| o.exit_code == 0),
            || format!("{gateway}: {ping:?}"),
        );
        footprint.remove_and_check(&cri, &containerd, &[container.as_str()], &mut checks);
        macs.push(mac);
    }
    checks.check("two cached pod VMs differ in MAC", macs[0] != macs[1], || format!("{macs:?}"));

    // Two `ctr` tasks, each from the cache (the server makes the next VM after each hand-over).
    let detached = RunOptions::detached(KATA_RUNTIME, DEADLINE);
    let tasks = [unique_id("cache-a"), unique_id("cache-b")];
    for id in &tasks {
        wait_ready(&parts, &conf, 2, &server);
        let out = containerd.run(&detached, BUSYBOX_IMAGE, id, &["sleep", "600"]).expect("ctr run -d");
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), containerd.log_tail(60));
        checks.check("a ctr task starts from the cache", from_cache(id), || containerd.log_tail(40));
    }
    let (pa, pb) = (probe(&containerd, &tasks[0]), probe(&containerd, &tasks[1]));
    checks.check("two cached VMs have their own random state", pa.0.len() == 32 && pa.0 != pb.0, || {
        format!("{pa:?} / {pb:?}")
    });
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    checks.check("each cached VM has the host's clock", [pa.1, pb.1].iter().all(|t| now.abs_diff(*t) < 30), || {
        format!("host {now}, guests {} / {}", pa.1, pb.1)
    });

    // Killing the server leaves the running pods alone; new pods boot their own VM.
    server.kill();
    let alive = probe(&containerd, &tasks[0]);
    checks.check("a task from the cache outlives the cache server", alive.0.len() == 32, || format!("{alive:?}"));
    let late = unique_id("cache-late");
    let run = RunOptions { timeout: DEADLINE, ..RunOptions::runtime(KATA_RUNTIME) };
    let out = containerd.run(&run, BUSYBOX_IMAGE, &late, &["echo", "booted"]).expect("ctr run");
    checks.check("with the server gone, a new task starts its own VM", text(&out.stdout) == "booted\n", || {
        format!("{}\n{}", text(&out.stderr), containerd.log_tail(40))
    });

    for id in &tasks {
        remove_task(&containerd, id, &mut checks);
    }
    // The killed server's ready VMs are orphans until `factory destroy` (or the next server) removes them.
    destroy_and_check(&parts, &conf, &mut checks);
    let ids: Vec<&str> = tasks.iter().map(String::as_str).chain([late.as_str()]).collect();
    let report = containerd.leaks(&ids).expect("leak check");
    checks.check("nothing of the tasks is left", report.is_empty(), || report.to_string());
    drop(cleanup);
    drop(cri);
    check_clean_stop(containerd, &mut checks);
    net.remove().expect("bridge removed");
    checks.finish();
}

/// Without templating the server boots the VMs it keeps (vsock agent, virtio-fs with its virtiofsd): a `ctr`
/// task takes one, its rootfs reaches the guest through the renamed share, and nothing is left.
#[test]
fn booted_vms_serve_from_the_cache_too() {
    let parts = testutil::skip_unless!(e2e::cri::kata_pod_parts());
    let _vm = vm_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let endpoint = dir.path().join("cache.sock");
    let conf = dir.path().join("configuration.toml");
    let text_conf = parts.configuration("")
        + &format!("[factory]\nvm_cache_number = 1\nvm_cache_endpoint = \"{}\"\n", endpoint.display());
    std::fs::write(&conf, text_conf).expect("configuration written");
    let mut checks = Checks::default();
    let server = filled_server(&parts, &conf, dir.path());
    let containerd = Containerd::start(ContainerdOptions {
        shim_dir: Some(parts.shim_dir.clone()),
        env: vec![("KATA_CONF_FILE".into(), conf.display().to_string())],
        ctr_timeout: DEADLINE,
        ..Default::default()
    })
    .expect("containerd starts");
    containerd.import(&e2e::OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image")).expect("import busybox");
    let id = unique_id("cache-boot");
    let detached = RunOptions::detached(KATA_RUNTIME, DEADLINE);
    let out = containerd.run(&detached, BUSYBOX_IMAGE, &id, &["sleep", "600"]).expect("ctr run -d");
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), containerd.log_tail(60));
    checks.check("a ctr task takes a booted VM from the cache", from_cache(&id), || containerd.log_tail(40));
    let (random, clock, _) = probe(&containerd, &id);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    checks.check("it runs the task's rootfs over the renamed virtio-fs share", random.len() == 32, || random.clone());
    checks.check("it has the host's clock", now.abs_diff(clock) < 30, || format!("host {now}, guest {clock}"));
    drop(server);
    remove_task(&containerd, &id, &mut checks);
    destroy_and_check(&parts, &conf, &mut checks);
    let report = containerd.leaks(&[id.as_str()]).expect("leak check");
    checks.check("nothing of the task is left", report.is_empty(), || report.to_string());
    check_clean_stop(containerd, &mut checks);
    checks.finish();
}
