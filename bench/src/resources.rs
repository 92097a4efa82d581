//! Pods sized by their limits (issue #14): a `ctr run` with a 1 GiB / 2 CPU limit against a default one (start
//! time, and what the guest sees), and an idle pod's host cgroup memory next to its PSS.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::procs::pods_cost;
use crate::stage::{Runtime, Stage};
use crate::{Interrupt, Stat};

const SIZED_FLAGS: &[&str] = &["--memory-limit", "1073741824", "--cpus", "2"];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resources {
    /// `ctr run --rm busybox echo hi`, default size (s).
    pub default_s: Vec<f64>,
    /// The same with `--memory-limit 1GiB --cpus 2` (s).
    pub sized_s: Vec<f64>,
    /// What the sized pod's guest reports.
    pub sized_mem_total_mib: u64,
    pub sized_nproc: u32,
    /// An idle default pod (`sleep 3600`, detached) after settling: its host cgroups' memory use and its PSS (MiB).
    pub idle_pod_cgroup_mib: f64,
    pub idle_overhead_cgroup_mib: f64,
    pub idle_pss_mib: f64,
    /// The same for an idle sized pod (its guest touches more at boot).
    pub idle_sized_pod_cgroup_mib: f64,
    pub idle_sized_overhead_cgroup_mib: f64,
    pub idle_sized_pss_mib: f64,
    pub failures: Vec<String>,
}

/// `ctr run` of a kata pod: its time and stdout.
fn run(stage: &Stage, id: &str, detach: bool, flags: &[&str], cmd: &[&str]) -> Result<(f64, String)> {
    let (secs, out) = crate::measure::ctr_run(stage, Runtime::Kata, id, detach, flags, cmd)?;
    Ok((secs, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Memory use of cgroup `rel` on the host, MiB; 0 when it does not exist.
fn cgroup_mib(rel: &Path) -> f64 {
    let root = Path::new(runtime::host_cgroup::CGROUP_ROOT);
    runtime::host_cgroup::memory_usage(root, rel).map(|bytes| bytes as f64 / 1048576.0).unwrap_or(0.0)
}

/// Starts one idle pod with `flags`, lets it settle, reads (pod cgroup, kata_overhead cgroup, PSS) in MiB.
fn idle(stage: &Stage, flags: &[&str], interrupt: &Interrupt) -> Result<(f64, f64, f64)> {
    let id = e2e::unique_id("res-idle");
    run(stage, &id, true, flags, &["sleep", "3600"])?;
    std::thread::sleep(std::time::Duration::from_secs(3));
    let ns = stage.containerd.namespace().to_owned();
    let read = (
        cgroup_mib(&Path::new(&ns).join(&id)),
        cgroup_mib(&Path::new("kata_overhead").join(&id)),
        pods_cost(stage.containerd.address(), std::slice::from_ref(&id)).pss_per_pod_mib(),
    );
    crate::measure::delete_pods(stage, &[id], 1);
    interrupt.check()?;
    Ok(read)
}

pub fn measure(stage: &Stage, n: usize, interrupt: &Interrupt) -> Result<Resources> {
    let mut r = Resources::default();
    for _ in 0..n {
        interrupt.check()?;
        match run(stage, &e2e::unique_id("res-default"), false, &[], &["echo", "hi"]) {
            Ok((secs, _)) => r.default_s.push(secs),
            Err(e) => r.failures.push(format!("{e:#}")),
        }
        let cmd = ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"];
        match run(stage, &e2e::unique_id("res-sized"), false, SIZED_FLAGS, &cmd) {
            Ok((secs, out)) => {
                r.sized_s.push(secs);
                let mut lines = out.lines();
                r.sized_nproc = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
                r.sized_mem_total_mib =
                    lines.next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0) / 1024;
            }
            Err(e) => r.failures.push(format!("{e:#}")),
        }
    }
    match idle(stage, &[], interrupt) {
        Ok((pod, overhead, pss)) => {
            (r.idle_pod_cgroup_mib, r.idle_overhead_cgroup_mib, r.idle_pss_mib) = (pod, overhead, pss)
        }
        Err(e) => r.failures.push(format!("idle pod: {e:#}")),
    }
    match idle(stage, SIZED_FLAGS, interrupt) {
        Ok((pod, overhead, pss)) => {
            (r.idle_sized_pod_cgroup_mib, r.idle_sized_overhead_cgroup_mib, r.idle_sized_pss_mib) = (pod, overhead, pss)
        }
        Err(e) => r.failures.push(format!("idle sized pod: {e:#}")),
    }
    Ok(r)
}

impl Resources {
    pub fn stats(&self) -> (Option<Stat>, Option<Stat>) {
        (Stat::of(&self.default_s), Stat::of(&self.sized_s))
    }

    pub fn markdown(&self, o: &mut String) {
        let _ = writeln!(o, "\n## Pods sized by their limits (`ctr run --memory-limit 1GiB --cpus 2`)\n");
        let (default, sized) = self.stats();
        let cell = |s: Option<Stat>| s.map(|s| format!("{:.3} | {:.3} | {:.3} | {}", s.median, s.min, s.max, s.n));
        let _ = writeln!(o, "| pod | median | min | max | n |\n|---|---|---|---|---|");
        let _ =
            writeln!(o, "| default (`echo hi`) | {} |", cell(default).unwrap_or_else(|| "n/a | n/a | n/a | 0".into()));
        let _ = writeln!(o, "| 1 GiB / 2 CPUs | {} |", cell(sized).unwrap_or_else(|| "n/a | n/a | n/a | 0".into()));
        let _ = writeln!(
            o,
            "\nThe sized guest reports `nproc` {} and `MemTotal` {} MiB (host CPUs cap the vCPUs).\n",
            self.sized_nproc, self.sized_mem_total_mib
        );
        let _ =
            writeln!(o, "| idle pod | pod cgroup (MiB) | kata_overhead cgroup (MiB) | PSS (MiB) |\n|---|---|---|---|");
        let _ = writeln!(
            o,
            "| default | {:.1} | {:.1} | {:.1} |\n| 1 GiB / 2 CPUs | {:.1} | {:.1} | {:.1} |",
            self.idle_pod_cgroup_mib,
            self.idle_overhead_cgroup_mib,
            self.idle_pss_mib,
            self.idle_sized_pod_cgroup_mib,
            self.idle_sized_overhead_cgroup_mib,
            self.idle_sized_pss_mib
        );
        for f in &self.failures {
            let _ = writeln!(o, "- failure: {}", f.replace('\n', " "));
        }
    }
}
