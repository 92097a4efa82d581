//! The bare floor: QEMU booting the same kernel and initrd with the same helpers as a pod, until the agent
//! answers. No containerd, no shim, no container: what any `ctr run` through kata-rs must at least take.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hypervisor::{AgentTransport, Hypervisor, Qemu, SharedFs, VmConfig};
use serde::{Deserialize, Serialize};

use crate::{memory, Memory};

/// The guest parts a boot needs (from `e2e::kata::KataParts` or the `KATA_TEST_*` variables).
#[derive(Debug, Clone)]
pub struct BootParts {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub virtiofsd: PathBuf,
    pub vsock_daemon: PathBuf,
}

impl BootParts {
    pub fn from_kata(parts: &e2e::kata::KataParts) -> Self {
        BootParts {
            qemu: parts.qemu.clone(),
            kernel: parts.kernel.clone(),
            initrd: parts.initrd.clone(),
            virtiofsd: parts.virtiofsd.clone(),
            vsock_daemon: parts.vsock_daemon.clone(),
        }
    }
}

/// One bare boot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BootSample {
    /// QEMU launch -> `Vm::start` returned (QEMU and helpers up, QMP answering).
    pub qemu_up_s: f64,
    /// QEMU launch -> the agent answered over hybrid vsock.
    pub agent_s: f64,
    /// QEMU + virtiofsd + vhost-device-vsock, idle, half a second after the agent answered.
    pub memory: Memory,
}

/// Boots one VM in `work`, waits for the agent, measures, stops it. The VM is stopped on every path.
pub async fn boot_once(name: &str, parts: &BootParts, work: &Path) -> Result<BootSample> {
    let shared = work.join("shared");
    std::fs::create_dir_all(&shared).with_context(|| format!("create {}", shared.display()))?;
    let mut config = VmConfig::new(name.to_owned(), parts.kernel.clone(), work.join("vm"));
    config.qemu.path = parts.qemu.clone();
    config.initrd = Some(parts.initrd.clone());
    config.agent = Some(AgentTransport::HybridVsock);
    config.qemu.vsock_daemon = Some(parts.vsock_daemon.clone());
    config.shared_fs = SharedFs::VirtioFs { daemon: parts.virtiofsd.clone(), extra_args: vec![], shared_dir: shared };
    // The same devices a kata pod's VM has (the shipped configuration reclaims freed guest memory).
    config.free_page_reporting = true;
    let vm = Qemu.vm(config);
    vm.prepare().await.context("prepare the VM")?;
    let launched = Instant::now();
    let mut qemu_up_s = 0.0;
    let booted = runtime::boot::boot_and_connect(&vm, Duration::from_secs(60), |_| {
        qemu_up_s = launched.elapsed().as_secs_f64();
    })
    .await;
    let agent_s = launched.elapsed().as_secs_f64();
    let agent = booted.context("boot the VM and connect to its agent")?;
    // Let the guest settle so the memory figure is the idle one, not the boot peak.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let memory = vm.pids().iter().map(|p| memory(p.pid)).fold(Memory::default(), |a, b| a + b);
    drop(agent);
    vm.stop().await.context("stop QEMU")?;
    Ok(BootSample { qemu_up_s, agent_s, memory })
}

/// `n` bare boots one after another (each in its own directory under a temporary one).
pub async fn boot_floor(n: usize, parts: &BootParts, interrupt: &crate::Interrupt) -> Result<Vec<BootSample>> {
    let base = tempfile::Builder::new().prefix("kata-bench-floor-").tempdir()?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        interrupt.check()?;
        samples.push(boot_once(&format!("benchfloor{i}"), parts, &base.path().join(format!("vm{i}"))).await?);
    }
    Ok(samples)
}
