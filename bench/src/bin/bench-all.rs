//! One command for every kata-rs benchmark, kata side by side with runc on the same private containerd and
//! image: cold start (+ boot breakdown and the bare QEMU floor), exec latency, host memory per idle pod,
//! start density and rate, shared-filesystem read (virtio-fs, 9p), host -> pod TCP throughput, and start,
//! memory and density again with pods cloned from a VM template.
//! Writes `bench/results/latest.{md,json,png}`.
//!
//! usage: bench-all [--quick] [--runs N] [--only floor,cold,exec,memory,density,fs,net,template,resources] [--out DIR]
//!        bench-all --redraw results/latest.json [--out DIR]
//! Parts from KATA_TEST_KERNEL, KATA_TEST_INITRD, KATA_TEST_VIRTIOFSD, KATA_TEST_VSOCK_DAEMON, KATA_TEST_SHIM_DIR.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::floor::{boot_floor, BootParts};
use bench::measure::{self, MemoryRun};
use bench::report::{
    FsRead, Machine, Results, TemplateResults, CLONE_MEMORY_STEPS, TARGET_CLONED_PODS, TARGET_IDLE_PODS,
};
use bench::stage::{CriStage, Runtime, SharedFsKind, Stage};
use bench::{chart, network, Interrupt};
use clap::Parser;
use e2e::kata::KataParts;

#[derive(Debug, Parser)]
#[command(about = "kata-rs benchmarks, kata vs runc")]
struct Args {
    /// 3 runs per latency instead of 10, one shared-fs and network transfer, density at concurrency 4 only.
    #[arg(long)]
    quick: bool,
    /// Runs per latency measurement (default 10, or 3 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Comma-separated stages to run (default all): floor, cold, exec, memory, density, fs, net, template, cache,
    /// resources.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Render the Markdown and the chart again from a saved `latest.json` instead of measuring.
    #[arg(long, value_name = "JSON")]
    redraw: Option<PathBuf>,
    /// Where latest.md, latest.json and latest.png go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

const STAGES: &[&str] = &["floor", "cold", "exec", "memory", "density", "fs", "net", "template", "cache", "resources"];

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine(parts: &KataParts, quick: bool) -> Machine {
    let kata_runtime = e2e::find_in_path("kata-runtime".as_ref())
        .or_else(|| Some(parts.shim_dir.join("kata-runtime")).filter(|p| p.is_file()));
    let accelerator = kata_runtime
        .and_then(|p| command_output(&p.to_string_lossy(), &["check", "--json"]))
        .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        .and_then(|v| v["accelerator"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown (kata-runtime not installed)".to_owned());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    Machine {
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu,
        host_kernel: command_output("uname", &["-r"]).unwrap_or_default(),
        accelerator,
        guest_kernel: parts.kernel_release().unwrap_or_else(|| "unknown".to_owned()),
        load_before: load(),
        load_after: String::new(),
        quick,
    }
}

/// Runs one stage; a failure is recorded and the run goes on, an interrupt ends it.
fn stage<T>(
    results: &mut Results,
    name: &str,
    interrupt: &Interrupt,
    f: impl FnOnce() -> Result<T>,
) -> Result<Option<T>> {
    eprintln!("== {name}");
    let t0 = Instant::now();
    let r = f();
    eprintln!("   ({name}: {:.0} s)", t0.elapsed().as_secs_f64());
    interrupt.check()?;
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            eprintln!("   {name} failed: {e:#}");
            results.stage_errors.push(format!("{name}: {e:#}"));
            Ok(None)
        }
    }
}

fn run(args: &Args, parts: &KataParts, interrupt: &Interrupt, results: &mut Results) -> Result<()> {
    let wants = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let n = args.runs.unwrap_or(if args.quick { 3 } else { 10 });
    let io_runs = if args.quick { 1 } else { 3 };
    if wants("floor") {
        let rt = tokio::runtime::Runtime::new()?;
        let boot = BootParts::from_kata(parts);
        if let Some(samples) =
            stage(results, "bare QEMU boot floor", interrupt, || rt.block_on(boot_floor(n, &boot, interrupt)))?
        {
            results.floor = samples;
        }
    }
    if ["cold", "exec", "memory", "density", "fs", "resources"].iter().any(|s| wants(s)) {
        let virtiofs = Stage::start(parts, SharedFsKind::VirtioFs)?;
        if wants("resources") {
            results.resources = stage(results, "pods sized by limits", interrupt, || {
                bench::resources::measure(&virtiofs, n, interrupt)
            })?;
        }
        if wants("cold") {
            results.cold = stage(results, "cold start", interrupt, || measure::cold_start(&virtiofs, n, interrupt))?;
        }
        if wants("exec") {
            results.exec =
                stage(results, "exec latency", interrupt, || measure::exec_latency(&virtiofs, n, interrupt))?;
        }
        if wants("memory") {
            for runtime in [Runtime::Kata, Runtime::Runc] {
                let settle = Duration::from_secs(if runtime == Runtime::Kata { 3 } else { 1 });
                let m: Option<MemoryRun> =
                    stage(results, &format!("idle memory {}", runtime.label()), interrupt, || {
                        measure::idle_memory(&virtiofs, runtime, &[1, 10, TARGET_IDLE_PODS], settle, interrupt)
                    })?;
                results.memory.extend(m);
            }
        }
        if wants("density") {
            // Issue 16 asks for a 100-pod row for booted VMs too; runc beside it at the same count.
            let runs = if args.quick {
                vec![(Runtime::Kata, 4, TARGET_IDLE_PODS), (Runtime::Runc, 4, TARGET_IDLE_PODS)]
            } else {
                vec![
                    (Runtime::Kata, 2, TARGET_IDLE_PODS),
                    (Runtime::Kata, 4, TARGET_CLONED_PODS),
                    (Runtime::Runc, 4, TARGET_CLONED_PODS),
                ]
            };
            for (runtime, c, target) in runs {
                let d = stage(results, &format!("density {} x{c} to {target}", runtime.label()), interrupt, || {
                    Ok(measure::density(&virtiofs, runtime, c, target, interrupt))
                })?;
                results.density.extend(d);
            }
        }
        if wants("fs") {
            let mib = 64;
            results.fs_read_mib = mib;
            let file = measure::make_read_file(mib)?;
            let host = measure::host_read(&file.path().join("f"), io_runs.max(3));
            results.fs_read.push(fs_row("host (page cache)", host));
            let r = measure::container_read(&virtiofs, Runtime::Runc, file.path(), io_runs, 32, interrupt);
            results.fs_read.push(fs_row("runc container (bind mount, 32 reads)", r));
            let r = measure::container_read(&virtiofs, Runtime::Kata, file.path(), io_runs, 1, interrupt);
            results.fs_read.push(fs_row("kata guest, virtio-fs", r));
            interrupt.check()?;
            drop(virtiofs);
            let r = Stage::start(parts, SharedFsKind::NineP)
                .and_then(|ninep| measure::container_read(&ninep, Runtime::Kata, file.path(), io_runs, 1, interrupt));
            results.fs_read.push(fs_row("kata guest, 9p", r));
            interrupt.check()?;
        }
    }
    if wants("template") {
        results.template = stage(results, "VM templating", interrupt, || templating(parts, n, args.quick, interrupt))?;
    }
    if wants("cache") {
        let cached = stage(results, "VM cache", interrupt, || cached_start(parts, n, !args.quick, interrupt))?;
        let t = results.template.get_or_insert_with(Default::default);
        if let Some((start, density)) = cached {
            t.cached = Some(start);
            t.cached_density = density;
        }
    }
    if wants("net") {
        let mib = if args.quick { 16 } else { 64 };
        results.net_mib = mib;
        let net = stage(results, "network", interrupt, || {
            let cri = CriStage::start(parts)?;
            network::tcp_throughput(&cri, mib, io_runs, interrupt)
        })?;
        results.net = net.unwrap_or_default();
    }
    Ok(())
}

/// Start latency, idle memory and density again, with pods cloned from a VM template.
fn templating(parts: &KataParts, n: usize, quick: bool, interrupt: &Interrupt) -> Result<TemplateResults> {
    let stage = Stage::templated(parts)?;
    let templates = stage.templates().context("templated stage")?;
    let mut t = TemplateResults { first_s: Some(measure::first_run(&stage)?), ..Default::default() };
    interrupt.check()?;
    t.cold = Some(measure::cold_start(&stage, n, interrupt)?);
    let steps: &[usize] = if quick { &[1, 10] } else { &CLONE_MEMORY_STEPS };
    let memory = measure::idle_memory_with(&stage, Runtime::Kata, steps, Duration::from_secs(3), interrupt, || {
        measure::template_mib(&templates)
    })?;
    t.template_mib = memory.1;
    t.memory = Some(memory.0);
    interrupt.check()?;
    t.density =
        Some(measure::density(&stage, Runtime::Kata, 4, if quick { 10 } else { TARGET_CLONED_PODS }, interrupt));
    Ok(t)
}

/// `ctr run` with a VM from the warm cache: one cached VM per kind, and each kata run waits (untimed) until the
/// server has made the next one. With `density`, then 100 pods started 4 at a time with the server running.
fn cached_start(
    parts: &KataParts,
    n: usize,
    density: bool,
    interrupt: &Interrupt,
) -> Result<(bench::measure::ColdStart, Option<bench::measure::Density>)> {
    let stage = Stage::cached(parts, 1)?;
    let wait_ready = || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while stage.cache_ready(parts) < 2 && Instant::now() < deadline && interrupt.check().is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_ready();
    if stage.cache_ready(parts) < 2 {
        bail!("the VM cache server did not fill in 300 s");
    }
    let start = measure::cold_start_with(&stage, n, interrupt, wait_ready)?;
    if !density {
        return Ok((start, None));
    }
    wait_ready();
    Ok((start, Some(measure::density_from_cache(&stage, 4, TARGET_CLONED_PODS, interrupt))))
}

fn fs_row(label: &str, r: Result<Vec<f64>>) -> FsRead {
    eprintln!("  fs read {label}: {r:?}");
    match r {
        Ok(v) => FsRead { label: label.to_owned(), mb_per_s: v, error: None },
        Err(e) => FsRead { label: label.to_owned(), mb_per_s: vec![], error: Some(format!("{e:#}")) },
    }
}

/// Every stage `args` asks for; the results so far even when the run stopped early.
fn measure_all(args: &Args) -> Result<(Results, Result<()>)> {
    if let Some(reason) = e2e::skip_reason() {
        bail!("cannot run: {reason}");
    }
    let parts = KataParts::find().map_err(|e| anyhow::anyhow!("kata parts: {e}"))?;
    let interrupt = Interrupt::install()?;
    let mut results = Results { machine: machine(&parts, args.quick), ..Default::default() };
    let outcome = run(args, &parts, &interrupt, &mut results);
    results.machine.load_after = load();
    if let Err(e) = &outcome {
        results.stage_errors.push(format!("run stopped: {e:#}"));
    }
    Ok((results, outcome))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(bad) = args.only.iter().find(|s| !STAGES.contains(&s.as_str())) {
        bail!("unknown stage {bad:?} in --only (stages: {})", STAGES.join(", "));
    }
    let (results, outcome) = match &args.redraw {
        Some(json) => {
            let text = std::fs::read_to_string(json).with_context(|| format!("read {}", json.display()))?;
            (serde_json::from_str::<Results>(&text).with_context(|| format!("parse {}", json.display()))?, Ok(()))
        }
        None => measure_all(&args)?,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let md = args.out.join("latest.md");
    let json = args.out.join("latest.json");
    let png = args.out.join("latest.png");
    let text = results.markdown();
    std::fs::write(&md, &text).with_context(|| format!("write {}", md.display()))?;
    std::fs::write(&json, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("write {}", json.display()))?;
    let chart = chart::draw(&results, &png);
    println!("{text}");
    println!("results: {}\n         {}", md.display(), json.display());
    match chart {
        Ok(()) => println!("chart:   {}", png.display()),
        Err(e) => println!("chart not drawn: {e:#}"),
    }
    outcome
}
