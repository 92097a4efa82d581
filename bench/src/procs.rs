//! Host processes a pod costs: its shim (found by its command line: `-address <our containerd> ... -id <id>`)
//! and every descendant of it (QEMU, virtiofsd, vhost-device-vsock for kata; the workload for runc), with
//! their PSS from `/proc/<pid>/smaps_rollup`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{memory, Memory};

/// One process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    /// `comm` (at most 15 characters).
    pub name: String,
    pub cmdline: Vec<String>,
}

/// Every process now running.
pub fn all() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let dir = Path::new("/proc").join(pid.to_string());
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let (name, ppid) = parse_stat(&stat)?;
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let cmdline = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(Proc { pid, ppid, name, cmdline })
        })
        .collect()
}

/// `(comm, ppid)` of a `/proc/<pid>/stat` line; the name may hold spaces and parentheses.
pub fn parse_stat(stat: &str) -> Option<(String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let ppid = stat.get(close + 1..)?.split_whitespace().nth(1)?.parse().ok()?;
    Some((name, ppid))
}

/// The value after `flag` in a command line (`-id abc` -> `abc`).
fn flag_value<'a>(cmdline: &'a [String], flag: &str) -> Option<&'a str> {
    cmdline.iter().position(|a| a == flag).and_then(|i| cmdline.get(i + 1)).map(String::as_str)
}

/// The serving shims of containerd at `address`, by container id (the `start` invocations have exited).
pub fn shims(procs: &[Proc], address: &Path) -> BTreeMap<String, u32> {
    let address = address.to_string_lossy();
    procs
        .iter()
        .filter(|p| p.cmdline.first().is_some_and(|a| a.contains("containerd-shim")))
        .filter(|p| flag_value(&p.cmdline, "-address") == Some(&*address))
        .filter(|p| !p.cmdline.iter().any(|a| a == "start" || a == "delete"))
        .filter_map(|p| Some((flag_value(&p.cmdline, "-id")?.to_owned(), p.pid)))
        .collect()
}

/// `root` and all its descendants.
pub fn tree(procs: &[Proc], root: u32) -> Vec<&Proc> {
    let mut out: Vec<&Proc> = procs.iter().filter(|p| p.pid == root).collect();
    let mut i = 0;
    while i < out.len() {
        let parent = out[i].pid;
        out.extend(procs.iter().filter(|p| p.ppid == parent && p.pid != root));
        i += 1;
    }
    out
}

/// What a set of pods costs on the host, by process name, summed over the pods.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodsCost {
    pub pods: usize,
    pub processes: usize,
    pub total: Memory,
    /// comm -> summed memory.
    pub by_process: BTreeMap<String, Memory>,
}

impl PodsCost {
    pub fn pss_per_pod_mib(&self) -> f64 {
        if self.pods == 0 {
            return 0.0;
        }
        self.total.pss_kib as f64 / 1024.0 / self.pods as f64
    }
}

/// Sums the memory of the shim trees of `ids` (containers of containerd at `address`).
pub fn pods_cost(address: &Path, ids: &[String]) -> PodsCost {
    let procs = all();
    let shims = shims(&procs, address);
    let mut cost = PodsCost::default();
    for id in ids {
        let Some(&shim) = shims.get(id) else { continue };
        cost.pods += 1;
        for p in tree(&procs, shim) {
            let m = memory(p.pid);
            cost.processes += 1;
            cost.total = cost.total + m;
            let e = cost.by_process.entry(p.name.clone()).or_default();
            *e = *e + m;
        }
    }
    cost
}

/// Clock ticks a second in `/proc/<pid>/stat` (USER_HZ, fixed at 100 by Linux's ABI on x86).
const USER_HZ: f64 = 100.0;

/// User plus system CPU time of `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let mut after = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    Some(after.next()?.parse::<u64>().ok()? + after.next()?.parse::<u64>().ok()?)
}

/// The host CPU the shim trees of `ids` take over `window`, per pod, as a fraction of one core. Processes that
/// end during the window are left out; `None` when no pod was found.
pub fn pods_cpu(address: &Path, ids: &[String], window: std::time::Duration) -> Option<f64> {
    let procs = all();
    let shims = shims(&procs, address);
    let roots: Vec<u32> = ids.iter().filter_map(|id| shims.get(id).copied()).collect();
    if roots.is_empty() {
        return None;
    }
    let pids: Vec<u32> = roots.iter().flat_map(|&r| tree(&procs, r)).map(|p| p.pid).collect();
    let before: Vec<Option<u64>> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    std::thread::sleep(window);
    let ticks: u64 = pids.iter().zip(before).filter_map(|(&p, b)| Some(cpu_ticks(p)?.saturating_sub(b?))).sum();
    Some(ticks as f64 / USER_HZ / window.as_secs_f64() / roots.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32, args: &[&str]) -> Proc {
        Proc { pid, ppid, name: format!("p{pid}"), cmdline: args.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn stat_with_odd_names() {
        assert_eq!(parse_stat("12 (a (b) c) S 7 12 12"), Some(("a (b) c".to_owned(), 7)));
    }

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        let stat = "12 (CPU 0/TCG) S 7 12 12 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0 500";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
        assert_eq!(parse_cpu_ticks("12 (x) S 7"), None);
    }

    #[test]
    fn finds_serving_shims_of_one_containerd_and_their_trees() {
        let procs = vec![
            p(10, 1, &["containerd-shim-kata-v2", "-namespace", "default", "-address", "/t/c.sock", "-id", "a"]),
            p(11, 1, &["containerd-shim-kata-v2", "-namespace", "default", "-address", "/other", "-id", "b"]),
            p(12, 1, &["containerd-shim-kata-v2", "-address", "/t/c.sock", "-id", "c", "start"]),
            p(20, 10, &["qemu"]),
            p(21, 10, &["virtiofsd"]),
            p(22, 21, &["virtiofsd"]),
            p(30, 11, &["qemu"]),
        ];
        let shims = shims(&procs, Path::new("/t/c.sock"));
        assert_eq!(shims.into_iter().collect::<Vec<_>>(), vec![("a".to_owned(), 10)]);
        let pids: Vec<u32> = tree(&procs, 10).iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![10, 20, 21, 22]);
    }
}
