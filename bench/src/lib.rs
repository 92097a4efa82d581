//! Shared measurement helpers for the kata-rs benchmarks.

use std::path::Path;

/// Memory of one process from /proc/<pid>/smaps_rollup, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    let text = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps_rollup")).unwrap_or_default();
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
