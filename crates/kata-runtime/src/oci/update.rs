//! `update`: the container's new resources as OCI LinuxResources JSON, from `--resources FILE|-` or, as in
//! runc, from the resource flags when no file is given.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use super::args::UpdateArgs;

/// The LinuxResources `update` asks for.
pub fn resources(args: &UpdateArgs) -> Result<Value> {
    if let Some(path) = args.resources.as_deref() {
        let json = if path == Path::new("-") {
            let mut s = Vec::new();
            std::io::stdin().read_to_end(&mut s).context("read the resources from stdin")?;
            s
        } else {
            std::fs::read(path).with_context(|| format!("read {}", path.display()))?
        };
        return serde_json::from_slice(&json).context("parse the resources (OCI LinuxResources JSON)");
    }
    from_flags(args)
}

fn from_flags(args: &UpdateArgs) -> Result<Value> {
    let mut memory = Map::new();
    for (key, flag, value) in [
        ("limit", "--memory", &args.memory),
        ("reservation", "--memory-reservation", &args.memory_reservation),
        ("swap", "--memory-swap", &args.memory_swap),
    ] {
        if let Some(v) = value {
            memory.insert(key.into(), json!(parse_bytes(v).with_context(|| format!("{flag} {v:?}"))?));
        }
    }
    let mut cpu = Map::new();
    if let Some(v) = args.cpu_shares {
        cpu.insert("shares".into(), json!(v));
    }
    if let Some(v) = args.cpu_period {
        cpu.insert("period".into(), json!(v));
    }
    if let Some(v) = args.cpu_quota {
        cpu.insert("quota".into(), json!(v));
    }
    if let Some(v) = &args.cpuset_cpus {
        cpu.insert("cpus".into(), json!(v));
    }
    if let Some(v) = &args.cpuset_mems {
        cpu.insert("mems".into(), json!(v));
    }
    let mut resources = Map::new();
    if !memory.is_empty() {
        resources.insert("memory".into(), Value::Object(memory));
    }
    if !cpu.is_empty() {
        resources.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(v) = args.pids_limit {
        resources.insert("pids".into(), json!({ "limit": v }));
    }
    if resources.is_empty() {
        bail!("update needs --resources FILE (- for stdin) or a resource flag (--memory, --cpu-quota, ...)");
    }
    Ok(Value::Object(resources))
}

/// A size as runc takes it: bytes, or a number with k, m, g or t (powers of 1024, `b`/`ib` optional, any
/// case); -1 for unlimited.
pub fn parse_bytes(s: &str) -> Result<i64> {
    if s == "-1" {
        return Ok(-1);
    }
    let lower = s.to_ascii_lowercase();
    let split = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let n: i64 = number.parse().map_err(|_| anyhow!("not a size: use bytes or a number with k, m, g or t"))?;
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => bail!("unknown unit {unit:?}: use k, m, g or t"),
    };
    n.checked_mul(1 << shift).ok_or_else(|| anyhow!("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> UpdateArgs {
        UpdateArgs {
            resources: None,
            memory: None,
            memory_reservation: None,
            memory_swap: None,
            cpu_shares: None,
            cpu_period: None,
            cpu_quota: None,
            cpuset_cpus: None,
            cpuset_mems: None,
            pids_limit: None,
            id: "c1".into(),
        }
    }

    #[test]
    fn sizes_parse_as_runcs() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("512M").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("4kb").unwrap(), 4096);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        for bad in ["", "m", "1.5g", "-2", "5x", "9999999999t"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_become_linux_resources() {
        let mut a = args();
        a.memory = Some("256m".into());
        a.cpu_quota = Some(50_000);
        a.cpu_period = Some(100_000);
        a.pids_limit = Some(64);
        let v = resources(&a).unwrap();
        assert_eq!(
            v,
            json!({"memory": {"limit": 256 << 20}, "cpu": {"quota": 50000, "period": 100000}, "pids": {"limit": 64}})
        );
    }

    #[test]
    fn no_file_and_no_flag_is_an_error_that_says_what_to_give() {
        let err = resources(&args()).unwrap_err().to_string();
        assert!(err.contains("--resources") && err.contains("--memory"), "{err}");
        let mut a = args();
        a.memory = Some("lots".into());
        let err = format!("{:#}", resources(&a).unwrap_err());
        assert!(err.contains("--memory") && err.contains("lots"), "{err}");
    }
}
