//! Container statistics and OOM counts read from cgroup v2 interface files.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct CpuStats {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemoryStats {
    pub usage: u64,
    /// 0 when unlimited.
    pub limit: u64,
    pub stat: HashMap<String, u64>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct PidsStats {
    pub current: u64,
    /// 0 when unlimited.
    pub limit: u64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct IoStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ContainerStats {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
    pub io: IoStats,
}

/// Reads the stats of the cgroup at `dir` (e.g. /sys/fs/cgroup/kata/ID). Controllers that are
/// not enabled leave their fields at zero rather than failing the whole call.
pub fn read(dir: &Path) -> Result<ContainerStats, StatsError> {
    // cgroup.procs exists in every cgroup: if it is missing the cgroup is gone.
    read_file(dir, "cgroup.procs")?;
    let opt = |name| read_file(dir, name).unwrap_or_default();
    let cpu = parse_flat_keyed(&opt("cpu.stat"));
    let mem_stat = parse_flat_keyed(&opt("memory.stat"));
    let io = parse_io_stat(&opt("io.stat"));
    Ok(ContainerStats {
        cpu: CpuStats {
            usage_usec: cpu.get("usage_usec").copied().unwrap_or(0),
            user_usec: cpu.get("user_usec").copied().unwrap_or(0),
            system_usec: cpu.get("system_usec").copied().unwrap_or(0),
        },
        memory: MemoryStats {
            usage: parse_limit(&opt("memory.current")),
            limit: parse_limit(&opt("memory.max")),
            stat: mem_stat,
        },
        pids: PidsStats { current: parse_limit(&opt("pids.current")), limit: parse_limit(&opt("pids.max")) },
        io,
    })
}

/// The `oom_kill` count of memory.events, 0 if unreadable.
pub fn oom_kills(dir: &Path) -> u64 {
    let text = read_file(dir, "memory.events").unwrap_or_default();
    parse_flat_keyed(&text).get("oom_kill").copied().unwrap_or(0)
}

/// The pids in cgroup.procs.
pub fn pids(dir: &Path) -> Result<Vec<i32>, StatsError> {
    Ok(read_file(dir, "cgroup.procs")?.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn read_file(dir: &Path, name: &str) -> Result<String, StatsError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|source| StatsError::Read { path: path.display().to_string(), source })
}

/// "key value" lines (cpu.stat, memory.stat, memory.events).
fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// A single number or "max" (which maps to 0 = unlimited).
fn parse_limit(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// "8:0 rbytes=1 wbytes=2 rios=3 ..." lines, summed over devices.
fn parse_io_stat(text: &str) -> IoStats {
    let mut io = IoStats::default();
    for field in text.split_whitespace() {
        if let Some((k, v)) = field.split_once('=') {
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "rbytes" => io.read_bytes += v,
                "wbytes" => io.write_bytes += v,
                _ => {}
            }
        }
    }
    io
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_cgroup_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = |n: &str, t: &str| std::fs::write(dir.path().join(n), t).expect("write");
        w("cgroup.procs", "12\n13\n");
        w("cpu.stat", "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 0\n");
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.stat", "anon 1024\nfile 2048\n");
        w("pids.current", "2\n");
        w("pids.max", "100\n");
        w("io.stat", "254:0 rbytes=10 wbytes=20 rios=1 wios=2\n8:0 rbytes=5 wbytes=0\n");
        w("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n");
        let s = read(dir.path()).expect("stats");
        assert_eq!(s.cpu, CpuStats { usage_usec: 100, user_usec: 60, system_usec: 40 });
        assert_eq!(s.memory.usage, 4096);
        assert_eq!(s.memory.limit, 0);
        assert_eq!(s.memory.stat.get("file"), Some(&2048));
        assert_eq!(s.pids, PidsStats { current: 2, limit: 100 });
        assert_eq!(s.io, IoStats { read_bytes: 15, write_bytes: 20 });
        assert_eq!(oom_kills(dir.path()), 1);
        assert_eq!(pids(dir.path()).expect("pids"), vec![12, 13]);
    }

    #[test]
    fn missing_cgroup_is_an_error_naming_the_file() {
        let err = read(Path::new("/nonexistent/cg")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cg/cgroup.procs"));
    }
}
