//! Timestamps from containerd's log (logrus text format), into which the shim's `log` lines are copied:
//! where one `ctr run` of kata spends its time.
//!
//! Lines used (all exist today):
//! the shim's `shim serving ...`, `QEMU started vm=<id> ...`, `agent connected sandbox=<id>`,
//! `sandbox started sandbox=<id>`, `container created in the guest sandbox=<id> container=<id>`,
//! `sandbox stopping sandbox=<id>`, `sandbox stopped sandbox=<id>` (tracing events: the message, then the
//! fields), and containerd's
//! `event forwarded ... topic=/tasks/create|/tasks/start|/tasks/exit` (debug level; the shim's events).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One parsed log line.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub time: DateTime<Utc>,
    pub msg: String,
    /// The whole line, for `key=value` fields after the message.
    pub raw: String,
}

/// `time="..." level=... msg="..." ...` -> time and message; other lines are skipped.
pub fn parse_line(line: &str) -> Option<LogLine> {
    let rest = line.strip_prefix("time=\"")?;
    let (time, rest) = rest.split_once('"')?;
    let time = DateTime::parse_from_rfc3339(time).ok()?.with_timezone(&Utc);
    let at = rest.find(" msg=")? + " msg=".len();
    let after = &rest[at..];
    let msg = if let Some(quoted) = after.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '"' => break,
                c => out.push(c),
            }
        }
        out
    } else {
        after.split_whitespace().next().unwrap_or_default().to_owned()
    };
    Some(LogLine { time, msg, raw: line.to_owned() })
}

pub fn parse(log: &str) -> Vec<LogLine> {
    log.lines().filter_map(parse_line).collect()
}

/// Seconds between the phases of one kata `ctr run --rm` (each `None` when its log line was not found).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Breakdown {
    /// `ctr run` spawned -> the shim serves (ctr, containerd: snapshot, container record, `shim start`).
    pub to_shim: Option<f64>,
    /// shim serving -> QEMU launched (configuration, helper daemons, QEMU process and QMP).
    pub to_qemu: Option<f64>,
    /// QEMU launched -> `agent connected` (guest boot, agent start, readiness signal, vsock dial).
    pub to_agent: Option<f64>,
    /// agent connected -> `sandbox started` (sandbox setup in the guest: shared fs, hostname, network).
    pub to_sandbox: Option<f64>,
    /// sandbox started -> `container created in the guest` (rootfs mount on the host, libcontainer create).
    pub to_container: Option<f64>,
    /// container created -> `/tasks/create` (IO streams attached, event published).
    pub to_task_create: Option<f64>,
    /// `/tasks/create` -> `/tasks/start` (containerd's Start call, the agent starts the process).
    pub to_task_start: Option<f64>,
    /// `/tasks/start` -> `/tasks/exit` (the workload runs and its output is copied).
    pub to_exit: Option<f64>,
    /// `/tasks/exit` -> `sandbox stopping` (ctr's Delete reaches the shim).
    pub to_stopping: Option<f64>,
    /// `sandbox stopping` -> `sandbox stopped` (QEMU and its helpers gone, mounts and state removed).
    pub to_stopped: Option<f64>,
    /// `sandbox stopped` -> `ctr` returned (shim exits, containerd's cleanup, snapshot removed).
    pub to_end: Option<f64>,
}

/// Whether a tracing event's text (`message key=value key="value" ...`) has `key` equal to `value`.
fn has_field(msg: &str, key: &str, value: &str) -> bool {
    msg.split_whitespace().any(|field| {
        field
            .strip_prefix(key)
            .and_then(|f| f.strip_prefix('='))
            .is_some_and(|v| v == value || v == format!("{value:?}"))
    })
}

impl Breakdown {
    /// The breakdown of the run of container `id` that happened between `start` and `end`.
    pub fn of_run(lines: &[LogLine], id: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> Breakdown {
        let window: Vec<&LogLine> = lines.iter().filter(|l| l.time >= start && l.time <= end).collect();
        let first = |pred: &dyn Fn(&LogLine) -> bool| window.iter().find(|l| pred(l)).map(|l| l.time);
        let topic = |t: &'static str| {
            move |l: &LogLine| {
                matches!(l.msg.as_str(), "event forwarded" | "event published")
                    && l.raw.contains(&format!("topic={t} "))
            }
        };
        let shim = first(&|l| l.msg.starts_with("shim serving"));
        let qemu = first(&|l| l.msg.starts_with("QEMU started") && l.msg.contains(&format!("vm={id} ")));
        let event = |text: &'static str| move |l: &LogLine| l.msg.starts_with(text) && has_field(&l.msg, "sandbox", id);
        let agent = first(&event("agent connected "));
        // A VM from the warm cache is not launched by the shim: its hand-over stands for the launch.
        let qemu = qemu.or_else(|| first(&event("VM from the cache ")));
        let sandbox = first(&event("sandbox started "));
        let container = first(&event("container created in the guest "));
        let stopping = first(&event("sandbox stopping "));
        let stopped = first(&event("sandbox stopped "));
        let task_create = first(&topic("/tasks/create"));
        let task_start = first(&topic("/tasks/start"));
        let exit = first(&topic("/tasks/exit"));
        let secs = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| -> Option<f64> {
            let d = (b? - a?).num_microseconds()? as f64 / 1e6;
            (d >= 0.0).then_some(d)
        };
        Breakdown {
            to_shim: secs(Some(start), shim),
            to_qemu: secs(shim, qemu),
            to_agent: secs(qemu, agent),
            to_sandbox: secs(agent, sandbox),
            to_container: secs(sandbox, container),
            to_task_create: secs(container, task_create),
            to_task_start: secs(task_create, task_start),
            to_exit: secs(task_start, exit),
            to_stopping: secs(exit, stopping),
            to_stopped: secs(stopping, stopped),
            to_end: secs(stopped, Some(end)),
        }
    }

    /// `(label, value)` in order, for tables.
    pub fn phases(&self) -> [(&'static str, Option<f64>); 11] {
        [
            ("`ctr run` -> shim serving (ctr, containerd, snapshot, `shim start`)", self.to_shim),
            ("shim serving -> QEMU launched (config, virtiofsd, vhost-device-vsock, QEMU, QMP)", self.to_qemu),
            ("QEMU launched -> agent connected (guest boot, agent start, vsock dial)", self.to_agent),
            ("agent connected -> sandbox started (shared fs, hostname, network in the guest)", self.to_sandbox),
            (
                "sandbox started -> container created in the guest (rootfs mount, libcontainer create)",
                self.to_container,
            ),
            ("container created -> task created (IO streams attached)", self.to_task_create),
            ("task created -> task started (Start call, process start in guest)", self.to_task_start),
            ("task started -> task exit (workload, output)", self.to_exit),
            ("task exit -> sandbox stopping (ctr's Delete reaches the shim)", self.to_stopping),
            ("sandbox stopping -> stopped (QEMU and helpers gone, mounts and state removed)", self.to_stopped),
            ("sandbox stopped -> `ctr` returned (shim exit, containerd cleanup, snapshot removal)", self.to_end),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quoted_and_bare_messages() {
        let l = parse_line(r#"time="2026-11-30T01:08:28.72387662Z" level=info msg="sandbox t1 \"x\" started""#)
            .expect("line");
        assert_eq!(l.msg, r#"sandbox t1 "x" started"#);
        let l =
            parse_line(r#"time="2026-11-30T01:08:23.218273928Z" level=info msg=serving... address=/x"#).expect("line");
        assert_eq!(l.msg, "serving...");
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn breakdown_from_log_lines() {
        let log = r#"time="2026-01-01T00:00:00.100Z" level=info msg="shim serving unix:///run/containerd/s/x"
time="2026-01-01T00:00:00.200Z" level=info msg="QEMU started vm=c1 pid=5 accel=tcg"
time="2026-01-01T00:00:01.500Z" level=info msg="agent connected sandbox=c1"
time="2026-01-01T00:00:01.700Z" level=info msg="sandbox started sandbox=c1"
time="2026-01-01T00:00:01.750Z" level=info msg="container created in the guest sandbox=c1 container=\"c1\""
time="2026-01-01T00:00:01.800Z" level=debug msg="event forwarded" ns=default topic=/tasks/create type=x
time="2026-01-01T00:00:01.900Z" level=debug msg="event forwarded" ns=default topic=/tasks/start type=x
time="2026-01-01T00:00:02.000Z" level=debug msg="event forwarded" ns=default topic=/tasks/exit type=x
time="2026-01-01T00:00:02.100Z" level=info msg="sandbox stopping sandbox=c1"
time="2026-01-01T00:00:02.300Z" level=info msg="sandbox stopped sandbox=c1"
"#;
        let lines = parse(log);
        let t = |s: &str| DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc);
        let b = Breakdown::of_run(&lines, "c1", t("2026-01-01T00:00:00Z"), t("2026-01-01T00:00:02.5Z"));
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-6);
        assert!(close(b.to_shim, 0.1) && close(b.to_qemu, 0.1) && close(b.to_agent, 1.3));
        assert!(close(b.to_sandbox, 0.2) && close(b.to_container, 0.05) && close(b.to_task_create, 0.05));
        assert!(close(b.to_task_start, 0.1) && close(b.to_exit, 0.1));
        assert!(close(b.to_stopping, 0.1) && close(b.to_stopped, 0.2) && close(b.to_end, 0.2));
    }
}
