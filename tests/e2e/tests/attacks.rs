//! Attack tests (docs/security.md): a hostile container, a hostile guest and a hostile pod spec against a real
//! containerd, QEMU (TCG here) and guest. Each test is what an attacker would try; each must be refused.
//! Needs root and the parts `scripts/test.sh` exports; skips with the reason when one is missing, except
//! under `CI=true`, where a missing part fails the test.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use e2e::kata::{kata_parts, sandbox_dir, sandbox_state, KataParts, KATA_RUNTIME};
use e2e::leaks::mounts;
use e2e::{unique_id, Containerd, ContainerdOptions, OciImage, RunOptions, BUSYBOX_IMAGE};

/// A VM boot under TCG takes seconds; leave room for a loaded machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// The unprivileged host user of the attacks: `nobody`.
const NOBODY: u32 = 65534;

struct Kata {
    containerd: Containerd,
    _conf: tempfile::TempDir,
}

/// A private containerd whose kata configuration is the test parts' plus `extra` lines, appended at the end
/// (`[hypervisor.qemu]` keys first, then any sections).
fn start(parts: KataParts, hypervisor_lines: &str, sections: &str) -> Kata {
    let conf = tempfile::tempdir().expect("temp dir");
    let conf_file = conf.path().join("configuration.toml");
    std::fs::write(&conf_file, format!("{}\n{sections}", parts.configuration(hypervisor_lines)))
        .expect("write configuration");
    let containerd = Containerd::start(ContainerdOptions {
        shim_dir: Some(parts.shim_dir.clone()),
        env: vec![("KATA_CONF_FILE".into(), conf_file.display().to_string())],
        ctr_timeout: RUN_TIMEOUT,
        ..Default::default()
    })
    .expect("containerd starts");
    containerd.import(&OciImage::busybox(BUSYBOX_IMAGE).expect("busybox image")).expect("import busybox");
    Kata { containerd, _conf: conf }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ctr(k: &Kata, args: &[&str]) -> Output {
    k.containerd.ctr(args).expect("ctr runs")
}

fn ctr_ok(k: &Kata, args: &[&str]) -> String {
    let out = ctr(k, args);
    assert!(out.status.success(), "ctr {args:?} failed: {}\n{}", text(&out.stderr), k.containerd.log_tail(40));
    text(&out.stdout)
}

fn run_detached(k: &Kata, id: &str, flags: &[String], cmd: &[&str]) {
    let mut extra_flags = vec!["-d".to_string()];
    extra_flags.extend(flags.iter().cloned());
    let opts = RunOptions { rm: false, extra_flags, timeout: RUN_TIMEOUT, ..RunOptions::runtime(KATA_RUNTIME) };
    let out = k.containerd.run(&opts, BUSYBOX_IMAGE, id, cmd).expect("ctr run -d");
    assert!(out.status.success(), "ctr run -d failed: {}\n{}", text(&out.stderr), k.containerd.log_tail(40));
}

/// `ctr run --rm` with annotations; returns its output.
fn run_annotated(k: &Kata, id: &str, annotations: &[&str]) -> Output {
    let extra_flags = annotations.iter().flat_map(|a| ["--annotation".to_string(), a.to_string()]).collect();
    let opts = RunOptions { extra_flags, timeout: RUN_TIMEOUT, ..RunOptions::runtime(KATA_RUNTIME) };
    k.containerd.run(&opts, BUSYBOX_IMAGE, id, &["true"]).expect("ctr run")
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `program args`, run as the host user `nobody` (no supplementary groups), succeeds; what it said.
fn as_nobody(program: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(program).args(args).current_dir("/").uid(NOBODY).gid(NOBODY).output() {
        Ok(out) => (out.status.success(), text(&out.stdout)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => (false, e.to_string()),
        Err(e) => panic!("cannot run {program} as nobody: {e}"),
    }
}

fn stop_and_remove(k: &Kata, id: &str) {
    ctr_ok(k, &["task", "kill", "-s", "SIGKILL", id]);
    wait_for("the task to stop", Duration::from_secs(60), || {
        ctr_ok(k, &["task", "ls"]).lines().any(|l| l.starts_with(id) && l.contains("STOPPED"))
    });
    let _ = ctr(k, &["task", "delete", id]);
    ctr_ok(k, &["container", "rm", id]);
}

fn assert_no_leaks(k: &Kata, ids: &[&str]) {
    e2e::kata::assert_no_leaks(&k.containerd, ids);
}

fn shutdown(k: Kata) {
    e2e::kata::assert_clean_shutdown(k.containerd);
}

/// The per-mount options of the mount at `point`.
fn mount_options(point: &Path) -> Option<String> {
    mounts().into_iter().rev().find(|m| m.mount_point == point).map(|m| m.options)
}

/// What a container with CAP_SYS_ADMIN in the guest (guest root, as after a guest kernel exploit) tries
/// against the shared directory: mount it itself, then plant files and symlinks where the host mounts.
const GUEST_ROOT_ATTACK: &str = r#"
mkdir -p /mnt/share
mount -t virtiofs kataShared /mnt/share || { echo "cannot mount the share"; exit 90; }
[ -d /mnt/share/$ID/rootfs ] && echo "sees the share"
for try in "touch /mnt/share/planted" "mkdir /mnt/share/$ID/evil" "ln -s /etc /mnt/share/$ID/mounts/9" \
           "rm -rf /mnt/share/$ID/mounts" "dd if=/dev/zero of=/mnt/share/fill bs=1k count=64"; do
  if sh -c "$try" 2>/dev/null; then echo "ALLOWED: $try"; else echo "refused: $try"; fi
done
echo guest-data > /vol/written && echo "volume writable"
touch /tmp/own-rootfs && echo "rootfs writable"
umount /mnt/share
"#;

/// Findings 1, 2 and 4 (devices) of docs/security.md, in one VM: a setuid binary planted by a container is
/// out of reach of host users; the guest sees a read-only view of where the host mounts; the guest's device
/// cgroup holds.
#[test]
fn a_container_cannot_reach_the_host() {
    // Without submount announcements the guest has one superblock for the whole share, so the container's
    // own mount of the tag reaches the share's root, as guest root (the agent's mount) does. (With them, the
    // kernel hands back whichever submount superblock it finds first.)
    let parts = testutil::skip_unless!(kata_parts());
    let k = start(parts, r#"virtio_fs_extra_args = ["--no-announce-submounts"]"#, "");
    let id = unique_id("attack-fs");
    let volume = tempfile::tempdir().expect("volume dir");
    std::fs::set_permissions(volume.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod volume");
    let flags = vec![
        "--cap-add".to_string(),
        "CAP_SYS_ADMIN".to_string(),
        "--mount".to_string(),
        format!("type=bind,src={},dst=/vol,options=rbind:rw", volume.path().display()),
    ];
    let plant = "cp /bin/busybox /tmp/sb && chmod 4755 /tmp/sb && echo planted > /tmp/marker; sleep 600";
    run_detached(&k, &id, &flags, &["sh", "-c", plant]);

    let root = sandbox_dir(&id);
    let rootfs = root.join("mounts").join(&id).join("rootfs");
    let planted = rootfs.join("tmp/sb");
    wait_for("the container to plant its setuid binary", RUN_TIMEOUT, || rootfs.join("tmp/marker").exists());
    assert_eq!(std::fs::metadata(&planted).expect("planted file").mode() & 0o7777, 0o4755);

    // Finding 1: no host user but root reaches the sandbox, and the rootfs is nosuid,nodev on the host.
    for dir in [Path::new("/run/kata-rs"), root.as_path(), &root.join("mounts"), &root.join("vm")] {
        let mode = std::fs::metadata(dir).expect("sandbox dir").mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    }
    let shared_view = root.join("shared").join(&id).join("rootfs/tmp/sb");
    for path in [&planted, &shared_view] {
        let path = path.to_str().expect("utf-8 path");
        let (stat, said) = as_nobody("/bin/busybox", &["stat", path]);
        assert!(!stat, "nobody can stat {path}: {said}");
        let (ran, said) = as_nobody(path, &["id"]);
        assert!(!ran, "nobody ran {path}: {said}");
    }
    let options = mount_options(&rootfs).expect("the rootfs is mounted");
    assert!(options.contains("nosuid") && options.contains("nodev"), "rootfs mount options: {options}");

    // Finding 2: the guest's view is read-only, and a slave of the host-private mounts/.
    let shared = mount_options(&root.join("shared")).expect("shared/ is a mount");
    assert!(shared.split(',').any(|o| o == "ro"), "shared/ options: {shared}");
    let attack = format!("ID={id}\n{GUEST_ROOT_ATTACK}");
    let out = ctr(&k, &["task", "exec", "--exec-id", "guest-root", &id, "sh", "-c", &attack]);
    let report = text(&out.stdout);
    eprintln!("guest-root attack:\n{report}{}", text(&out.stderr));
    assert!(report.contains("sees the share"), "the attack did not reach the share: {report}");
    assert!(!report.contains("ALLOWED"), "the guest changed the host's mount tree:\n{report}");
    assert_eq!(report.matches("refused:").count(), 5, "{report}");
    assert!(report.contains("volume writable") && report.contains("rootfs writable"), "{report}");
    assert_eq!(std::fs::read_to_string(volume.path().join("written")).expect("guest wrote the volume"), "guest-data\n");
    for planted in ["planted", "fill"] {
        assert!(!root.join("mounts").join(planted).exists(), "{planted} reached the host");
    }

    // Finding 4: the OCI device cgroup holds in the guest (4:64 is the guest's serial port).
    let mknod = "mknod /tmp/c c 4 64 && echo x > /tmp/c && echo WROTE-DEVICE; echo x > /dev/null && echo null-ok";
    let out = ctr(&k, &["task", "exec", "--exec-id", "mknod", &id, "sh", "-c", mknod]);
    let report = text(&out.stdout);
    assert!(!report.contains("WROTE-DEVICE"), "a container wrote to a device it was not given: {report}");
    assert!(report.contains("null-ok"), "allowed devices must keep working: {report}{}", text(&out.stderr));

    // Finding 7: QEMU runs under its seccomp sandbox.
    let state = sandbox_state(&id).expect("sandbox state");
    let qemu_pid = state["processes"][0]["pid"].as_u64().expect("QEMU pid");
    let status = std::fs::read_to_string(format!("/proc/{qemu_pid}/status")).expect("QEMU status");
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "QEMU is not under a seccomp filter:\n{status}");
    let cmdline = std::fs::read(format!("/proc/{qemu_pid}/cmdline")).expect("QEMU cmdline");
    assert!(text(&cmdline).contains("spawn=deny"), "QEMU cmdline: {}", text(&cmdline).replace('\0', " "));

    stop_and_remove(&k, &id);
    assert_no_leaks(&k, &[&id]);
    assert!(volume.path().join("written").exists(), "cleanup must never delete a volume's contents");
    shutdown(k);
}

/// Finding 3: a pod spec cannot size its VM past the limits, change agent settings the configuration did
/// not open to it, or hold the shim while its VM never answers.
#[test]
fn a_pod_spec_cannot_size_or_stall_its_vm() {
    let allowed = r#"enable_annotations = ["kernel_params", "default_memory", "default_vcpus"]"#;
    let parts = testutil::skip_unless!(kata_parts());
    let k = start(parts, allowed, "");
    let cases: [(&str, &[&str]); 4] = [
        ("io.katacontainers.config.hypervisor.default_memory=1048576", &["default_memory", "1048576", "limit"]),
        ("io.katacontainers.config.hypervisor.default_vcpus=4096", &["default_vcpus", "4096", "limit"]),
        ("io.katacontainers.config.agent.dial_timeout=100000", &["agent.dial_timeout", "not allowed"]),
        ("io.katacontainers.config.agent.debug=true", &["agent.debug", "not allowed"]),
    ];
    let mut ids = Vec::new();
    for (annotation, expected) in cases {
        let id = unique_id("attack-spec");
        let out = run_annotated(&k, &id, &[annotation]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{annotation} was accepted");
        for word in expected {
            assert!(stderr.contains(word), "refusal of {annotation} does not name {word:?}: {stderr}");
        }
        let _ = ctr(&k, &["container", "rm", &id]);
        ids.push(id);
    }

    // A guest that dies while the host dials its agent ends the dial at once, with the reason.
    let id = unique_id("attack-dial");
    let out = run_annotated(&k, &id, &["io.katacontainers.config.hypervisor.kernel_params=rdinit=/no-such-init"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a VM without init started");
    assert!(stderr.contains("exited") && stderr.contains("before its agent answered"), "{stderr}");
    let _ = ctr(&k, &["container", "rm", &id]);
    ids.push(id);

    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_no_leaks(&k, &refs);
    shutdown(k);
}

/// The sandbox's regular files and their total size.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if meta.is_dir()
            && !meta.file_type().is_symlink()
            && entry.file_name() != "mounts"
            && entry.file_name() != "shared"
        {
            found.extend(files_under(&entry.path()));
        } else if meta.is_file() {
            found.push((entry.path(), meta.len()));
        }
    }
    found
}

/// Finding 4 (console): a guest that floods its console grows neither a host file nor the shim, and what
/// reaches containerd's log (debug mode) is rate-limited and cut to length.
#[test]
fn the_guest_cannot_fill_the_host_through_its_console() {
    // Userspace writes to /dev/kmsg are not rate-limited by the guest kernel with printk.devkmsg=on.
    let parts = testutil::skip_unless!(kata_parts());
    let k = start(parts, "kernel_params = \"printk.devkmsg=on\"", "[runtime]\nenable_debug = true\n");
    let id = unique_id("attack-console");
    let flags = vec!["--device".to_string(), "/dev/kmsg".to_string()];
    // The kernel takes records of up to 1 KiB from /dev/kmsg.
    let long = "x".repeat(900);
    let flood =
        format!("i=0; while [ $i -lt 4000 ]; do echo \"<0>flood $i {long}\"; i=$((i+1)); done > /dev/kmsg; sleep 600");
    run_detached(&k, &id, &flags, &["sh", "-c", &flood]);
    let marker = "flood 3999";
    wait_for("the flood to reach the console", RUN_TIMEOUT, || k.containerd.log().contains("console lines dropped"));
    std::thread::sleep(Duration::from_secs(5));
    let files = files_under(&sandbox_dir(&id));
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    assert!(total < 256 * 1024, "the sandbox's files grew to {total} bytes: {files:?}");
    let log = k.containerd.log();
    let ours = |l: &&str| l.contains("vm console:") && l.contains(&format!("sandbox={id}"));
    let console_lines: Vec<&str> = log.lines().filter(ours).collect();
    assert!(!console_lines.is_empty(), "debug mode forwards the console");
    assert!(console_lines.len() < 1000, "{} console lines were forwarded: not rate-limited", console_lines.len());
    let longest = console_lines.iter().map(|l| l.len()).max().unwrap_or(0);
    assert!(longest < 2048 + 512, "a forwarded console line is {longest} bytes long");
    eprintln!(
        "{} console lines forwarded, longest {longest} bytes, last flood line seen: {}",
        console_lines.len(),
        log.contains(marker)
    );
    stop_and_remove(&k, &id);
    assert_no_leaks(&k, &[&id]);
    shutdown(k);
}
