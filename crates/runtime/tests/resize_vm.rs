//! Growing a running pod VM with the real agent in it: a q35 VM (virtio-fs, hybrid vsock, as the shim boots it)
//! started with 1 vCPU / 256 MiB and room for 4 / 1024 is resized to 2 / 512, the agent onlines what was added,
//! and a container then sees two CPUs online and 256 MiB more in `MemTotal`. The vhost-user daemons must map the
//! added memory too: the container reads a file from virtio-fs afterwards and checks its digest. Then memory grows
//! until the vhost-user daemons have no memory region left, which `resize` reports as a refusal.
//!
//! Needs KATA_TEST_KERNEL (a kernel with ACPI CPU and memory hot-plug, `guest/build-kernel.sh`), KATA_TEST_INITRD
//! (the agent's initrd), KATA_TEST_VSOCK_DAEMON and KATA_TEST_VIRTIOFSD; skips with a message when any is unset.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use hypervisor::{AgentTransport, Hypervisor, MachineType, Qemu, SharedFs, Vm, VmConfig, VmSize};
use runtime::agent::{AgentClient, SandboxSetup, SharedFsMount, SharedFsType};
use runtime::boot::boot_and_connect;

const PROBE: &str = "cat /sys/devices/system/cpu/online; grep MemTotal /proc/meminfo; md5sum /data | cut -d' ' -f1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_vm_shows_its_new_cpus_and_memory_in_the_guest() {
    let [kernel, initrd, daemon, virtiofsd] = testutil::skip_unless!(env_paths([
        "KATA_TEST_KERNEL",
        "KATA_TEST_INITRD",
        "KATA_TEST_VSOCK_DAEMON",
        "KATA_TEST_VIRTIOFSD"
    ]));
    let dir = tempfile::tempdir().expect("tempdir");
    let share = dir.path().join("shared");
    make_rootfs(&share.join("rootfs"));
    // 16 MiB of varied bytes for the guest to read through virtio-fs once its memory grew.
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(share.join("rootfs/data"), &data).expect("data file");
    let digest = md5_hex(&share.join("rootfs/data"));

    let mut config = VmConfig::new("resize-vm-test", &kernel, dir.path().join("vm"));
    config.qemu.machine = MachineType::Q35;
    config.initrd = Some(initrd);
    config.agent = Some(AgentTransport::HybridVsock);
    config.qemu.vsock_daemon = Some(daemon);
    config.shared_fs = SharedFs::VirtioFs { daemon: virtiofsd, extra_args: vec![], shared_dir: share.clone() };
    (config.vcpus, config.memory_mib, config.max_vcpus, config.max_memory_mib) = (1, 256, 4, 2048);
    let vm = Qemu.vm(config);
    let booted = boot_and_connect(&vm, Duration::from_secs(60), |_| {}).await;
    let pids: Vec<u32> = vm.pids().iter().map(|p| p.pid).collect();
    let result = match &booted {
        // On a task of its own, so a failed assertion still stops the VM below.
        Ok(booted) => {
            let scenario = tokio::spawn(scenario(vm.clone(), booted.agent.clone(), digest));
            match tokio::time::timeout(Duration::from_secs(300), scenario).await {
                Ok(Ok(result)) => result,
                Ok(Err(panicked)) => Err(format!("the scenario failed: {panicked}")),
                Err(_) => Err("the scenario timed out".into()),
            }
        }
        Err(e) => Err(protocols::error_chain(e)),
    };
    if result.is_err() {
        eprintln!("--- guest console (last lines) ---\n{}", vm.console().tail(80));
    }
    drop(booted);
    vm.stop().await.expect("VM stops");
    for pid in pids {
        assert!(!running(pid), "VM process {pid} still running after stop");
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

async fn scenario(vm: Arc<dyn Vm>, agent: AgentClient, digest: String) -> Result<(), String> {
    agent
        .create_sandbox(&SandboxSetup {
            sandbox_id: "resize".into(),
            hostname: "resize".into(),
            dns: vec![],
            shared_fs: Some(SharedFsMount {
                fs_type: SharedFsType::VirtioFs,
                tag: "kataShared".into(),
                mount_point: None,
            }),
            host_time: Some(SystemTime::now()),
            entropy: vec![0x5a; 32],
        })
        .await
        .map_err(|e| e.to_string())?;
    let (cpus, before_kib, _) = probe(&agent, "before").await?;
    assert_eq!(cpus, "0", "one vCPU at boot");
    assert_eq!(vm.size().await.map_err(|e| e.to_string())?, VmSize { vcpus: 1, memory_mib: 256 });

    let t = Instant::now();
    let grown = vm.resize(VmSize { vcpus: 2, memory_mib: 512 }).await.map_err(|e| protocols::error_chain(&e))?;
    step("resize to 2 vCPUs / 512 MiB (QEMU, guest ACPI acknowledged)", t);
    assert_eq!(grown, VmSize { vcpus: 2, memory_mib: 512 });
    let t = Instant::now();
    agent.online_cpu_mem(2).await.map_err(|e| protocols::error_chain(&e))?;
    step("online_cpu_mem(2)", t);

    let (cpus, after_kib, read) = probe(&agent, "after").await?;
    assert_eq!(cpus, "0-1", "the added CPU is online");
    // The DIMM's 256 MiB are all usable: their memmap lives in the boot memory.
    assert!(after_kib >= before_kib + 250 * 1024, "MemTotal {before_kib} kB -> {after_kib} kB");
    assert_eq!(read, digest, "a file read through virtio-fs after the memory grew");
    println!("MemTotal {before_kib} kB -> {after_kib} kB; CPUs online {cpus}");

    let t = Instant::now();
    agent.online_cpu_mem(2).await.map_err(|e| protocols::error_chain(&e))?;
    step("online_cpu_mem again: nothing left offline", t);

    // One DIMM per resize: the daemons' memory regions run out before q35's 8 slots do.
    let t = Instant::now();
    let mut size = grown;
    let refusal = loop {
        let want = VmSize { vcpus: 2, memory_mib: size.memory_mib + 128 };
        match vm.resize(want).await {
            Ok(grown) => size = grown,
            Err(e) => break e,
        }
        assert!(size.memory_mib <= 256 + 8 * 128, "more DIMMs than slots: {size:?}");
    };
    let dimms = (size.memory_mib - 256) / 128 - 1;
    println!("{dimms} DIMMs, then: {}", protocols::error_chain(&refusal));
    assert!(matches!(refusal, hypervisor::Error::Resize { .. }), "{refusal:?}");
    assert!(dimms >= 7, "only {dimms} DIMMs fitted");
    assert_eq!(vm.size().await.map_err(|e| e.to_string())?, size, "the refused DIMM left nothing behind");
    agent.online_cpu_mem(2).await.map_err(|e| protocols::error_chain(&e))?;
    let (_, last_kib, read) = probe(&agent, "last").await?;
    assert!(last_kib >= after_kib + u64::from(size.memory_mib - 512) * 1000, "MemTotal {after_kib} -> {last_kib} kB");
    assert_eq!(read, digest);
    step(&format!("memory grown to {} MiB in {dimms} DIMMs, then refused", size.memory_mib), t);
    Ok(())
}

/// Runs [`PROBE`] in a container: (CPUs online, MemTotal in kB, digest of /data).
async fn probe(agent: &AgentClient, id: &str) -> Result<(String, u64, String), String> {
    let (code, out, err) = run_container(agent, id, &["sh", "-c", PROBE]).await;
    if code != 0 {
        return Err(format!("probe {id} exited {code}: {err}"));
    }
    let lines: Vec<&str> = out.lines().collect();
    let [cpus, mem, digest] = lines[..] else { return Err(format!("probe {id} printed {out:?}")) };
    let kib = mem.split_whitespace().nth(1).and_then(|k| k.parse().ok()).ok_or(format!("MemTotal line {mem:?}"))?;
    Ok((cpus.to_string(), kib, digest.to_string()))
}

fn md5_hex(path: &Path) -> String {
    let out = std::process::Command::new("md5sum").arg(path).output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}
