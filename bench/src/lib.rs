//! The kata-rs benchmark harness: measurement helpers, the bare QEMU boot floor ([`floor`]), host process
//! accounting ([`procs`]), containerd log timestamps ([`timeline`]), the benchmark stages ([`stage`],
//! [`measure`], [`network`]) and the report ([`report`], [`chart`]).

pub mod chart;
pub mod floor;
pub mod measure;
pub mod network;
pub mod procs;
pub mod report;
pub mod resources;
pub mod stage;
pub mod timeline;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Memory of one process from /proc/<pid>/smaps_rollup, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, o: Memory) -> Memory {
        Memory { rss_kib: self.rss_kib + o.rss_kib, pss_kib: self.pss_kib + o.pss_kib }
    }
}

/// Reads `Rss:` and `Pss:` of a process; zero when it is gone.
pub fn memory(pid: u32) -> Memory {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps_rollup")).unwrap_or_default();
    parse_smaps_rollup(&text)
}

pub fn parse_smaps_rollup(text: &str) -> Memory {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory { rss_kib: field("Rss:"), pss_kib: field("Pss:") }
}

/// Median, min and max of a sample.
pub fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    (median, values[0], values[n - 1])
}

/// Median, min and max of a sample with its size; what every latency row of the report shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        let (median, min, max) = summary(&mut v);
        Some(Stat { n: v.len(), median, min, max })
    }
}

/// Set by SIGINT/SIGTERM: every stage checks it between steps and returns early, so the guards
/// (containerd, pods, networks) are dropped and clean up.
#[derive(Debug, Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn install() -> anyhow::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, flag.clone())?;
        }
        Ok(Interrupt(flag))
    }

    /// An interrupt that never fires (unit tests).
    pub fn never() -> Self {
        Interrupt(Arc::new(AtomicBool::new(false)))
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.0.load(Ordering::Relaxed) {
            anyhow::bail!("interrupted");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_is_parsed() {
        let text = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  104500 kB\nPss:   43210 kB\nPss_Anon: 1 kB\n";
        assert_eq!(parse_smaps_rollup(text), Memory { rss_kib: 104500, pss_kib: 43210 });
        assert_eq!(parse_smaps_rollup(""), Memory::default());
    }

    #[test]
    fn summary_takes_the_median() {
        assert_eq!(summary(&mut [3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&mut [4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
