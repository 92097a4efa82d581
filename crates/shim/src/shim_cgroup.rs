//! The `ShimCgroup` runtime option: the shim runs in the cgroup the client named, as runc's shim does. `start`
//! moves itself there before it spawns the shim server, which (with QEMU and its helpers) is born in it.
//!
//! cgroup v2 has one hierarchy; on a v1 (or hybrid) host the process joins the cgroup in every hierarchy where
//! it exists, as containerd's cgroup library does, and it must exist in at least one.

use std::path::Path;

use runtime::host_cgroup::{self, CGROUP_ROOT};

/// Moves process `pid` into cgroup `path` (relative to the hierarchy root, with or without a leading `/`).
pub fn join(pid: u32, path: &str) -> std::io::Result<()> {
    host_cgroup::join(Path::new(CGROUP_ROOT), pid, &host_cgroup::relative(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_plain() {
        for bad in ["/pods/../../etc", "", "/", "./x"] {
            assert!(join(1, bad).is_err(), "{bad:?}");
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
        host_cgroup::join(root.path(), 42, Path::new("pods/p1")).expect("join");
        for h in ["memory", "pids"] {
            let procs = std::fs::read_to_string(root.path().join(h).join("pods/p1/cgroup.procs")).expect("read");
            assert_eq!(procs, "42");
        }
        assert!(!root.path().join("cpu,cpuacct/pods").exists());
        let err = host_cgroup::join(root.path(), 42, Path::new("pods/missing")).expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn joins_the_v2_hierarchy() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory").expect("write");
        std::fs::create_dir_all(root.path().join("pods/p1")).expect("mkdir");
        host_cgroup::join(root.path(), 7, Path::new("pods/p1")).expect("join");
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
