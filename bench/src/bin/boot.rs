//! Boots N VMs one after another with the real kernel, initrd and helpers, and prints for each the time from
//! QEMU launch to the agent answering, and the host memory of QEMU and its helpers.
//!
//! usage: boot [N]   (parts from KATA_TEST_KERNEL, KATA_TEST_INITRD, KATA_TEST_VIRTIOFSD, KATA_TEST_VSOCK_DAEMON)

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bench::floor::{boot_floor, BootParts};
use bench::{Interrupt, Stat};

fn part(env: &str) -> Result<PathBuf> {
    let p = PathBuf::from(std::env::var_os(env).with_context(|| format!("{env} is not set"))?);
    if !p.is_file() {
        bail!("{env}={} does not exist", p.display());
    }
    Ok(p)
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(5);
    let parts = BootParts {
        qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
        kernel: part("KATA_TEST_KERNEL")?,
        initrd: part("KATA_TEST_INITRD")?,
        virtiofsd: part("KATA_TEST_VIRTIOFSD")?,
        vsock_daemon: part("KATA_TEST_VSOCK_DAEMON")?,
    };
    let samples = boot_floor(n, &parts, &Interrupt::install()?).await?;
    println!("| boot | QEMU up (s) | agent ready (s) | host RSS (MiB) | host PSS (MiB) |");
    println!("|---|---|---|---|---|");
    for (i, s) in samples.iter().enumerate() {
        println!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} |",
            i + 1,
            s.qemu_up_s,
            s.agent_s,
            s.memory.rss_kib as f64 / 1024.0,
            s.memory.pss_kib as f64 / 1024.0
        );
    }
    let agent = Stat::of(&samples.iter().map(|s| s.agent_s).collect::<Vec<_>>()).unwrap_or_default();
    let pss =
        Stat::of(&samples.iter().map(|s| s.memory.pss_kib as f64 / 1024.0).collect::<Vec<_>>()).unwrap_or_default();
    println!(
        "\nQEMU launch -> agent ready: median {:.2} s (min {:.2}, max {:.2}); median host PSS {:.1} MiB",
        agent.median, agent.min, agent.max, pss.median
    );
    Ok(())
}
