//! VM templating end to end: a real template VM is made, saved and stopped; two clones of it start from its
//! saved state, each with its own 9p share, and run containers.
//!
//! Needs KATA_TEST_KERNEL and KATA_TEST_INITRD; skips with a message when either is unset. Runs under TCG.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use std::sync::Arc;

use hypervisor::{AgentTransport, Hypervisor, Qemu, SharedFs, Vm, VmConfig};
use runtime::agent::{AgentClient, SandboxSetup, SharedFsMount, SharedFsType};
use runtime::factory;

const TIMEOUT: Duration = Duration::from_secs(120);

/// A pod VM's configuration as `vm_config` makes it with templating on: agent on virtio-serial, 9p.
fn pod_config(dir: &Path, name: &str, kernel: &Path, initrd: &Path) -> VmConfig {
    let mut c = VmConfig::new(name, kernel, dir.join(name).join("vm"));
    c.initrd = Some(initrd.to_path_buf());
    c.agent = Some(AgentTransport::Serial { port: protocols::AGENT_SERIAL_PORT.to_string() });
    c.kernel_params = vec![protocols::AGENT_SERIAL_PARAM.to_string()];
    c.shared_fs = SharedFs::Virtio9p { shared_dir: dir.join(name).join("shared") };
    c.free_page_reporting = true;
    c
}

struct Clone {
    vm: Arc<dyn Vm>,
    agent: AgentClient,
}

async fn start_clone(template: &factory::Template, mut config: VmConfig) -> Result<Clone, String> {
    let SharedFs::Virtio9p { shared_dir } = &config.shared_fs else { unreachable!() };
    make_rootfs(&shared_dir.join("rootfs"));
    template.clone_into(&mut config);
    let name = config.name.clone();
    let vm = Qemu.vm(config);
    let agent = runtime::boot::boot_and_connect(&vm, TIMEOUT, |_| {})
        .await
        .map_err(|e| format!("clone {name}: {}", protocols::error_chain(&e)))?
        .agent;
    let mut entropy = vec![0u8; 64];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("urandom"), &mut entropy)
        .expect("random");
    agent
        .create_sandbox(&SandboxSetup {
            sandbox_id: name.clone(),
            hostname: name.clone(),
            dns: vec![],
            shared_fs: Some(SharedFsMount {
                fs_type: SharedFsType::NineP,
                tag: "kataShared".into(),
                mount_point: None,
            }),
            host_time: Some(SystemTime::now()),
            entropy,
        })
        .await
        .map_err(|e| format!("clone {name}: create sandbox: {e}"))?;
    Ok(Clone { vm, agent })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_a_template_run_containers() {
    let [kernel, initrd] = testutil::skip_unless!(env_paths(["KATA_TEST_KERNEL", "KATA_TEST_INITRD"]));
    let dir = tempfile::tempdir().expect("tempdir");
    // Short: the template VM's sockets live in <root>/<64-hex key>/vm/ and must fit in 107 bytes.
    let root = dir.path().join("t");

    let t0 = Instant::now();
    let template = factory::ensure(&Qemu, &root, &pod_config(dir.path(), "pod-0", &kernel, &initrd), TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("template: {}", protocols::error_chain(&e)));
    let factory::Ensured::Ready(template) = template else { panic!("nobody else holds the template lock") };
    step("template made (boot, agent answers, saved, template VM stopped)", t0);
    let key = template.dir.file_name().and_then(|k| k.to_str()).unwrap_or_default();
    assert!(key.len() == 32 && key.chars().all(|c| c.is_ascii_hexdigit()), "32 hex digits of a SHA-256: {key}");
    assert!(template.dir.join("config.json").is_file());
    let listed = factory::list(&root);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].complete && listed[0].dir == template.dir);
    assert!(!template.dir.join("vm").exists(), "the template VM's work dir must go with it");

    let t = Instant::now();
    let again = factory::ensure(&Qemu, &root, &pod_config(dir.path(), "pod-1", &kernel, &initrd), TIMEOUT)
        .await
        .expect("again");
    assert_eq!(
        again,
        factory::Ensured::Ready(template.clone()),
        "a pod with the same configuration uses the same template"
    );
    assert!(t.elapsed() < Duration::from_secs(1), "no second template VM was booted ({:?})", t.elapsed());

    let mut clones = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let t = Instant::now();
        match start_clone(&template, pod_config(dir.path(), name, &kernel, &initrd)).await {
            Ok(clone) => clones.push(clone),
            Err(e) => {
                for c in &clones {
                    let _ = c.vm.stop().await;
                }
                panic!("{e}");
            }
        }
        step(&format!("clone {name}: state loaded, agent answers, sandbox created"), t);
    }
    // A failed assertion below must not leave the clones running.
    let _end_clones = VmsOnDrop(clones.iter().map(|c| (c.vm.pids(), c.vm.saved().config.work_dir)).collect());
    let pids: Vec<u32> = clones.iter().flat_map(|c| c.vm.pids()).map(|p| p.pid).collect();
    for clone in &clones {
        // Loaded through an fd we handed over, under QEMU's seccomp sandbox, which forbids spawning `cat`.
        let args = clone.vm.pids()[0].argv.clone();
        assert!(args.iter().any(|a| a == "-sandbox") && !args.iter().any(|a| a.contains("exec:")), "{args:?}");
        let qemu = clone.vm.pids()[0].pid;
        let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap_or_default();
        assert!(status.contains("Seccomp:\t2"), "clone QEMU {qemu} runs without seccomp");
    }

    let mut outputs = Vec::new();
    for (clone, name) in clones.iter().zip(["pod-a", "pod-b"]) {
        let t = Instant::now();
        let (code, out, err) = run_container(
            &clone.agent,
            "probe",
            &["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"],
        )
        .await;
        assert_eq!((code, err.as_str()), (0, ""), "{name}: {out}");
        step(&format!("clone {name} runs a container from its own 9p share"), t);
        outputs.push(out);
    }
    for clone in &clones {
        clone.vm.stop().await.expect("clone stops");
    }
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs();
    let fields: Vec<Vec<&str>> = outputs.iter().map(|o| o.lines().collect()).collect();
    for f in &fields {
        let guest_now: u64 = f.get(1).and_then(|s| s.parse().ok()).expect("date +%s");
        assert!(now.abs_diff(guest_now) < 30, "clone clock set from the host: guest {guest_now}, host {now}");
    }
    assert_eq!(fields[0][0].len(), 64, "32 random bytes in hex: {:?}", fields[0]);
    assert_ne!(fields[0][0], fields[1][0], "clones must not share the template's random state");

    for pid in pids {
        assert!(!running(pid), "clone process {pid} still running after stop");
    }
    let removed = factory::destroy(&root).await.expect("destroy");
    assert_eq!(removed, vec![template.dir.clone()]);
    assert!(!root.exists());
}
