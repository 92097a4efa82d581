//! Boots N VMs one after another with the real kernel, initrd and helpers, and prints for each the time from
//! QEMU launch to the agent answering, and the host memory of QEMU and its helpers.
//!
//! usage: boot [N]   (parts from KATA_TEST_KERNEL, KATA_TEST_INITRD, KATA_TEST_VIRTIOFSD, KATA_TEST_VSOCK_DAEMON)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{memory, summary, Memory};
use hypervisor::{Hypervisor, QemuVm, SharedFs, VmConfig};
use runtime::agent::{AgentClient, AGENT_PORT};

fn part(env: &str) -> Result<PathBuf> {
    let p = PathBuf::from(std::env::var_os(env).with_context(|| format!("{env} is not set"))?);
    if !p.is_file() {
        bail!("{env}={} does not exist", p.display());
    }
    Ok(p)
}

struct Sample {
    start_s: f64,
    agent_s: f64,
    memory: Memory,
}

async fn one_boot(i: usize, base: &std::path::Path) -> Result<Sample> {
    let work = base.join(format!("vm{i}"));
    let shared = base.join(format!("shared{i}"));
    std::fs::create_dir_all(&shared)?;
    let mut config = VmConfig::new(format!("bench{i}"), "/usr/bin/qemu-system-x86_64", part("KATA_TEST_KERNEL")?, &work);
    config.initrd = Some(part("KATA_TEST_INITRD")?);
    config.vsock_daemon = Some(part("KATA_TEST_VSOCK_DAEMON")?);
    config.shared_fs =
        SharedFs::VirtioFs { daemon: part("KATA_TEST_VIRTIOFSD")?, extra_args: vec![], shared_dir: shared.clone() };
    let vm = QemuVm::new(config);
    let launched = Instant::now();
    vm.start().await?;
    let start_s = launched.elapsed().as_secs_f64();
    let socket = vm.agent_socket().context("no agent socket")?;
    let agent = AgentClient::connect(socket, AGENT_PORT, Duration::from_secs(60)).await;
    let agent_s = launched.elapsed().as_secs_f64();
    // Let the guest settle so the memory figure is the idle one, not the boot peak.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let memory = vm.pids().iter().map(|p| memory(p.pid)).fold(Memory::default(), |a, b| a + b);
    vm.stop().await?;
    agent.context("agent did not answer")?;
    Ok(Sample { start_s, agent_s, memory })
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(5);
    let base = std::env::temp_dir().join(format!("kata-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let mut samples = Vec::new();
    println!("| boot | QEMU up (s) | agent ready (s) | host RSS (MiB) | host PSS (MiB) |");
    println!("|---|---|---|---|---|");
    for i in 0..n {
        let s = one_boot(i, &base).await;
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&base);
                return Err(e);
            }
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} |",
            i + 1,
            s.start_s,
            s.agent_s,
            s.memory.rss_kib as f64 / 1024.0,
            s.memory.pss_kib as f64 / 1024.0
        );
        samples.push(s);
    }
    std::fs::remove_dir_all(&base)?;
    let (med, min, max) = summary(&mut samples.iter().map(|s| s.agent_s).collect::<Vec<_>>());
    let (pss, _, _) = summary(&mut samples.iter().map(|s| s.memory.pss_kib as f64 / 1024.0).collect::<Vec<_>>());
    println!("\nQEMU launch -> agent ready: median {med:.2} s (min {min:.2}, max {max:.2}); median host PSS {pss:.1} MiB");
    Ok(())
}
