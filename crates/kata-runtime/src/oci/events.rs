//! `events`: runc's stats events (`{"type":"stats","id":...,"data":...}`), read from the container's cgroup in
//! the guest. `--stats` prints one; without it one is printed every `--interval` until the container stops.

use std::time::Duration;

use anyhow::{bail, Result};
use runtime::agent::ContainerStats;
use serde_json::{json, Value};

/// runc's `Stats` JSON (the fields the guest's cgroup v2 gives; times in nanoseconds).
pub fn runc_stats(s: &ContainerStats) -> Value {
    let ns = |usec: u64| usec.saturating_mul(1000);
    json!({
        "cpu": {
            "usage": {
                "total": ns(s.cpu.usage_usec),
                "kernel": ns(s.cpu.system_usec),
                "user": ns(s.cpu.user_usec),
            },
            "throttling": {},
        },
        "memory": {
            "usage": { "usage": s.memory.usage, "limit": s.memory.limit.unwrap_or(u64::MAX) },
            "raw": s.memory.stat,
        },
        "pids": { "current": s.pids.current, "limit": s.pids.limit.unwrap_or(0) },
        "blkio": {
            "ioServiceBytesRecursive": [
                { "op": "Read", "value": s.io.read_bytes },
                { "op": "Write", "value": s.io.write_bytes },
            ],
        },
    })
}

pub fn stats_event(id: &str, data: Value) -> Value {
    json!({ "type": "stats", "id": id, "data": data })
}

/// runc's `--interval`: a number with `ms`, `s`, `m` or `h`, as `5s` or `500ms` (`1m30s` is not accepted).
pub fn parse_interval(s: &str) -> Result<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let Ok(n) = number.parse::<u64>() else { bail!("invalid interval {s:?}: use a number and ms, s, m or h") };
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => bail!("invalid interval {s:?}: use a number and ms, s, m or h"),
    };
    if d.is_zero() {
        bail!("invalid interval {s:?}: it must be more than 0");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_runcs_json_in_nanoseconds() {
        let mut s = ContainerStats::default();
        s.cpu.usage_usec = 1500;
        s.memory.usage = 4096;
        s.memory.stat.insert("anon".into(), 1024);
        s.pids.current = 3;
        s.pids.limit = Some(100);
        let v = stats_event("c1", runc_stats(&s));
        assert_eq!(v["type"], "stats");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["data"]["cpu"]["usage"]["total"], 1_500_000);
        assert_eq!(v["data"]["memory"]["usage"]["usage"], 4096);
        assert_eq!(v["data"]["memory"]["usage"]["limit"], u64::MAX);
        assert_eq!(v["data"]["memory"]["raw"]["anon"], 1024);
        assert_eq!(v["data"]["pids"]["current"], 3);
        assert_eq!(v["data"]["pids"]["limit"], 100);
    }

    #[test]
    fn intervals_parse_as_runcs() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "5", "s", "0s", "-1s", "5x", "1.5s"] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
    }
}
