//! The `ShimCgroup` runtime option: the shim runs in the cgroup the client named, as runc's shim does. `start`
//! moves itself there before it spawns the shim server, which (with QEMU and its helpers) is born in it.
//!
//! cgroup v2 has one hierarchy; on a v1 (or hybrid) host the process joins the cgroup in every hierarchy where
//! it exists, as containerd's cgroup library does, and it must exist in at least one.

use std::io::{Error, ErrorKind};
use std::path::{Component, Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Moves process `pid` into cgroup `path` (relative to the hierarchy root, with or without a leading `/`).
pub fn join(pid: u32, path: &str) -> std::io::Result<()> {
    join_under(Path::new(CGROUP_ROOT), pid, path)
}

fn join_under(root: &Path, pid: u32, path: &str) -> std::io::Result<()> {
    let rel = relative(path)?;
    let hierarchies =
        if root.join("cgroup.controllers").exists() { vec![root.to_path_buf()] } else { v1_hierarchies(root)? };
    let mut joined = 0;
    for hierarchy in hierarchies {
        let dir = hierarchy.join(&rel);
        if !dir.is_dir() {
            continue;
        }
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .map_err(|e| Error::new(e.kind(), format!("cannot add pid {pid} to {}: {e}", procs.display())))?;
        joined += 1;
    }
    if joined == 0 {
        return Err(Error::new(ErrorKind::NotFound, format!("cgroup {path} does not exist under {}", root.display())));
    }
    Ok(())
}

/// The path below a hierarchy root; `..` and other tricks are refused rather than resolved.
fn relative(path: &str) -> std::io::Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(part) => rel.push(part),
            _ => return Err(Error::new(ErrorKind::InvalidInput, format!("cgroup path {path:?} is not plain"))),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(Error::new(ErrorKind::InvalidInput, "the cgroup path is empty"));
    }
    Ok(rel)
}

/// The v1 hierarchies: the directories of the cgroup tmpfs (symlinked aliases such as `cpu` -> `cpu,cpuacct`
/// are skipped so no hierarchy is written twice).
fn v1_hierarchies(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_plain() {
        assert_eq!(relative("/pods/p1").expect("plain"), PathBuf::from("pods/p1"));
        assert_eq!(relative("pods/p1").expect("plain"), PathBuf::from("pods/p1"));
        for bad in ["/pods/../../etc", "", "/", "./x"] {
            assert!(relative(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn joins_every_v1_hierarchy_holding_the_cgroup() {
        let root = tempfile::tempdir().expect("tempdir");
        for h in ["cpu,cpuacct", "memory", "pids"] {
            std::fs::create_dir_all(root.path().join(h)).expect("mkdir");
        }
        std::fs::create_dir_all(root.path().join("memory/pods/p1")).expect("mkdir");
        std::fs::create_dir_all(root.path().join("pids/pods/p1")).expect("mkdir");
        join_under(root.path(), 42, "/pods/p1").expect("join");
        for h in ["memory", "pids"] {
            let procs = std::fs::read_to_string(root.path().join(h).join("pods/p1/cgroup.procs")).expect("read");
            assert_eq!(procs, "42");
        }
        assert!(!root.path().join("cpu,cpuacct/pods").exists());
        let err = join_under(root.path(), 42, "/pods/missing").expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn joins_the_v2_hierarchy() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory").expect("write");
        std::fs::create_dir_all(root.path().join("pods/p1")).expect("mkdir");
        join_under(root.path(), 7, "pods/p1").expect("join");
        assert_eq!(std::fs::read_to_string(root.path().join("pods/p1/cgroup.procs")).expect("read"), "7");
    }

    /// On this host's real cgroup filesystem (v1 or v2), as root: a process lands in the named cgroup.
    #[test]
    fn a_process_lands_in_a_real_cgroup() {
        testutil::skip_unless!(
            (!nix::unistd::geteuid().is_root()).then_some("moving a process between cgroups needs root")
        );
        let root = Path::new(CGROUP_ROOT);
        let name = format!("kata-rs-shim-cgroup-test-{}", std::process::id());
        let hierarchy = if root.join("cgroup.controllers").exists() { root.to_path_buf() } else { root.join("pids") };
        let dir = hierarchy.join(&name);
        std::fs::create_dir(&dir).expect("create a test cgroup");
        let mut child = std::process::Command::new("/bin/sleep").arg("30").spawn().expect("spawn sleep");
        let joined = join(child.id(), &format!("/{name}"));
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir(&dir);
        joined.expect("join");
        assert!(cgroups.lines().any(|l| l.ends_with(&format!(":/{name}"))), "{cgroups}");
    }
}
