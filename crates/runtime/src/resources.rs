//! How big a pod's VM is: `default_vcpus` and `default_memory` for the guest itself, plus what the workload is
//! limited to (the CPU and memory limits of its containers, or the pod's own sizing that containerd's CRI
//! plugin passes with the sandbox), capped by `default_maxvcpus`, `default_maxmemory` and the host.
//!
//! A limit comes from the pod spec, which is untrusted: every sum saturates, nonsense (a zero period, a
//! negative quota) means "no limit", and the caps bound whatever is asked.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxResources, Spec};
use serde::{Deserialize, Serialize};
use types::config::{Config, HostLimits};

/// containerd's CRI plugin passes the pod's sizing (`LinuxPodSandboxConfig.resources`) on the sandbox container.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1024 * 1024;

/// A container's (or a pod's) limits: CPU in thousandths of a CPU, memory in MiB; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub milli_cpus: u64,
    pub memory_mib: u64,
}

impl Limits {
    /// The limits in OCI `LinuxResources`: `cpu.quota / cpu.period` and `memory.limit`, each rounded up.
    pub fn of_resources(resources: &LinuxResources) -> Self {
        let cpu = resources.cpu().as_ref();
        let quota = cpu.and_then(|c| c.quota()).unwrap_or(0);
        let period = cpu.and_then(|c| c.period()).unwrap_or(0);
        let memory = resources.memory().as_ref().and_then(|m| m.limit()).unwrap_or(0);
        Self::from_numbers(quota, period, memory)
    }

    /// The limits of a container's spec (`linux.resources`); none when it has no such section.
    pub fn of_spec(spec: &Spec) -> Self {
        spec.linux().as_ref().and_then(|l| l.resources().as_ref()).map(Self::of_resources).unwrap_or_default()
    }

    /// The pod's sizing from the CRI plugin's sandbox annotations, when it passed any. A value that is not a
    /// number is an error naming the annotation (containerd writes numbers; anything else is tampering).
    pub fn of_pod_annotations(annotations: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        let read = |key: &str| -> Result<Option<i64>, String> {
            annotations
                .get(key)
                .map(|v| v.trim().parse::<i64>().map_err(|_| format!("annotation {key} = {v:.40?} is not a number")))
                .transpose()
        };
        let (quota, period, memory) = (read(SANDBOX_CPU_QUOTA)?, read(SANDBOX_CPU_PERIOD)?, read(SANDBOX_MEMORY)?);
        if quota.is_none() && period.is_none() && memory.is_none() {
            return Ok(None);
        }
        let period = u64::try_from(period.unwrap_or(0)).unwrap_or(0);
        Ok(Some(Self::from_numbers(quota.unwrap_or(0), period, memory.unwrap_or(0))))
    }

    /// These limits after an update: what `resources` sets replaces, what it leaves out stays.
    pub fn updated(self, resources: &LinuxResources) -> Self {
        let new = Self::of_resources(resources);
        let cpu = resources.cpu().as_ref();
        let sets_cpu = cpu.is_some_and(|c| c.quota().is_some() || c.period().is_some());
        let sets_memory = resources.memory().as_ref().is_some_and(|m| m.limit().is_some());
        Limits {
            milli_cpus: if sets_cpu { new.milli_cpus } else { self.milli_cpus },
            memory_mib: if sets_memory { new.memory_mib } else { self.memory_mib },
        }
    }

    fn from_numbers(quota: i64, period: u64, memory_bytes: i64) -> Self {
        let milli_cpus = match u64::try_from(quota) {
            Ok(quota) if quota > 0 && period > 0 => quota.saturating_mul(1000).div_ceil(period),
            _ => 0,
        };
        let memory_mib = u64::try_from(memory_bytes).map(|b| b.div_ceil(MIB)).unwrap_or(0);
        Limits { milli_cpus, memory_mib }
    }

    fn add(self, other: Limits) -> Limits {
        Limits {
            milli_cpus: self.milli_cpus.saturating_add(other.milli_cpus),
            memory_mib: self.memory_mib.saturating_add(other.memory_mib),
        }
    }
}

/// What a front end knows of a sandbox's resources from its own container's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxResources {
    /// The sandbox container's `linux.cgroupsPath`: the pod's cgroup on the host.
    pub cgroups_path: Option<String>,
    /// The pod's sizing, from the CRI plugin's sandbox annotations.
    pub pod: Option<Limits>,
    /// The sandbox container's own limits when it is the workload (a `ctr` task); none for a CRI pod's
    /// sandbox container, whose pod sizing covers the pod.
    pub own: Limits,
}

impl SandboxResources {
    pub fn of_spec(spec: &Spec) -> Result<Self, String> {
        let annotations: BTreeMap<String, String> =
            spec.annotations().clone().unwrap_or_default().into_iter().collect();
        let pod = Limits::of_pod_annotations(&annotations)?;
        let own = if pod.is_some() { Limits::default() } else { Limits::of_spec(spec) };
        let cgroups_path =
            spec.linux().as_ref().and_then(|l| l.cgroups_path().as_ref()).map(|p| p.display().to_string());
        Ok(SandboxResources { cgroups_path, pod, own })
    }
}

/// A VM's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl Size {
    /// Whether `self` holds at least `other` in both dimensions.
    pub fn covers(&self, other: &Size) -> bool {
        self.vcpus >= other.vcpus && self.memory_mib >= other.memory_mib
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPUs and {} MiB", self.vcpus, self.memory_mib)
    }
}

/// The sizing rules of one sandbox, fixed when it starts (persisted with it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizing {
    /// `default_vcpus` and `default_memory`: the guest's own share.
    pub base: Size,
    /// The largest the VM may become: `default_maxvcpus` / `default_maxmemory` (0: the host's), at most the host.
    pub max: Size,
    /// The pod's sizing from the CRI plugin's annotations; when present it covers the pod's containers.
    #[serde(default)]
    pub pod: Option<Limits>,
}

impl Sizing {
    pub fn new(config: &Config, host: &HostLimits, pod: Option<Limits>) -> Self {
        let hv = &config.hypervisor;
        let host_memory = u32::try_from(host.memory_mib).unwrap_or(u32::MAX);
        let cap = |configured: u32, host: u32| if configured == 0 { host } else { configured.min(host) };
        let max = Size {
            vcpus: cap(hv.default_maxvcpus, host.cpus).max(1),
            memory_mib: cap(hv.default_maxmemory, host_memory),
        };
        let base =
            Size { vcpus: hv.default_vcpus.clamp(1, max.vcpus), memory_mib: hv.default_memory.min(max.memory_mib) };
        Sizing { base, max, pod }
    }

    /// What the workload asks for: the pod's sizing, or the containers' limits summed when they ask more.
    pub fn workload(&self, containers: impl IntoIterator<Item = Limits>) -> Limits {
        let sum = containers.into_iter().fold(Limits::default(), Limits::add);
        let pod = self.pod.unwrap_or_default();
        Limits { milli_cpus: pod.milli_cpus.max(sum.milli_cpus), memory_mib: pod.memory_mib.max(sum.memory_mib) }
    }

    /// The VM size for a workload: the base plus its CPUs (rounded up) and memory, capped at the maximum.
    pub fn target(&self, workload: Limits) -> Size {
        let (vcpus, memory) = self.uncapped(workload);
        Size {
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX).min(self.max.vcpus),
            memory_mib: u32::try_from(memory).unwrap_or(u32::MAX).min(self.max.memory_mib),
        }
    }

    /// Whether the workload was cut down to fit the maximum.
    pub fn capped(&self, workload: Limits) -> bool {
        let (vcpus, memory) = self.uncapped(workload);
        vcpus > u64::from(self.max.vcpus) || memory > u64::from(self.max.memory_mib)
    }

    /// The base plus the workload's CPUs (rounded up) and memory, before the maximum.
    fn uncapped(&self, workload: Limits) -> (u64, u64) {
        let vcpus = u64::from(self.base.vcpus).saturating_add(workload.milli_cpus.div_ceil(1000));
        let memory = u64::from(self.base.memory_mib).saturating_add(workload.memory_mib);
        (vcpus, memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).expect("LinuxResources")
    }

    fn sizing(text: &str, pod: Option<Limits>) -> Sizing {
        let config = types::config::LoadedConfig::from_sources(&[("c.toml".into(), text.to_string())])
            .expect("config loads")
            .config;
        Sizing::new(&config, &HostLimits { memory_mib: 8192, cpus: 4 }, pod)
    }

    #[test]
    fn limits_round_up() {
        let r = resources(r#"{"cpu":{"quota":150000,"period":100000},"memory":{"limit":536870913}}"#);
        assert_eq!(Limits::of_resources(&r), Limits { milli_cpus: 1500, memory_mib: 513 });
        let r = resources(r#"{"cpu":{"quota":1,"period":100000}}"#);
        assert_eq!(Limits::of_resources(&r).milli_cpus, 1);
    }

    #[test]
    fn nonsense_limits_mean_none() {
        for json in [
            r#"{"cpu":{"quota":-1,"period":100000},"memory":{"limit":-1}}"#,
            r#"{"cpu":{"quota":100000,"period":0}}"#,
            r#"{"cpu":{"shares":1024}}"#,
            r#"{}"#,
        ] {
            assert_eq!(Limits::of_resources(&resources(json)), Limits::default(), "{json}");
        }
        let huge = resources(r#"{"cpu":{"quota":9223372036854775807,"period":1}}"#);
        assert_eq!(Limits::of_resources(&huge).milli_cpus, u64::MAX, "saturates instead of wrapping");
    }

    #[test]
    fn pod_annotations() {
        let mut a = BTreeMap::new();
        assert_eq!(Limits::of_pod_annotations(&a), Ok(None));
        a.insert(SANDBOX_CPU_QUOTA.to_string(), "200000".to_string());
        a.insert(SANDBOX_CPU_PERIOD.to_string(), "100000".to_string());
        a.insert(SANDBOX_MEMORY.to_string(), "1073741824".to_string());
        assert_eq!(Limits::of_pod_annotations(&a), Ok(Some(Limits { milli_cpus: 2000, memory_mib: 1024 })));
        a.insert(SANDBOX_MEMORY.to_string(), "lots".to_string());
        let err = Limits::of_pod_annotations(&a).unwrap_err();
        assert!(err.contains(SANDBOX_MEMORY) && err.contains("not a number"), "{err}");
    }

    #[test]
    fn the_vm_is_the_base_plus_the_workload() {
        let s = sizing("[hypervisor.qemu]\ndefault_memory = 256\n", None);
        assert_eq!(s.base, Size { vcpus: 1, memory_mib: 256 });
        assert_eq!(s.max, Size { vcpus: 4, memory_mib: 8192 }, "0 maxima mean the host's");
        let two = Limits { milli_cpus: 1500, memory_mib: 512 };
        let one = Limits { milli_cpus: 500, memory_mib: 0 };
        let workload = s.workload([two, one]);
        assert_eq!(workload, Limits { milli_cpus: 2000, memory_mib: 512 });
        assert_eq!(s.target(workload), Size { vcpus: 3, memory_mib: 768 });
        assert_eq!(s.target(Limits::default()), s.base);
    }

    #[test]
    fn the_pod_sizing_covers_its_containers_unless_they_ask_more() {
        let s =
            sizing("[hypervisor.qemu]\ndefault_memory = 256\n", Some(Limits { milli_cpus: 2000, memory_mib: 1024 }));
        assert_eq!(
            s.workload([Limits { milli_cpus: 1000, memory_mib: 512 }]),
            Limits { milli_cpus: 2000, memory_mib: 1024 }
        );
        assert_eq!(s.workload([Limits { milli_cpus: 1000, memory_mib: 2048 }]).memory_mib, 2048);
    }

    #[test]
    fn the_maximum_caps_the_vm() {
        let s =
            sizing("[hypervisor.qemu]\ndefault_memory = 256\ndefault_maxvcpus = 2\ndefault_maxmemory = 1024\n", None);
        let big = Limits { milli_cpus: 8000, memory_mib: 4096 };
        assert_eq!(s.target(big), Size { vcpus: 2, memory_mib: 1024 });
        assert!(s.capped(big));
        assert!(!s.capped(Limits { milli_cpus: 1000, memory_mib: 768 }));
        let host_bound = sizing("[hypervisor.qemu]\ndefault_maxvcpus = 64\n", None);
        assert_eq!(host_bound.max.vcpus, 4, "never more than the host has");
    }
}
