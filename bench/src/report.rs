//! Everything one `bench-all` run measured (saved as JSON) and its Markdown rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::floor::BootSample;
use crate::measure::{ColdStart, Density, ExecLatency, MemoryRun};
use crate::network::NetResult;
use crate::timeline::Breakdown;
use crate::Stat;

/// Issue 6's targets under TCG.
pub const TARGET_START_RATIO: f64 = 1.25;
pub const TARGET_PSS_MIB: f64 = 60.0;
pub const TARGET_IDLE_PODS: usize = 20;
/// Issue 16's targets for pods cloned from a VM template: host PSS per idle clone at 20 clones (with an equal
/// share of the template files), and 100 idle clones on one machine.
pub const TARGET_CLONE_PSS_MB: f64 = 45.0;
/// Issue 16: a `ctr run` from the warm VM cache at most this many times runc's median in the same run.
pub const TARGET_CACHED_RATIO: f64 = 3.0;
pub const TARGET_CLONED_PODS: usize = 100;
/// The idle clone counts whose memory is measured.
pub const CLONE_MEMORY_STEPS: [usize; 4] = [1, TARGET_IDLE_PODS, 50, TARGET_CLONED_PODS];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub date: String,
    pub nproc: usize,
    pub cpu: String,
    pub host_kernel: String,
    pub accelerator: String,
    pub guest_kernel: String,
    pub load_before: String,
    pub load_after: String,
    pub quick: bool,
}

/// Shared-filesystem read throughput of one configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FsRead {
    pub label: String,
    pub mb_per_s: Vec<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub floor: Vec<BootSample>,
    pub cold: Option<ColdStart>,
    pub exec: Option<ExecLatency>,
    pub memory: Vec<MemoryRun>,
    pub density: Vec<Density>,
    pub fs_read_mib: usize,
    pub fs_read: Vec<FsRead>,
    pub net_mib: usize,
    pub net: Vec<NetResult>,
    /// The same start, memory and density measurements with pods cloned from a VM template.
    #[serde(default)]
    pub template: Option<TemplateResults>,
    /// Pods sized by their limits, and an idle pod's host cgroup memory.
    #[serde(default)]
    pub resources: Option<crate::resources::Resources>,
    /// Stages that failed as a whole, with the reason.
    pub stage_errors: Vec<String>,
}

/// Measurements with `[factory] enable_template = true` (and 9p, which templating needs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TemplateResults {
    /// The first `ctr run`, which boots and saves the template.
    pub first_s: Option<f64>,
    /// Clone starts, interleaved with runc.
    pub cold: Option<ColdStart>,
    pub memory: Option<MemoryRun>,
    /// MiB the template files hold (shared by every clone), read with the most pods running.
    pub template_mib: f64,
    pub density: Option<Density>,
    /// Starts with a VM from the warm cache (`vm_cache_number`), interleaved with runc.
    #[serde(default)]
    pub cached: Option<ColdStart>,
    /// Pods started 4 at a time with the cache server running (the cache serves the first ones, then the shims
    /// clone their own VMs).
    #[serde(default)]
    pub cached_density: Option<Density>,
}

fn stat_cells(s: Option<Stat>) -> String {
    match s {
        Some(s) => format!("{:.3} | {:.3} | {:.3} | {}", s.median, s.min, s.max, s.n),
        None => "n/a | n/a | n/a | 0".to_owned(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "n/a".to_owned())
}

/// A ratio as `12.3x`, or `n/a` when one side was not measured.
fn times(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}x")).unwrap_or_else(|| "n/a".to_owned())
}

impl Results {
    pub fn floor_stat(&self) -> Option<Stat> {
        Stat::of(&self.floor.iter().map(|s| s.agent_s).collect::<Vec<_>>())
    }

    pub fn cold_stats(&self) -> (Option<Stat>, Option<Stat>) {
        self.cold.as_ref().map(ColdStart::stats).unwrap_or_default()
    }

    pub fn exec_stats(&self) -> (Option<Stat>, Option<Stat>) {
        match &self.exec {
            Some(e) => (Stat::of(&e.kata_s), Stat::of(&e.runc_s)),
            None => (None, None),
        }
    }

    /// Median of each breakdown phase over the kata cold starts.
    pub fn breakdown_medians(&self) -> Vec<(&'static str, Option<f64>)> {
        breakdown_medians(self.cold.as_ref())
    }
}

/// Median of each breakdown phase over the kata starts of `cold`.
fn breakdown_medians(cold: Option<&ColdStart>) -> Vec<(&'static str, Option<f64>)> {
    {
        let runs: &[Breakdown] = cold.map(|c| c.kata_breakdown.as_slice()).unwrap_or(&[]);
        let labels = Breakdown::default().phases();
        (0..labels.len())
            .map(|i| {
                let values: Vec<f64> = runs.iter().filter_map(|b| b.phases()[i].1).collect();
                (labels[i].0, Stat::of(&values).map(|s| s.median))
            })
            .collect()
    }
}

impl Results {
    /// PSS per pod (MiB) of `runtime` at each step: `(target, running, pss per pod)`.
    pub fn pss_steps(&self, runtime: &str) -> Vec<(usize, usize, f64)> {
        self.memory
            .iter()
            .filter(|m| m.runtime == runtime)
            .flat_map(|m| m.steps.iter().map(|s| (s.target, s.running, s.cost.pss_per_pod_mib())))
            .collect()
    }

    /// Host CPU per idle pod of `runtime` at each step, as a table cell (% of one core).
    fn cpu_cells(&self, runtime: &str) -> Vec<String> {
        self.memory
            .iter()
            .filter(|m| m.runtime == runtime)
            .flat_map(|m| m.steps.iter().map(|s| cpu_cell(s.cpu_per_pod)))
            .collect()
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut o = String::new();
        let _ = writeln!(o, "# kata-rs benchmark results\n");
        let _ = writeln!(
            o,
            "{} · {} CPUs ({}) · accelerator **{}** · host kernel {} · guest kernel {} · load average before {} / after {}{}\n",
            m.date,
            m.nproc,
            m.cpu,
            m.accelerator,
            m.host_kernel,
            m.guest_kernel,
            m.load_before,
            m.load_after,
            if m.quick { " · `--quick`" } else { "" }
        );
        let floor = self.floor_stat();
        let (kata, runc) = self.cold_stats();
        let _ = writeln!(o, "## Start latency (s)\n");
        let _ = writeln!(o, "| what | median | min | max | n |\n|---|---|---|---|---|");
        let _ = writeln!(o, "| `ctr run --rm busybox echo hi`, kata | {} |", stat_cells(kata));
        let _ = writeln!(o, "| `ctr run --rm busybox echo hi`, runc | {} |", stat_cells(runc));
        let _ = writeln!(o, "| bare floor: QEMU launch -> agent answers (no containerd) | {} |", stat_cells(floor));
        let _ = writeln!(
            o,
            "\nkata/runc: **{}**; kata/floor: **{}** (target ≤ {TARGET_START_RATIO}x)\n",
            times(ratio(kata, runc), 1),
            times(ratio(kata, floor), 2)
        );
        let _ = writeln!(o, "### Where a kata `ctr run` spends its time (medians from containerd's log, s)\n");
        let _ = writeln!(o, "| phase | median |\n|---|---|");
        for (label, v) in self.breakdown_medians() {
            let _ = writeln!(o, "| {label} | {} |", opt(v, 3));
        }
        let _ = writeln!(
            o,
            "| *for comparison: bare QEMU launch -> agent answers* | {} |",
            opt(floor.map(|s| s.median), 3)
        );
        let (ek, er) = self.exec_stats();
        let _ = writeln!(o, "\n## Exec latency: `ctr task exec ... true` (s)\n");
        let _ = writeln!(o, "| runtime | median | min | max | n |\n|---|---|---|---|---|");
        let _ = writeln!(o, "| kata | {} |\n| runc | {} |", stat_cells(ek), stat_cells(er));
        let _ = writeln!(o, "\nkata/runc: **{}**", times(ratio(ek, er), 1));
        let _ = writeln!(o, "\n## Host memory per idle pod (`sleep 3600`), PSS from smaps_rollup (MiB)\n");
        let _ = writeln!(o, "{IDLE_CPU_NOTE}\n");
        let _ = writeln!(
            o,
            "| pods asked | kata running | kata PSS / pod | kata CPU / pod | runc running | runc PSS / pod | runc CPU / pod |\n\
             |---|---|---|---|---|---|---|"
        );
        let (mk, mr) = (self.pss_steps("kata"), self.pss_steps("runc"));
        let (ck, cr) = (self.cpu_cells("kata"), self.cpu_cells("runc"));
        let na = || "n/a".to_string();
        for (i, (target, running, pss)) in mk.iter().enumerate() {
            let (rr, rp) = mr.get(i).map(|(_, r, p)| (r.to_string(), format!("{p:.1}"))).unwrap_or((na(), na()));
            let (kc, rc) = (ck.get(i).cloned().unwrap_or_else(na), cr.get(i).cloned().unwrap_or_else(na));
            let _ = writeln!(o, "| {target} | {running} | {pss:.1} | {kc} | {rr} | {rp} | {rc} |");
        }
        if let Some(last) = self.memory.iter().find(|m| m.runtime == "kata").and_then(|m| m.steps.last()) {
            let pods = last.cost.pods.max(1) as f64;
            let parts: Vec<String> = last
                .cost
                .by_process
                .iter()
                .map(|(name, mem)| format!("{name} {:.1}", mem.pss_kib as f64 / 1024.0 / pods))
                .collect();
            let _ =
                writeln!(o, "\nkata per pod at {} pods, by process (MiB PSS): {}", last.cost.pods, parts.join(", "));
        }
        for m in &self.memory {
            if !m.failures.is_empty() {
                let _ = writeln!(o, "\n{} idle-pod failures: {}", m.runtime, m.failures.join("; "));
            }
        }
        let _ = writeln!(o, "\n## Density: pods started concurrently until the count asked or the first failure\n");
        let _ = writeln!(
            o,
            "| runtime | concurrency | started | wall (s) | pods/s | first failure |\n|---|---|---|---|---|---|"
        );
        for d in &self.density {
            let _ = writeln!(
                o,
                "| {} | {} | {}/{} | {:.1} | {:.2} | {} |",
                d.runtime,
                d.concurrency,
                d.started,
                d.target,
                d.wall_s,
                d.pods_per_s,
                d.failures.first().map(|f| f.replace('|', "/")).unwrap_or_else(|| "none".to_owned())
            );
        }
        let _ = writeln!(
            o,
            "\n## Shared-filesystem read: `dd if=/data/f bs=1M` of a {} MiB bind-mounted file (MB/s)\n",
            self.fs_read_mib
        );
        let _ = writeln!(o, "| where | median | min | max | n |\n|---|---|---|---|---|");
        for f in &self.fs_read {
            match &f.error {
                Some(e) => {
                    let _ = writeln!(o, "| {} | not available: {} | | | |", f.label, e.replace('|', "/"));
                }
                None => {
                    let _ = writeln!(o, "| {} | {} |", f.label, stat_cells(Stat::of(&f.mb_per_s)));
                }
            }
        }
        let _ = writeln!(o, "\n## Network: host -> pod TCP, {} MiB into busybox `nc -l` (MB/s)\n", self.net_mib);
        let _ = writeln!(o, "| runtime | median | min | max | n |\n|---|---|---|---|---|");
        for n in &self.net {
            match &n.not_available {
                Some(why) => {
                    let _ = writeln!(
                        o,
                        "| {} | not available: {} | | | |",
                        n.runtime,
                        why.replace('|', "/").replace('\n', " ")
                    );
                }
                None => {
                    let _ = writeln!(o, "| {} | {} |", n.runtime, stat_cells(Stat::of(&n.mb_per_s)));
                }
            }
        }
        if let Some(t) = &self.template {
            template_markdown(&mut o, t, floor);
        }
        if let Some(r) = &self.resources {
            r.markdown(&mut o);
        }
        let _ = writeln!(o, "\n## Issue 6 targets (TCG)\n");
        let _ = writeln!(o, "| target | now | met |\n|---|---|---|");
        let r = ratio(kata, floor);
        let _ = writeln!(
            o,
            "| `ctr run` ≤ {TARGET_START_RATIO}x bare boot floor | {} | {} |",
            times(r, 2),
            yes(r.map(|r| r <= TARGET_START_RATIO))
        );
        let pss = mk.iter().rev().find(|(_, running, _)| *running > 0).map(|(_, _, p)| *p);
        let _ = writeln!(
            o,
            "| host PSS per idle pod ≤ {TARGET_PSS_MIB} MB | {} MiB | {} |",
            opt(pss, 1),
            yes(pss.map(|p| p * 1.048_576 <= TARGET_PSS_MIB))
        );
        let most = mk.iter().map(|(_, r, _)| *r).max();
        let failed = self.memory.iter().any(|m| m.runtime == "kata" && !m.failures.is_empty());
        let _ = writeln!(
            o,
            "| {TARGET_IDLE_PODS} idle pods at once without failure | {} running{} | {} |",
            most.map(|m| m.to_string()).unwrap_or_else(|| "n/a".into()),
            if failed { ", with failures" } else { "" },
            yes(most.map(|m| m >= TARGET_IDLE_PODS && !failed))
        );
        if let Some(t) = &self.template {
            let clone = t.cold.as_ref().map(ColdStart::stats).unwrap_or_default().0;
            let r = ratio(clone, floor);
            let _ = writeln!(
                o,
                "| with templating: `ctr run` ≤ {TARGET_START_RATIO}x bare boot floor | {} | {} |",
                times(r, 2),
                yes(r.map(|r| r <= TARGET_START_RATIO))
            );
            let (cached, runc) = t.cached.as_ref().map(ColdStart::stats).unwrap_or_default();
            let r = ratio(cached, runc);
            let _ = writeln!(
                o,
                "| with the VM cache: `ctr run` ≤ {TARGET_CACHED_RATIO}x runc | {} | {} |",
                times(r, 1),
                yes(r.map(|r| r <= TARGET_CACHED_RATIO))
            );
            // At 20 clones (or the most measured below that), as issue 16 states it.
            let steps = t.memory_steps();
            let at = steps.iter().rfind(|s| s.1 > 0 && s.0 <= TARGET_IDLE_PODS);
            let total = at.map(|s| s.2 + s.3);
            let _ = writeln!(
                o,
                "| with templating: host memory per idle pod at {} pods ≤ {TARGET_CLONE_PSS_MB} MB (PSS + template share) | {} MiB | {} |",
                at.map(|s| s.1).unwrap_or(0),
                opt(total, 1),
                yes(total.map(|p| p * 1.048_576 <= TARGET_CLONE_PSS_MB))
            );
            let most = t
                .memory
                .as_ref()
                .map(|m| (m.steps.iter().map(|s| s.running).max().unwrap_or(0), !m.failures.is_empty()));
            let _ = writeln!(
                o,
                "| with templating: {TARGET_CLONED_PODS} idle pods at once without failure | {} | {} |",
                most.map(|(n, f)| format!("{n} running{}", if f { ", with failures" } else { "" }))
                    .unwrap_or_else(|| "n/a".into()),
                yes(most.map(|(n, f)| n >= TARGET_CLONED_PODS && !f))
            );
        }
        if !self.stage_errors.is_empty() {
            let _ = writeln!(o, "\n## Stages that failed\n");
            for e in &self.stage_errors {
                let _ = writeln!(o, "- {}", e.replace('\n', " "));
            }
        }
        o
    }
}

impl TemplateResults {
    /// Per memory step: (pods asked, running, PSS per pod, template share per pod), MiB.
    pub fn memory_steps(&self) -> Vec<(usize, usize, f64, f64)> {
        let steps = self.memory.as_ref().map(|m| m.steps.as_slice()).unwrap_or(&[]);
        steps
            .iter()
            .map(|s| (s.target, s.running, s.cost.pss_per_pod_mib(), self.template_mib / s.running.max(1) as f64))
            .collect()
    }
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

/// The templating section: clone start, its breakdown, memory per idle clone with the template's share, density.
fn template_markdown(o: &mut String, t: &TemplateResults, floor: Option<Stat>) {
    let _ = writeln!(o, "\n## With VM templating (`[factory] enable_template = true`, virtio-9p)\n");
    let _ = writeln!(
        o,
        "The first pod boots the template VM and saves it ({} s for that `ctr run`). Every later pod is a clone: QEMU maps \
         the template's memory copy-on-write and loads its device state instead of booting.\n",
        opt(t.first_s, 3)
    );
    let (kata, runc) = t.cold.as_ref().map(ColdStart::stats).unwrap_or_default();
    let _ = writeln!(o, "| what | median | min | max | n |\n|---|---|---|---|---|");
    let _ = writeln!(o, "| `ctr run --rm busybox echo hi`, kata clone | {} |", stat_cells(kata));
    let _ = writeln!(o, "| `ctr run --rm busybox echo hi`, runc (interleaved) | {} |", stat_cells(runc));
    let _ = writeln!(
        o,
        "\nclone/runc: **{}**; clone/bare boot floor: **{}** (target ≤ {TARGET_START_RATIO}x)\n",
        times(ratio(kata, runc), 1),
        times(ratio(kata, floor), 2)
    );
    let _ = writeln!(o, "### Where a clone's `ctr run` spends its time (medians, s)\n");
    let _ = writeln!(o, "| phase | median |\n|---|---|");
    for (label, v) in breakdown_medians(t.cold.as_ref()) {
        let label = label.replace("guest boot, agent start, vsock dial", "state load, agent answers on virtio-serial");
        let _ = writeln!(o, "| {label} | {} |", opt(v, 3));
    }
    if let Some(cached) = &t.cached {
        let (kata, runc) = cached.stats();
        let _ = writeln!(o, "\n### From the warm VM cache (`vm_cache_number`)\n");
        let _ = writeln!(
            o,
            "A server (`kata-runtime factory init`) keeps clones started with their agent up; each `ctr run` takes one \
             (the run waits, untimed, until the server has one ready).\n"
        );
        let _ = writeln!(o, "| what | median | min | max | n |\n|---|---|---|---|---|");
        let _ = writeln!(o, "| `ctr run --rm busybox echo hi`, kata from the cache | {} |", stat_cells(kata));
        let _ = writeln!(o, "| `ctr run --rm busybox echo hi`, runc (interleaved) | {} |", stat_cells(runc));
        let _ = writeln!(o, "\ncached/runc: **{}** (target ≤ {TARGET_CACHED_RATIO}x)\n", times(ratio(kata, runc), 1));
        let _ = writeln!(o, "| phase of a cached start | median |\n|---|---|");
        for (label, v) in breakdown_medians(Some(cached)) {
            let label = label
                .replace("config, virtiofsd, vhost-device-vsock, QEMU, QMP", "config, cache request, tap moved, rename")
                .replace("QEMU launched", "VM handed over")
                .replace("guest boot, agent start, vsock dial", "QMP attach, agent dial");
            let _ = writeln!(o, "| {label} | {} |", opt(v, 3));
        }
        if !cached.failures.is_empty() {
            let _ = writeln!(o, "\ncached start failures: {}", cached.failures.join("; "));
        }
        if let Some(d) = &t.cached_density {
            let _ = writeln!(
                o,
                "\nDensity with the cache server running: {}/{} pods started {} at a time in {:.1} s, **{:.2} pods/s**, \
                 {} of them from the cache (the rest cloned their own VM once it was empty); first failure: {}.",
                d.started,
                d.target,
                d.concurrency,
                d.wall_s,
                d.pods_per_s,
                d.from_cache.map(|n| n.to_string()).unwrap_or_else(|| "n/a".into()),
                d.failures.first().map(|f| f.replace('|', "/")).unwrap_or_else(|| "none".to_owned())
            );
        }
    }
    let _ = writeln!(o, "\n### Host memory per idle clone (MiB)\n");
    let _ = writeln!(
        o,
        "PSS counts the template pages a clone maps, shared among the clones that map them. The template files hold \
         {:.1} MiB in all; the total column adds an equal share of them to each pod, so nothing is left out. \
         {IDLE_CPU_NOTE}\n",
        t.template_mib
    );
    let _ = writeln!(
        o,
        "| pods asked | running | PSS / pod | template files / pod | total / pod | CPU / pod |\n|---|---|---|---|---|---|"
    );
    let cpu = t.memory.iter().flat_map(|m| m.steps.iter().map(|s| cpu_cell(s.cpu_per_pod)));
    for ((target, running, pss, share), cpu) in t.memory_steps().into_iter().zip(cpu) {
        let _ = writeln!(o, "| {target} | {running} | {pss:.1} | {share:.1} | {:.1} | {cpu} |", pss + share);
    }
    if let Some(m) = &t.memory {
        if let Some(last) = m.steps.last() {
            let pods = last.cost.pods.max(1) as f64;
            let parts: Vec<String> = last
                .cost
                .by_process
                .iter()
                .map(|(name, mem)| format!("{name} {:.1}", mem.pss_kib as f64 / 1024.0 / pods))
                .collect();
            let _ = writeln!(o, "\nper clone at {} pods, by process (MiB PSS): {}", last.cost.pods, parts.join(", "));
        }
        if !m.failures.is_empty() {
            let _ = writeln!(o, "\nidle clone failures: {}", m.failures.join("; "));
        }
    }
    if let Some(d) = &t.density {
        let _ = writeln!(
            o,
            "\nDensity: {}/{} clones started {} at a time in {:.1} s, **{:.2} pods/s**; first failure: {}.",
            d.started,
            d.target,
            d.concurrency,
            d.wall_s,
            d.pods_per_s,
            d.failures.first().map(|f| f.replace('|', "/")).unwrap_or_else(|| "none".to_owned())
        );
    }
}

fn yes(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "n/a",
    }
}

/// What the CPU columns of the idle-pod tables mean.
const IDLE_CPU_NOTE: &str = "CPU / pod: host CPU time of each pod's processes (shim, QEMU, helpers; runc's shim and \
     workload) while idle, as a share of one core, sampled over 20 s once the pods settled.";

fn cpu_cell(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "n/a".to_string(), |f| format!("{:.2}%", f * 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::MemoryStep;
    use crate::procs::PodsCost;
    use crate::Memory;

    fn step(running: usize, pss_mib_per_pod: f64) -> MemoryStep {
        let pss_kib = (pss_mib_per_pod * 1024.0) as u64 * running as u64;
        let cost = PodsCost {
            pods: running,
            processes: running,
            total: Memory { rss_kib: pss_kib, pss_kib },
            ..Default::default()
        };
        MemoryStep { target: running, running, cost, cpu_per_pod: None }
    }

    #[test]
    fn templating_adds_the_template_share_to_each_pod_and_judges_the_total() {
        let template = TemplateResults {
            first_s: Some(1.7),
            cold: Some(ColdStart { kata_s: vec![0.5, 0.6, 0.55], runc_s: vec![0.1; 3], ..Default::default() }),
            memory: Some(MemoryRun {
                runtime: "kata".into(),
                steps: vec![step(1, 90.0), step(20, 52.0)],
                ..Default::default()
            }),
            template_mib: 48.0,
            density: None,
            cached: Some(ColdStart { kata_s: vec![0.35, 0.3, 0.4], runc_s: vec![0.1; 3], ..Default::default() }),
            cached_density: Some(Density {
                runtime: "kata".into(),
                concurrency: 4,
                target: 100,
                started: 100,
                wall_s: 50.0,
                pods_per_s: 2.0,
                failures: vec![],
                from_cache: Some(12),
            }),
        };
        let results = Results {
            floor: vec![BootSample { qemu_up_s: 0.1, agent_s: 1.0, memory: Memory::default() }],
            template: Some(template.clone()),
            ..Default::default()
        };
        let md = results.markdown();
        assert!(md.contains("| 1 | 1 | 90.0 | 48.0 | 138.0 |"), "{md}");
        assert!(md.contains("| 20 | 20 | 52.0 | 2.4 | 54.4 |"), "{md}");
        assert!(md.contains("clone/bare boot floor: **0.55x**"), "{md}");
        // Judged at 20 pods: 52 + 2.4 = 54.4 MiB = 57 MB, over the 45 MB target.
        assert!(md.contains("at 20 pods ≤ 45 MB (PSS + template share) | 54.4 MiB | **no** |"), "{md}");
        assert!(md.contains("100 idle pods at once without failure | 20 running | **no** |"), "{md}");
        // From the cache: 0.35 / 0.1 = 3.5x, over the 3x target.
        assert!(md.contains("cached/runc: **3.5x** (target ≤ 3x)"), "{md}");
        assert!(md.contains("with the VM cache: `ctr run` ≤ 3x runc | 3.5x | **no** |"), "{md}");
        assert!(
            md.contains("100/100 pods started 4 at a time in 50.0 s, **2.00 pods/s**, 12 of them from the cache"),
            "{md}"
        );

        // 38 MiB PSS + 2.4 share = 40.4 MiB = 42.4 MB at 20 pods; the 100-pod step does not count for it.
        let mut under = template;
        under.memory = Some(MemoryRun {
            runtime: "kata".into(),
            steps: vec![step(20, 38.0), step(100, 90.0)],
            ..Default::default()
        });
        let md = Results { template: Some(under), ..Default::default() }.markdown();
        assert!(md.contains("at 20 pods ≤ 45 MB (PSS + template share) | 40.4 MiB | yes |"), "{md}");
        assert!(md.contains("100 idle pods at once without failure | 100 running | yes |"), "{md}");
    }
}
