//! `kata-runtime env`: the resolved configuration and where each value came from.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use runtime::placement::HOST_OVERHEAD_MIB;
use runtime::resources::{Size, Sizing};
use serde::Serialize;
use types::config::{ConfigSearch, Setting};

#[derive(Debug, Serialize)]
struct EnvReport {
    files: Vec<PathBuf>,
    warnings: Vec<String>,
    settings: Vec<Setting>,
    sizing: SizingReport,
}

/// The effective sizing rules of a pod VM under this configuration on this host (docs/resources.md).
#[derive(Debug, Serialize)]
struct SizingReport {
    /// `default_vcpus` / `default_memory`: the guest's own share, to which the pod's limits are added.
    base: Size,
    /// The largest a VM may be: the maxima, capped by the host.
    max: Size,
    /// Whether a running VM grows when containers need more, and why (not).
    grows: bool,
    grows_why: String,
    /// Where the VMM and its helpers are accounted on the host.
    host_cgroups: String,
    /// Added to the VM's memory in the pod cgroup's limit.
    host_overhead_mib: u64,
}

fn sizing(config: &types::config::Config) -> Result<SizingReport> {
    let host = types::config::HostLimits::detect()?;
    let sizing = Sizing::new(config, &host, None);
    let (grows, grows_why) = if config.runtime.static_sandbox_resource_mgmt {
        (false, "runtime.static_sandbox_resource_mgmt = true: sized at start only".to_string())
    } else if config.hypervisor.machine_type == "microvm" {
        (false, "machine_type \"microvm\" cannot hot-plug CPUs or memory: sized at start only".to_string())
    } else {
        (true, format!("machine_type {:?}: CPU and memory hotplug up to the maximum", config.hypervisor.machine_type))
    };
    let host_cgroups = match config.runtime.sandbox_cgroup_only {
        true => {
            "sandbox_cgroup_only = true: the shim, QEMU, virtiofsd and the vsock helper in the pod's cgroup".to_string()
        }
        false => "sandbox_cgroup_only = false: the vCPU threads in the pod's cgroup (all of QEMU on cgroup v2), \
                  the shim and helpers in kata_overhead/<sandbox>"
            .to_string(),
    };
    Ok(SizingReport {
        base: sizing.base,
        max: sizing.max,
        grows,
        grows_why,
        host_cgroups,
        host_overhead_mib: HOST_OVERHEAD_MIB,
    })
}

pub fn run(config_path: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let loaded = ConfigSearch::standard(config_path).load()?;
    let report = EnvReport {
        files: loaded.files.clone(),
        warnings: loaded.warnings.clone(),
        settings: loaded.settings(),
        sizing: sizing(&loaded.config)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for f in &report.files {
        println!("# file: {}", f.display());
    }
    for w in &report.warnings {
        println!("# warning: {w}");
    }
    for s in &report.settings {
        println!("{} = {}    # {}", s.key, s.value, s.origin);
    }
    let z = &report.sizing;
    println!("# sizing: a pod's VM is {} plus the pod's limits (containerd's sandbox sizing, or its", z.base);
    println!("#   containers' CPU quota/period rounded up and memory limits), at most {}", z.max);
    println!("# growing: {}", z.grows_why);
    println!("# host cgroups: {}", z.host_cgroups);
    println!(
        "# pod cgroup limits: memory = the VM's + {} MiB when the pod has a memory limit; CPU = the VM's vCPUs when it has a CPU limit",
        z.host_overhead_mib
    );
    Ok(ExitCode::SUCCESS)
}
