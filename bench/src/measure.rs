//! The `ctr`-driven measurements: cold start (with the kata boot breakdown), exec latency, idle-pod memory,
//! start density and rate, and shared-filesystem read throughput.

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};
use chrono::Utc;
use e2e::{unique_id, BUSYBOX_IMAGE};
use serde::{Deserialize, Serialize};

use crate::procs::{pods_cost, pods_cpu, PodsCost};
use crate::stage::{Runtime, Stage, CTR_TIMEOUT};
use crate::timeline::{self, Breakdown};
use crate::Interrupt;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

/// `ctr run [--rm|-d] --runtime R FLAGS busybox ID CMD...`, timed; an error unless it exited 0.
pub(crate) fn ctr_run(
    stage: &Stage,
    runtime: Runtime,
    id: &str,
    detach: bool,
    flags: &[&str],
    cmd: &[&str],
) -> Result<(f64, Output)> {
    let mut args: Vec<&str> = vec!["run", if detach { "-d" } else { "--rm" }, "--runtime", runtime.ctr_name()];
    args.extend_from_slice(flags);
    args.push(BUSYBOX_IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    let started = Instant::now();
    let out = stage.containerd.ctr_with_timeout(&args, CTR_TIMEOUT)?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("ctr run {} {id} failed ({}): {}", runtime.label(), out.status, text(&out.stderr));
    }
    Ok((secs, out))
}

/// Cold starts of `ctr run --rm busybox echo hi`, kata and runc interleaved.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColdStart {
    pub kata_s: Vec<f64>,
    pub runc_s: Vec<f64>,
    pub kata_breakdown: Vec<Breakdown>,
    pub failures: Vec<String>,
}

impl ColdStart {
    /// (kata, runc) median/min/max.
    pub fn stats(&self) -> (Option<crate::Stat>, Option<crate::Stat>) {
        (crate::Stat::of(&self.kata_s), crate::Stat::of(&self.runc_s))
    }
}

pub fn cold_start(stage: &Stage, n: usize, interrupt: &Interrupt) -> Result<ColdStart> {
    cold_start_with(stage, n, interrupt, || {})
}

/// [`cold_start`], calling `before_kata` before each kata run (untimed), e.g. to wait for the VM cache.
pub fn cold_start_with(stage: &Stage, n: usize, interrupt: &Interrupt, before_kata: impl Fn()) -> Result<ColdStart> {
    let mut r = ColdStart::default();
    for _ in 0..n {
        for runtime in [Runtime::Kata, Runtime::Runc] {
            interrupt.check()?;
            if runtime == Runtime::Kata {
                before_kata();
            }
            let id = unique_id(&format!("cold-{}", runtime.label()));
            let from = Utc::now();
            match ctr_run(stage, runtime, &id, false, &[], &["echo", "hi"]) {
                Ok((secs, out)) if text(&out.stdout) == "hi" => {
                    let to = Utc::now();
                    match runtime {
                        Runtime::Kata => {
                            r.kata_s.push(secs);
                            // The shim's log lines reach containerd's log asynchronously: let them land.
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            let lines = timeline::parse(&stage.containerd.log());
                            r.kata_breakdown.push(Breakdown::of_run(&lines, &id, from, to));
                        }
                        Runtime::Runc => r.runc_s.push(secs),
                    }
                }
                Ok((_, out)) => {
                    r.failures.push(format!("{}: unexpected output {:?}", runtime.label(), text(&out.stdout)))
                }
                Err(e) => r.failures.push(format!("{e:#}")),
            }
        }
    }
    Ok(r)
}

/// One timed `ctr run --rm busybox echo hi` of kata (with templating, the first one makes the template).
pub fn first_run(stage: &Stage) -> Result<f64> {
    let id = unique_id("first-kata");
    let (secs, out) = ctr_run(stage, Runtime::Kata, &id, false, &[], &["echo", "hi"])?;
    if text(&out.stdout) != "hi" {
        bail!("unexpected output {:?}", text(&out.stdout));
    }
    Ok(secs)
}

/// MiB the VM templates under `dir` hold (allocated blocks of their sparse memory files): page cache or
/// tmpfs that every clone shares, beside what the clones' PSS already counts of it.
pub fn template_mib(dir: &Path) -> f64 {
    runtime::factory::list(dir).iter().map(|t| t.memory_bytes as f64).sum::<f64>() / 1048576.0
}

/// Starts detached `sleep 3600` containers `ids` with at most `concurrency` `ctr run -d` at a time;
/// stops at the first failure (already running starts finish). Returns the ids started, the failures and
/// the wall time.
pub fn start_pods(
    stage: &Stage,
    runtime: Runtime,
    ids: &[String],
    concurrency: usize,
    interrupt: &Interrupt,
) -> (Vec<String>, Vec<String>, f64) {
    let next = AtomicUsize::new(0);
    let started = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| loop {
                if interrupt.check().is_err() || !failures.lock().map(|f| f.is_empty()).unwrap_or(false) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(id) = ids.get(i) else { return };
                match ctr_run(stage, runtime, id, true, &[], &["sleep", "3600"]) {
                    Ok(_) => started.lock().map(|mut v| v.push(id.clone())).unwrap_or(()),
                    Err(e) => failures.lock().map(|mut v| v.push(format!("{id}: {e:#}"))).unwrap_or(()),
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    (started.into_inner().unwrap_or_default(), failures.into_inner().unwrap_or_default(), wall)
}

/// Kills and deletes containers `ids` (tasks, then container records), `concurrency` at a time.
pub fn delete_pods(stage: &Stage, ids: &[String], concurrency: usize) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(id) = ids.get(i) else { return };
                let c = &stage.containerd;
                let _ = c.ctr_with_timeout(["task", "kill", "-s", "SIGKILL", id], CTR_TIMEOUT);
                let _ = c.ctr_with_timeout(["task", "delete", "-f", id], CTR_TIMEOUT);
                let _ = c.ctr_with_timeout(["container", "delete", id], CTR_TIMEOUT);
            });
        }
    });
}

/// Idle-pod memory at one pod count.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemoryStep {
    pub target: usize,
    pub running: usize,
    pub cost: PodsCost,
    /// Host CPU per idle pod, as a fraction of one core, over [`IDLE_CPU_WINDOW`].
    #[serde(default)]
    pub cpu_per_pod: Option<f64>,
}

/// How long the CPU time of idle pods is sampled: guest timers fire every few seconds, so shorter samples vary
/// by a third from one to the next.
pub const IDLE_CPU_WINDOW: std::time::Duration = std::time::Duration::from_secs(20);

/// Idle-pod memory of one runtime at growing pod counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemoryRun {
    pub runtime: String,
    pub steps: Vec<MemoryStep>,
    pub failures: Vec<String>,
    /// Wall time of all starts (2 at a time).
    pub start_wall_s: f64,
}

/// Starts idle pods 2 at a time up to each of `targets`, letting them settle, then sums their host PSS.
pub fn idle_memory(
    stage: &Stage,
    runtime: Runtime,
    targets: &[usize],
    settle: std::time::Duration,
    interrupt: &Interrupt,
) -> Result<MemoryRun> {
    idle_memory_with(stage, runtime, targets, settle, interrupt, || 0.0).map(|(run, _)| run)
}

/// [`idle_memory`], also returning what `extra` reads with the most pods running (before they go).
pub fn idle_memory_with(
    stage: &Stage,
    runtime: Runtime,
    targets: &[usize],
    settle: std::time::Duration,
    interrupt: &Interrupt,
    extra: impl Fn() -> f64,
) -> Result<(MemoryRun, f64)> {
    let mut extra_value = 0.0;
    let mut run = MemoryRun { runtime: runtime.label().to_owned(), ..Default::default() };
    let mut running: Vec<String> = Vec::new();
    let result = (|| -> Result<()> {
        for &target in targets {
            let ids: Vec<String> =
                (running.len()..target).map(|_| unique_id(&format!("idle-{}", runtime.label()))).collect();
            let (started, failures, wall) = start_pods(stage, runtime, &ids, 2, interrupt);
            run.start_wall_s += wall;
            running.extend(started);
            run.failures.extend(failures);
            interrupt.check()?;
            std::thread::sleep(settle);
            let cost = pods_cost(stage.containerd.address(), &running);
            let cpu_per_pod = pods_cpu(stage.containerd.address(), &running, IDLE_CPU_WINDOW);
            eprintln!(
                "  {} idle pods: {} running, {:.1} MiB PSS per pod, {:.2}% of a core per pod",
                runtime.label(),
                cost.pods,
                cost.pss_per_pod_mib(),
                cpu_per_pod.unwrap_or(0.0) * 100.0
            );
            run.steps.push(MemoryStep { target, running: running.len(), cost, cpu_per_pod });
            extra_value = extra();
            if !run.failures.is_empty() {
                break;
            }
        }
        Ok(())
    })();
    delete_pods(stage, &running, 2);
    result.map(|()| (run, extra_value))
}

/// How fast pods start when `concurrency` are started at a time, until `target` or the first failure.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Density {
    pub runtime: String,
    pub concurrency: usize,
    pub target: usize,
    pub started: usize,
    pub wall_s: f64,
    pub pods_per_s: f64,
    pub failures: Vec<String>,
    /// How many of the started pods got their VM from the warm cache (counted in containerd's log), when a cache
    /// server ran.
    #[serde(default)]
    pub from_cache: Option<usize>,
}

pub fn density(stage: &Stage, runtime: Runtime, concurrency: usize, target: usize, interrupt: &Interrupt) -> Density {
    let ids: Vec<String> = (0..target).map(|_| unique_id(&format!("dens-{}", runtime.label()))).collect();
    let (started, failures, wall_s) = start_pods(stage, runtime, &ids, concurrency, interrupt);
    delete_pods(stage, &started, 2);
    Density {
        runtime: runtime.label().to_owned(),
        concurrency,
        target,
        started: started.len(),
        wall_s,
        pods_per_s: if wall_s > 0.0 { started.len() as f64 / wall_s } else { 0.0 },
        failures,
        from_cache: None,
    }
}

/// [`density`] with a VM cache server running: also counts the pods whose VM came from the cache.
pub fn density_from_cache(stage: &Stage, concurrency: usize, target: usize, interrupt: &Interrupt) -> Density {
    let before = cache_handovers(stage);
    let mut d = density(stage, Runtime::Kata, concurrency, target, interrupt);
    d.from_cache = Some(cache_handovers(stage).saturating_sub(before));
    d
}

/// The VMs handed over by the cache so far, from the shims' lines in containerd's log.
fn cache_handovers(stage: &Stage) -> usize {
    timeline::parse(&stage.containerd.log()).iter().filter(|l| l.msg.starts_with("VM from the cache ")).count()
}

/// `ctr task exec ... true` latency in one running container per runtime.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecLatency {
    pub kata_s: Vec<f64>,
    pub runc_s: Vec<f64>,
    pub failures: Vec<String>,
}

pub fn exec_latency(stage: &Stage, n: usize, interrupt: &Interrupt) -> Result<ExecLatency> {
    let mut r = ExecLatency::default();
    for runtime in [Runtime::Kata, Runtime::Runc] {
        interrupt.check()?;
        let id = unique_id(&format!("exec-{}", runtime.label()));
        if let Err(e) = ctr_run(stage, runtime, &id, true, &[], &["sleep", "3600"]) {
            r.failures.push(format!("{e:#}"));
            continue;
        }
        for i in 0..n {
            if interrupt.check().is_err() {
                break;
            }
            let exec_id = format!("e{i}");
            let t0 = Instant::now();
            let out =
                stage.containerd.ctr_with_timeout(["task", "exec", "--exec-id", &exec_id, &id, "true"], CTR_TIMEOUT);
            let secs = t0.elapsed().as_secs_f64();
            match out {
                Ok(o) if o.status.success() => match runtime {
                    Runtime::Kata => r.kata_s.push(secs),
                    Runtime::Runc => r.runc_s.push(secs),
                },
                Ok(o) => r.failures.push(format!("{} exec: {} {}", runtime.label(), o.status, text(&o.stderr))),
                Err(e) => r.failures.push(format!("{} exec: {e}", runtime.label())),
            }
        }
        delete_pods(stage, &[id], 1);
    }
    interrupt.check()?;
    Ok(r)
}

/// Bytes and seconds from `dd`'s summary (busybox: `67108864 bytes (64.0MB) copied, 0.51 seconds, ...`;
/// GNU: `67108864 bytes (67 MB, 64 MiB) copied, 0.0123 s, 5.4 GB/s`); returns MB/s (10^6 bytes).
pub fn parse_dd(output: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.contains("bytes") && l.contains("copied"))?;
    let bytes: f64 = line.split_whitespace().next()?.parse().ok()?;
    let after = line.split("copied,").nth(1)?;
    let secs: f64 = after.split_whitespace().next()?.parse().ok()?;
    (secs > 0.0).then(|| bytes / secs / 1e6)
}

/// Seconds from the shell's `time` (busybox: `real\t0m 0.51s`; bash: `real\t0m0.510s`).
pub fn parse_time_real(output: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.trim_start().starts_with("real"))?;
    let value: String = line.trim_start().trim_start_matches("real").split_whitespace().collect();
    let (min, sec) = value.split_once('m')?;
    Some(min.parse::<f64>().ok()? * 60.0 + sec.trim_end_matches('s').parse::<f64>().ok()?)
}

/// Reads `dir/f` with `dd bs=1M` in a fresh container (bind mount at /data), `runs` times; MB/s each.
/// busybox's `dd` prints no timing here, so the shell's `time` (10 ms resolution) times it; `repeat`
/// reads per container lengthen what is timed when one read is faster than that (runc reads the host's
/// page cache). A kata guest is timed on its first, cold read: later ones may hit the guest's cache.
pub fn container_read(
    stage: &Stage,
    runtime: Runtime,
    dir: &Path,
    runs: usize,
    repeat: usize,
    interrupt: &Interrupt,
) -> Result<Vec<f64>> {
    let repeat = repeat.max(1);
    let bytes = std::fs::metadata(dir.join("f"))?.len() as f64 * repeat as f64;
    let script = format!("time sh -c 'for i in $(seq {repeat}); do dd if=/data/f of=/dev/null bs=1M; done'");
    let mount = format!("type=bind,src={},dst=/data,options=rbind:ro", dir.display());
    let mut out = Vec::new();
    for _ in 0..runs {
        interrupt.check()?;
        let id = unique_id(&format!("fs-{}", runtime.label()));
        let (_, o) = ctr_run(stage, runtime, &id, false, &["--mount", &mount], &["sh", "-c", &script])?;
        let all = format!("{}\n{}", text(&o.stdout), text(&o.stderr));
        let mb_s = parse_dd(&all)
            .or_else(|| parse_time_real(&all).filter(|s| *s > 0.0).map(|s| bytes / s / 1e6))
            .ok_or_else(|| anyhow::anyhow!("no dd summary or time in {all:?}"))?;
        out.push(mb_s);
    }
    Ok(out)
}

/// The same `dd` on the host (the file is in the page cache after the first run).
pub fn host_read(file: &Path, runs: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let o = std::process::Command::new("dd")
            .arg(format!("if={}", file.display()))
            .args(["of=/dev/null", "bs=1M"])
            .output()?;
        let all = String::from_utf8_lossy(&o.stderr).into_owned();
        out.push(parse_dd(&all).ok_or_else(|| anyhow::anyhow!("no dd summary in {all:?}"))?);
    }
    Ok(out)
}

/// A 64 MiB file of pseudo-random bytes (not zeros, so nothing can shortcut it) in a new directory.
pub fn make_read_file(mib: usize) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("kata-bench-fs-").tempdir()?;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = vec![0u8; mib << 20];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(dir.path().join("f"), data)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_busybox_and_gnu_dd() {
        let bb = "64+0 records in\n64+0 records out\n67108864 bytes (64.0MB) copied, 0.500000 seconds, 128.0MB/s\n";
        assert!((parse_dd(bb).expect("busybox") - 134.217728).abs() < 1e-6);
        let gnu = "64+0 records in\n64+0 records out\n67108864 bytes (67 MB, 64 MiB) copied, 0.25 s, 268 MB/s\n";
        assert!((parse_dd(gnu).expect("gnu") - 268.435456).abs() < 1e-6);
        assert!(parse_dd("nothing").is_none());
        assert_eq!(parse_time_real("64+0 records out\nreal\t0m 0.50s\nuser\t0m 0.01s"), Some(0.5));
        assert_eq!(parse_time_real("real\t1m2.500s\n"), Some(62.5));
    }
}
