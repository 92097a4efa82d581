//! Finding what a test left behind: processes, mounts and state directories. Tests call this after a
//! container is gone and assert the report is empty. Also the host views tests compare before and after
//! a pod: processes by argv, network namespaces and the links in them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use types::mountinfo::{self, MountInfo};

use crate::process::{stat_ppid, stat_state};

/// Helper programs that belong to one sandbox; any of them mentioning the test is a leak.
pub const WATCHED_PROGRAMS: &[&str] =
    &["containerd-shim-kata-v2", "containerd-shim-runc-v2", "virtiofsd", "vhost-device-vsock", "qemu-system-"];

/// Per-sandbox state directories the Kata runtime keeps; `<dir>/<id>` must be gone after the sandbox.
pub const KATA_STATE_DIRS: &[&str] =
    &["/run/kata-containers", "/run/kata-containers/shared/sandboxes", "/run/vc/sbs", "/run/vc/vm"];

/// What to look for.
#[derive(Debug, Clone, Default)]
pub struct LeakQuery {
    /// The test's private directory (containerd root, state, sockets).
    pub dir: PathBuf,
    /// containerd's PID: its descendants are leaks (containerd itself is not).
    pub containerd_pid: Option<u32>,
    /// Container and sandbox ids the test used.
    pub ids: Vec<String>,
    /// PIDs the test saw (e.g. a VM's QEMU) that must be gone.
    pub pids: Vec<u32>,
    /// Further paths that must not exist (e.g. shim sockets in /run/containerd/s/).
    pub paths: Vec<PathBuf>,
}

/// One leftover process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakedProcess {
    pub pid: u32,
    pub ppid: u32,
    pub state: char,
    pub cmdline: String,
    /// Why it counts as ours.
    pub reason: String,
}

/// Everything [`find_leaks`] found; empty means nothing leaked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakReport {
    pub processes: Vec<LeakedProcess>,
    /// Mount points under the test directory or naming one of the ids.
    pub mounts: Vec<PathBuf>,
    /// State directories, cgroups, sockets and files that should be gone.
    pub paths: Vec<PathBuf>,
    /// containerd objects (containers, tasks, snapshots) still listed for the ids.
    pub containerd_objects: Vec<String>,
}

impl LeakReport {
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.mounts.is_empty()
            && self.paths.is_empty()
            && self.containerd_objects.is_empty()
    }
}

impl fmt::Display for LeakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "nothing leaked");
        }
        for p in &self.processes {
            writeln!(f, "process {} (ppid {}, state {}): {} [{}]", p.pid, p.ppid, p.state, p.cmdline, p.reason)?;
        }
        for m in &self.mounts {
            writeln!(f, "mount {}", m.display())?;
        }
        for p in &self.paths {
            writeln!(f, "path {}", p.display())?;
        }
        for o in &self.containerd_objects {
            writeln!(f, "containerd {o}")?;
        }
        Ok(())
    }
}

/// Looks for leftovers of a test: processes (descendants of containerd, listed PIDs still alive,
/// processes whose command line or cgroup mentions the directory or an id, and their descendants), mounts
/// under the directory or naming an id, and Kata state directories of the ids.
pub fn find_leaks(query: &LeakQuery) -> LeakReport {
    LeakReport {
        processes: leaked_processes(query),
        mounts: leaked_mounts(query),
        paths: leaked_paths(query),
        containerd_objects: Vec::new(),
    }
}

#[derive(Debug)]
struct ProcInfo {
    ppid: u32,
    state: char,
    cmdline: String,
    cgroup: String,
}

fn snapshot_processes() -> BTreeMap<u32, ProcInfo> {
    let mut procs = BTreeMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return procs;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Processes vanish while we look: skip those that do.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        procs.insert(
            pid,
            ProcInfo {
                ppid: stat_ppid(&stat).unwrap_or(0),
                state: stat_state(&stat).unwrap_or('?'),
                cmdline,
                cgroup: fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default(),
            },
        );
    }
    procs
}

fn leaked_processes(query: &LeakQuery) -> Vec<LeakedProcess> {
    let procs = snapshot_processes();
    let me = std::process::id();
    let dir = query.dir.to_string_lossy().into_owned();
    let mut reasons: BTreeMap<u32, String> = BTreeMap::new();

    for (&pid, info) in &procs {
        if pid == me || Some(pid) == query.containerd_pid || info.cmdline.is_empty() {
            continue;
        }
        if query.pids.contains(&pid) && info.state != 'Z' {
            reasons.insert(pid, "listed PID still running".to_owned());
        } else if !dir.is_empty() && info.cmdline.contains(&dir) {
            reasons.insert(pid, format!("command line mentions {dir}"));
        } else if let Some(id) = query.ids.iter().find(|id| mentions_id(&info.cmdline, id)) {
            reasons.insert(pid, format!("command line mentions id {id}"));
        } else if let Some(id) = query.ids.iter().find(|id| mentions_id(&info.cgroup, id)) {
            reasons.insert(pid, format!("in a cgroup of id {id}"));
        } else if WATCHED_PROGRAMS.iter().any(|w| program_name(&info.cmdline).starts_with(w))
            && query.ids.iter().any(|id| info.cmdline.contains(id.as_str()))
        {
            reasons.insert(pid, "sandbox helper naming an id".to_owned());
        }
    }

    // Descendants of containerd and of every process found so far.
    let mut roots: Vec<u32> = reasons.keys().copied().collect();
    roots.extend(query.containerd_pid);
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (&pid, info) in &procs {
        children.entry(info.ppid).or_default().push(pid);
    }
    let mut seen: BTreeSet<u32> = roots.iter().copied().collect();
    while let Some(parent) = roots.pop() {
        for &child in children.get(&parent).map(Vec::as_slice).unwrap_or_default() {
            if child == me || !seen.insert(child) {
                continue;
            }
            reasons.entry(child).or_insert_with(|| format!("descendant of {parent}"));
            roots.push(child);
        }
    }

    reasons
        .into_iter()
        .filter_map(|(pid, reason)| {
            let info = procs.get(&pid)?;
            Some(LeakedProcess { pid, ppid: info.ppid, state: info.state, cmdline: info.cmdline.clone(), reason })
        })
        .collect()
}

/// Whether `text` names `id` as a whole word (ids are unique, but a short one could be a substring).
fn mentions_id(text: &str, id: &str) -> bool {
    !id.is_empty()
        && text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')).any(|word| word == id)
}

fn program_name(cmdline: &str) -> &str {
    let argv0 = cmdline.split(' ').next().unwrap_or_default();
    argv0.rsplit('/').next().unwrap_or(argv0)
}

/// Live (non-zombie) processes whose argv satisfies `matches`, as PID and argv joined by spaces.
pub fn processes(matches: impl Fn(&[String]) -> bool) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if !argv.is_empty() && matches(&argv) && crate::process::is_alive(pid) {
            found.push((pid, argv.join(" ")));
        }
    }
    found
}

/// Where containerd 1.6 puts pod network namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// The names of the network namespaces in [`NETNS_DIR`].
pub fn netns_entries() -> BTreeSet<String> {
    fs::read_dir(NETNS_DIR)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Link names in the network namespace at `netns` (the host's when `None`).
pub fn links(netns: Option<&Path>) -> Result<Vec<String>, String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).args(["ip", "-o", "link", "show"]);
            c
        }
        None => {
            let mut c = Command::new("ip");
            c.args(["-o", "link", "show"]);
            c
        }
    };
    let out = crate::process::output_with_timeout(&mut cmd, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    // "2: eth0@if5: <...": the name is the second field, up to '@' or ':'.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect())
}

/// The mounts of this mount namespace, in mount order.
pub fn mounts() -> Vec<MountInfo> {
    mountinfo::read_self().unwrap_or_default()
}

/// Mount points at or under `dir`, or whose options name `dir` (an overlay whose layers live there),
/// deepest first so they can be unmounted in this order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir_text = dir.to_string_lossy();
    let mut found: Vec<(usize, PathBuf)> = mounts()
        .into_iter()
        .enumerate()
        .filter(|(_, m)| m.mount_point.starts_with(dir) || m.super_options.contains(dir_text.as_ref()))
        .map(|(order, m)| (order, m.mount_point))
        .collect();
    // Deepest first; among equals, the most recent mount first (it hides the earlier one).
    found.sort_by(|a, b| b.1.components().count().cmp(&a.1.components().count()).then(b.0.cmp(&a.0)));
    found.into_iter().map(|(_, p)| p).collect()
}

fn leaked_mounts(query: &LeakQuery) -> Vec<PathBuf> {
    let mut found: BTreeSet<PathBuf> =
        if query.dir.as_os_str().is_empty() { BTreeSet::new() } else { mounts_under(&query.dir).into_iter().collect() };
    for m in mounts() {
        let point = m.mount_point.to_string_lossy().into_owned();
        if query.ids.iter().any(|id| m.mount_point.iter().any(|c| c.to_str() == Some(id.as_str())))
            || query.ids.iter().any(|id| mentions_id(&m.source, id))
        {
            found.insert(PathBuf::from(point));
        }
    }
    found.into_iter().collect()
}

fn leaked_paths(query: &LeakQuery) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for id in &query.ids {
        for base in KATA_STATE_DIRS {
            let path = Path::new(base).join(id);
            if path.symlink_metadata().is_ok() {
                found.push(path);
            }
        }
    }
    for path in &query.paths {
        if path.symlink_metadata().is_ok() {
            found.push(path.clone());
        }
    }
    if !query.dir.as_os_str().is_empty() && !query.ids.is_empty() {
        find_named(&query.dir, &query.ids, 0, &mut found);
    }
    if !query.ids.is_empty() {
        for m in mounts().iter().filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2") {
            find_cgroups(&m.mount_point, &query.ids, 0, &mut found);
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Files or directories under `dir` named exactly like one of `ids` (a task bundle, a shim state dir).
fn find_named(dir: &Path, ids: &[String], depth: usize, found: &mut Vec<PathBuf>) {
    // containerd keeps bundles at <state>/io.containerd.runtime.v2.task/<ns>/<id>: depth 3 suffices, the
    // limit keeps us out of snapshot trees.
    if depth > 4 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_str().is_some_and(|n| ids.iter().any(|id| id == n)) {
            found.push(path.clone());
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) && !path.ends_with("snapshots") {
            find_named(&path, ids, depth + 1, found);
        }
    }
}

/// Cgroup directories whose name contains an id (runc uses `/<ns>/<id>`, Kata `kata_<id>` and similar).
fn find_cgroups(dir: &Path, ids: &[String], depth: usize, found: &mut Vec<PathBuf>) {
    if depth > 3 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if entry.file_name().to_str().is_some_and(|n| ids.iter().any(|id| n.contains(id.as_str()))) {
            found.push(path);
        } else {
            find_cgroups(&path, ids, depth + 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_whole_words_only() {
        assert!(mentions_id("/ns/e2e-12-1", "e2e-12-1"));
        assert!(mentions_id("shim -id e2e-12-1 -address x", "e2e-12-1"));
        assert!(!mentions_id("shim -id e2e-12-10", "e2e-12-1"));
        assert!(!mentions_id("anything", ""));
    }

    #[test]
    fn finds_a_listed_child_still_running_and_its_descendants() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 30 & wait"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let report =
            find_leaks(&LeakQuery { dir: dir.path().to_owned(), pids: vec![child.id()], ..Default::default() });
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(report.processes.iter().any(|p| p.pid == child.id()), "{report}");
        assert!(report.processes.iter().any(|p| p.cmdline.contains("sleep 30")), "{report}");
        assert!(report.mounts.is_empty() && report.paths.is_empty(), "{report}");
    }

    #[test]
    fn finds_state_dirs_named_like_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("state/io.containerd.runtime.v2.task/default/abc-1");
        fs::create_dir_all(&bundle).unwrap();
        let report = find_leaks(&LeakQuery {
            dir: dir.path().to_owned(),
            ids: vec!["abc-1".to_owned()],
            paths: vec![dir.path().join("missing.sock")],
            ..Default::default()
        });
        assert_eq!(report.paths, vec![bundle]);
    }
}
