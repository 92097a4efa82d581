//! Bounds on the VM's size and the agent dial timeout: what the host has, what a pod may ask for
//! by annotation, and the ranges configuration files must keep.

use std::fs;
use std::io;

use super::load::LoadedConfig;
use super::origin::Origin;
use super::schema::{MAX_ANNOTATED_DIAL_TIMEOUT_SECS, MAX_DIAL_TIMEOUT_SECS, MIN_MEMORY_MIB};
use super::ConfigError;

/// What the host has: the limit behind Kata's "0 means the host's" for `default_maxmemory` and
/// `default_maxvcpus`. Passed in rather than read where it is used, so tests do not depend on the
/// machine they run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Total memory, MiB (`MemTotal` in `/proc/meminfo`).
    pub memory_mib: u64,
    /// CPUs this process may run on.
    pub cpus: u32,
}

impl HostLimits {
    /// Reads this host's limits.
    pub fn detect() -> io::Result<Self> {
        let meminfo = fs::read_to_string("/proc/meminfo")?;
        let memory_mib = mem_total_mib(&meminfo)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/meminfo has no MemTotal line"))?;
        let cpus = std::thread::available_parallelism()?.get();
        Ok(Self { memory_mib, cpus: u32::try_from(cpus).unwrap_or(u32::MAX) })
    }
}

/// `MemTotal:  24595884 kB` -> MiB.
fn mem_total_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let kib = line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok().map(|kib| kib / 1024)
    })
}

/// A configured maximum (`0` meaning the host's) resolved against what the host has: the limit
/// and why it is that, for the error message.
fn resolve_max(key: &str, configured: u32, origin: &Origin, host: u64, host_has: &str) -> (u64, String) {
    if configured == 0 {
        (host, format!("{key} = 0: {host_has}"))
    } else if u64::from(configured) > host {
        (host, format!("{host_has}: {key} = {configured} from {origin} is more"))
    } else {
        (u64::from(configured), format!("{key} = {configured} from {origin}"))
    }
}

impl LoadedConfig {
    /// The annotation that set `key`, if one did.
    fn annotation_for(&self, key: &str) -> Option<&str> {
        match self.origin(key) {
            Origin::Annotation { name } => Some(name),
            _ => None,
        }
    }

    /// Refuses annotated sizes and timeouts outside what the configuration and the host allow:
    /// `default_memory` in [`MIN_MEMORY_MIB`]..=`default_maxmemory` and the host's memory,
    /// `default_vcpus` in 1..=`default_maxvcpus` and the host's CPUs, `default_max_vcpus` up to the
    /// host's CPUs, `dial_timeout` in 1..=[`MAX_ANNOTATED_DIAL_TIMEOUT_SECS`].
    pub(crate) fn check_annotated_limits(&self, host: &HostLimits) -> Result<(), ConfigError> {
        let hv = &self.config.hypervisor;
        let refuse = |annotation: &str, value: u32, problem: String| {
            Err(ConfigError::AnnotationOutOfRange { annotation: annotation.to_owned(), value, problem })
        };
        if let Some(annotation) = self.annotation_for("hypervisor.qemu.default_memory") {
            let value = hv.default_memory;
            let (limit, why) = resolve_max(
                "hypervisor.qemu.default_maxmemory",
                hv.default_maxmemory,
                self.origin("hypervisor.qemu.default_maxmemory"),
                host.memory_mib,
                "the host's memory",
            );
            if value < MIN_MEMORY_MIB {
                return refuse(annotation, value, format!("less than the minimum of {MIN_MEMORY_MIB} MiB"));
            }
            if u64::from(value) > limit {
                return refuse(annotation, value, format!("more than the limit of {limit} MiB ({why})"));
            }
        }
        if let Some(annotation) = self.annotation_for("hypervisor.qemu.default_vcpus") {
            let value = hv.default_vcpus;
            let (limit, why) = resolve_max(
                "hypervisor.qemu.default_maxvcpus",
                hv.default_maxvcpus,
                self.origin("hypervisor.qemu.default_maxvcpus"),
                u64::from(host.cpus),
                "the host's CPUs",
            );
            if value < 1 {
                return refuse(annotation, value, "less than the minimum of 1 vCPU".to_owned());
            }
            if u64::from(value) > limit {
                return refuse(annotation, value, format!("more than the limit of {limit} vCPUs ({why})"));
            }
        }
        if let Some(annotation) = self.annotation_for("hypervisor.qemu.default_maxvcpus") {
            let value = hv.default_maxvcpus;
            if value > host.cpus {
                return refuse(
                    annotation,
                    value,
                    format!("more than the limit of {} vCPUs (the host's CPUs)", host.cpus),
                );
            }
            // An annotated count over the maximum was refused above, naming the count.
            if value != 0 && hv.default_vcpus > value {
                return refuse(
                    annotation,
                    value,
                    format!(
                        "less than hypervisor.qemu.default_vcpus = {} from {}",
                        hv.default_vcpus,
                        self.origin("hypervisor.qemu.default_vcpus")
                    ),
                );
            }
        }
        if let Some(annotation) = self.annotation_for("agent.kata.dial_timeout") {
            let value = self.config.agent.dial_timeout;
            if value < 1 {
                return refuse(annotation, value, "less than the minimum of 1 s".to_owned());
            }
            if value > MAX_ANNOTATED_DIAL_TIMEOUT_SECS {
                return refuse(
                    annotation,
                    value,
                    format!(
                        "more than the limit of {MAX_ANNOTATED_DIAL_TIMEOUT_SECS} s \
                         (the most a pod may ask for)"
                    ),
                );
            }
        }
        Ok(())
    }

    /// Range checks on configured values, one problem per line as `validate` reports them.
    pub(crate) fn validate_limits(&self, problems: &mut Vec<String>) {
        let hv = &self.config.hypervisor;
        let timeout = self.config.agent.dial_timeout;
        if !(1..=MAX_DIAL_TIMEOUT_SECS).contains(&timeout) {
            problems.push(format!(
                "{}: agent.kata.dial_timeout: {timeout} s is outside 1-{MAX_DIAL_TIMEOUT_SECS}",
                self.origin("agent.kata.dial_timeout")
            ));
        }
        if hv.default_maxmemory != 0 && hv.default_memory > hv.default_maxmemory {
            problems.push(format!(
                "{}: hypervisor.qemu.default_memory: {} MiB is more than \
                 hypervisor.qemu.default_maxmemory = {} ({})",
                self.origin("hypervisor.qemu.default_memory"),
                hv.default_memory,
                hv.default_maxmemory,
                self.origin("hypervisor.qemu.default_maxmemory")
            ));
        }
        if hv.default_maxvcpus != 0 && hv.default_vcpus > hv.default_maxvcpus {
            problems.push(format!(
                "{}: hypervisor.qemu.default_vcpus: {} is more than \
                 hypervisor.qemu.default_maxvcpus = {} ({})",
                self.origin("hypervisor.qemu.default_vcpus"),
                hv.default_vcpus,
                hv.default_maxvcpus,
                self.origin("hypervisor.qemu.default_maxvcpus")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_mib() {
        let meminfo = "MemFree:  100 kB\nMemTotal:       24595884 kB\nBuffers: 1 kB\n";
        assert_eq!(mem_total_mib(meminfo), Some(24019));
        assert_eq!(mem_total_mib("MemFree: 100 kB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn this_host_has_memory_and_cpus() {
        let host = HostLimits::detect().expect("/proc/meminfo and the CPU count are readable");
        assert!(host.memory_mib > 0 && host.cpus > 0, "{host:?}");
    }

    #[test]
    fn a_configured_maximum_is_capped_by_the_host() {
        let origin = Origin::File { path: "/c.toml".into(), line: 3 };
        assert_eq!(resolve_max("k", 0, &origin, 8, "the host's CPUs"), (8, "k = 0: the host's CPUs".to_owned()));
        assert_eq!(resolve_max("k", 4, &origin, 8, "the host's CPUs"), (4, "k = 4 from /c.toml:3".to_owned()));
        assert_eq!(
            resolve_max("k", 16, &origin, 8, "the host's CPUs"),
            (8, "the host's CPUs: k = 16 from /c.toml:3 is more".to_owned())
        );
    }
}
