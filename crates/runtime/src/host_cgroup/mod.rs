//! The pod's cgroup on the host, where the kubelet and containerd look for a sandbox's usage and set its limits.
//!
//! A cgroup is one path below the hierarchy root: on cgroup v2 one directory, on a v1 (or hybrid) host the same
//! path in every controller's hierarchy, as runc and containerd's cgroup library place containers. Everything
//! created here is recorded (outermost first) so it can be removed again, by this process or, after a crash, by
//! whoever cleans up from the persisted state.

mod path;

use std::io::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use path::{parse_cgroups_path, relative};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Parent of the per-sandbox cgroups of the VMM's helpers and the shim when `sandbox_cgroup_only` is false.
pub const OVERHEAD_PARENT: &str = "kata_overhead";

/// Whether `root` is a cgroup v2 (unified) hierarchy.
pub fn is_v2(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

/// The hierarchies under `root`: the root itself on v2; on v1 each controller's directory. Symlinked aliases
/// (`cpu` -> `cpu,cpuacct`) are skipped so none is written twice, and so are `unified` (a hybrid host's v2
/// mount, which containerd leaves alone) and the named `systemd` hierarchy, which belongs to systemd.
pub fn hierarchies(root: &Path) -> Result<Vec<PathBuf>> {
    if is_v2(root) {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_dir() && name != "unified" && name != "systemd" {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Moves process `pid` (all its threads) into the existing cgroup `rel` in every hierarchy that has it; it must
/// exist in at least one.
pub fn join(root: &Path, pid: u32, rel: &Path) -> Result<()> {
    let mut joined = 0;
    for hierarchy in hierarchies(root)? {
        let dir = hierarchy.join(rel);
        if dir.is_dir() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
            joined += 1;
        }
    }
    if joined == 0 {
        let msg = format!("cgroup {} does not exist under {}", rel.display(), root.display());
        return Err(Error::new(ErrorKind::NotFound, msg));
    }
    Ok(())
}

fn write(file: &Path, value: &str) -> Result<()> {
    std::fs::write(file, value).map_err(|e| Error::new(e.kind(), format!("write {value:?} to {}: {e}", file.display())))
}

/// Limits for a host cgroup; `None` leaves the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    /// CFS quota and period, microseconds.
    pub cpu: Option<(u64, u64)>,
}

/// A cgroup this process made (or found) for a sandbox, in every hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroup {
    pub root: PathBuf,
    /// Below each hierarchy's root.
    pub rel: PathBuf,
    /// The directories created for it, outermost first: exactly what [`HostCgroup::remove`] removes.
    pub created: Vec<PathBuf>,
}

impl HostCgroup {
    /// Creates `rel` (and missing parents) in every hierarchy under `root`. On v1 a new `cpuset` cgroup gets its
    /// parent's CPUs and memory nodes (it starts with none, and no task could join); on v2 each new parent
    /// hands the cpu, memory and pids controllers down. On failure what was made is removed again.
    pub fn create(root: &Path, rel: &Path) -> Result<Self> {
        let mut cgroup = HostCgroup { root: root.to_path_buf(), rel: rel.to_path_buf(), created: Vec::new() };
        let v2 = is_v2(root);
        let made = hierarchies(root).and_then(|hierarchies| {
            for hierarchy in hierarchies {
                let cpuset = has_controller(&hierarchy, "cpuset");
                let mut dir = hierarchy.clone();
                for part in rel.components() {
                    let parent = dir.clone();
                    dir.push(part);
                    if dir.is_dir() {
                        continue;
                    }
                    if v2 {
                        for controller in ["+cpu", "+memory", "+pids"] {
                            // A controller the parent lacks, or a parent with processes of its own, refuses:
                            // that cgroup simply has no such files, and setting a limit says so.
                            let _ = std::fs::write(parent.join("cgroup.subtree_control"), controller);
                        }
                    }
                    std::fs::create_dir(&dir)
                        .map_err(|e| Error::new(e.kind(), format!("create cgroup {}: {e}", dir.display())))?;
                    cgroup.created.push(dir.clone());
                    if cpuset {
                        for file in ["cpuset.cpus", "cpuset.mems"] {
                            let value = std::fs::read_to_string(parent.join(file))?;
                            write(&dir.join(file), value.trim())?;
                        }
                    }
                }
            }
            Ok(())
        });
        match made {
            Ok(()) => Ok(cgroup),
            Err(e) => {
                cgroup.remove();
                Err(e)
            }
        }
    }

    /// Moves process `pid` with all its threads here.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        join(&self.root, pid, &self.rel)
    }

    /// Moves one thread here: only on v1, where a process's threads may live in different cgroups.
    pub fn add_thread(&self, tid: u32) -> Result<()> {
        if is_v2(&self.root) {
            return Err(Error::new(ErrorKind::Unsupported, "cgroup v2 keeps a process's threads together"));
        }
        for hierarchy in hierarchies(&self.root)? {
            let dir = hierarchy.join(&self.rel);
            if dir.is_dir() {
                write(&dir.join("tasks"), &tid.to_string())?;
            }
        }
        Ok(())
    }

    /// Sets the memory limit and CPU quota (v1: `memory.limit_in_bytes`, `cpu.cfs_*`; v2: `memory.max`,
    /// `cpu.max`).
    pub fn set_limits(&self, limits: CgroupLimits) -> Result<()> {
        let v2 = is_v2(&self.root);
        let file = |controller: &str, name: &str| -> Result<PathBuf> {
            let hierarchy = if v2 { self.root.clone() } else { v1_hierarchy(&self.root, controller)? };
            Ok(hierarchy.join(&self.rel).join(name))
        };
        if let Some(bytes) = limits.memory_bytes {
            match v2 {
                true => write(&file("memory", "memory.max")?, &bytes.to_string())?,
                false => write(&file("memory", "memory.limit_in_bytes")?, &bytes.to_string())?,
            }
        }
        if let Some((quota, period)) = limits.cpu {
            match v2 {
                true => write(&file("cpu", "cpu.max")?, &format!("{quota} {period}"))?,
                false => {
                    write(&file("cpu", "cpu.cfs_period_us")?, &period.to_string())?;
                    write(&file("cpu", "cpu.cfs_quota_us")?, &quota.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Removes what [`HostCgroup::create`] made, innermost first. A cgroup only goes once its processes
    /// exited, which may lag their death by a moment: each is tried for up to a second. Returns what stayed.
    pub fn remove(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for dir in self.created.iter().rev() {
            if !dir.starts_with(&self.root) || !dir.is_dir() {
                continue;
            }
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(_) if tries < 20 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    Err(e) => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a sandbox cgroup");
                        left.push(dir.clone());
                        break;
                    }
                }
            }
        }
        left
    }
}

/// The memory the processes of cgroup `rel` under `root` use now (v1 `memory.usage_in_bytes`, v2
/// `memory.current`).
pub fn memory_usage(root: &Path, rel: &Path) -> Result<u64> {
    let path = match is_v2(root) {
        true => root.join(rel).join("memory.current"),
        false => v1_hierarchy(root, "memory")?.join(rel).join("memory.usage_in_bytes"),
    };
    let text = std::fs::read_to_string(&path)?;
    text.trim().parse().map_err(|_| Error::new(ErrorKind::InvalidData, format!("{}: {text:?}", path.display())))
}

/// The v1 hierarchy of `controller` under `root`.
fn v1_hierarchy(root: &Path, controller: &str) -> Result<PathBuf> {
    hierarchies(root)?.into_iter().find(|h| has_controller(h, controller)).ok_or_else(|| {
        Error::new(ErrorKind::NotFound, format!("no {controller} cgroup hierarchy under {}", root.display()))
    })
}

/// Whether the v1 hierarchy directory `hierarchy` (`cpu,cpuacct`, `memory`, ...) holds `controller`.
fn has_controller(hierarchy: &Path, controller: &str) -> bool {
    hierarchy.file_name().is_some_and(|n| n.to_string_lossy().split(',').any(|c| c == controller))
}

/// Where process `pid` is now, in every hierarchy under `root` (from `/proc/<pid>/cgroup`), to return it there.
pub fn current(root: &Path, pid: u32) -> Result<Vec<(PathBuf, PathBuf)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut placed = Vec::new();
    for hierarchy in hierarchies(root)? {
        let name = hierarchy.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let line = text.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let ours = match is_v2(root) {
                true => controllers.is_empty(),
                false => controllers.split(',').collect::<Vec<_>>() == name.split(',').collect::<Vec<_>>(),
            };
            ours.then(|| path.to_string())
        });
        if let Some(path) = line {
            placed.push((hierarchy, relative(&path).unwrap_or_default()));
        }
    }
    Ok(placed)
}

/// Puts process `pid` back where [`current`] found it.
pub fn restore(pid: u32, placed: &[(PathBuf, PathBuf)]) -> Result<()> {
    for (hierarchy, rel) in placed {
        write(&hierarchy.join(rel).join("cgroup.procs"), &pid.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
