//! The main job's demonstration: a private containerd with the installed kata-rs shim and configuration runs
//! containers from a locally built busybox image, each in its own VM, and prints what they print.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use e2e::kata::KATA_RUNTIME;
use e2e::{unique_id, Containerd, ContainerdOptions, OciImage, RunOptions, BUSYBOX_IMAGE};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kata-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    if let Some(reason) = e2e::skip_reason() {
        return Err(reason);
    }
    let containerd = Containerd::start(ContainerdOptions::default()).map_err(|e| e.to_string())?;
    let image = OciImage::busybox(BUSYBOX_IMAGE).map_err(|e| e.to_string())?;
    containerd.import(&image).map_err(|e| e.to_string())?;
    println!("containerd {} with image {BUSYBOX_IMAGE}", containerd.address().display());
    let opts = RunOptions { timeout: Duration::from_secs(180), ..RunOptions::runtime(KATA_RUNTIME) };
    for cmd in [&["uname", "-sr"][..], &["echo", "hello from a kata-rs VM"][..]] {
        let id = unique_id("demo");
        let started = Instant::now();
        let out = containerd.run(&opts, BUSYBOX_IMAGE, &id, cmd).map_err(|e| e.to_string())?;
        println!("$ ctr run --runtime {KATA_RUNTIME} --rm {BUSYBOX_IMAGE} {id} {}", cmd.join(" "));
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return Err(format!("ctr run failed ({}); containerd log:\n{}", out.status, containerd.log_tail(30)));
        }
        println!("  ({:.2} s, host kernel: {})", started.elapsed().as_secs_f64(), host_release());
    }
    let report = containerd.stop();
    if !report.remaining.is_empty() {
        return Err(format!("left behind:\n{}", report.remaining));
    }
    Ok(())
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}
