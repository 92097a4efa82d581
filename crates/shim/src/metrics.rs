//! Guest cgroup v2 statistics in containerd's format, so `ctr task metrics` and CRI stats work.

use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, IOEntry, IOStat, MemoryStat, Metrics, PidsStat};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::Message;
use runtime::agent::ContainerStats;

pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn metrics(s: &ContainerStats) -> Metrics {
    let mut m = Metrics::new();
    let mut cpu = CPUStat::new();
    cpu.usage_usec = s.cpu.usage_usec;
    cpu.user_usec = s.cpu.user_usec;
    cpu.system_usec = s.cpu.system_usec;
    m.cpu = Some(cpu).into();
    let mut mem = MemoryStat::new();
    mem.usage = s.memory.usage;
    mem.usage_limit = s.memory.limit.unwrap_or(u64::MAX);
    let stat = |k: &str| s.memory.stat.get(k).copied().unwrap_or(0);
    mem.anon = stat("anon");
    mem.file = stat("file");
    mem.kernel_stack = stat("kernel_stack");
    mem.slab = stat("slab");
    mem.shmem = stat("shmem");
    mem.file_mapped = stat("file_mapped");
    mem.inactive_anon = stat("inactive_anon");
    mem.active_anon = stat("active_anon");
    mem.inactive_file = stat("inactive_file");
    mem.active_file = stat("active_file");
    mem.pgfault = stat("pgfault");
    mem.pgmajfault = stat("pgmajfault");
    m.memory = Some(mem).into();
    let mut pids = PidsStat::new();
    pids.current = s.pids.current;
    pids.limit = s.pids.limit.unwrap_or(0);
    m.pids = Some(pids).into();
    let mut io = IOStat::new();
    let mut entry = IOEntry::new();
    entry.rbytes = s.io.read_bytes;
    entry.wbytes = s.io.write_bytes;
    io.usage.push(entry);
    m.io = Some(io).into();
    m
}

pub fn metrics_any(s: &ContainerStats) -> Result<Any, containerd_shim_protos::protobuf::Error> {
    let mut any = Any::new();
    any.type_url = METRICS_TYPE_URL.to_string();
    any.value = metrics(s).write_to_bytes()?;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use runtime::agent::{CpuStats, IoStats, MemoryStats, PidsStats};

    use super::*;

    #[test]
    fn guest_stats_map_to_cgroup_v2_metrics() {
        let stats = ContainerStats {
            cpu: CpuStats { usage_usec: 10, user_usec: 6, system_usec: 4 },
            memory: MemoryStats { usage: 4096, limit: None, stat: [("anon".to_string(), 1024)].into() },
            pids: PidsStats { current: 2, limit: Some(100) },
            io: IoStats { read_bytes: 7, write_bytes: 8 },
        };
        let any = metrics_any(&stats).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 10);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.anon, 1024);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(m.io.usage[0].wbytes, 8);
    }
}
