//! Where a sandbox keeps its host-side files.
//!
//! Everything of one sandbox lives under one directory, so crash cleanup can find it from the id alone:
//! `<root>/<sandbox id>/{state.json, vm/, mounts/, shared/}`, all root-only (0700). Socket paths inside `vm/`
//! must fit in 107 bytes, which a 64-character containerd id under `/run/kata-rs` does.
//!
//! Kata's layout for shared files: the host mounts container rootfs and volumes under `mounts/`, which only the
//! host writes, and exports to the guest `shared/`, a read-only bind of `mounts/` with slave propagation. Later
//! mounts under `mounts/` appear in `shared/` (and in the guest), but the guest can never create, replace or
//! remove the paths the host mounts on.

use std::path::{Path, PathBuf};

/// Default root for sandbox directories.
pub const DEFAULT_ROOT: &str = "/run/kata-rs";

const SHARED: &str = "shared";
/// Host-private directory of a sandbox where container data is mounted.
pub const MOUNTS: &str = "mounts";

/// Guest mount point of the shared filesystem (the agent mounts the `kataShared` tag here).
pub const GUEST_SHARED_DIR: &str = "/run/kata-containers/shared";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    pub root: PathBuf,
}

impl SandboxPaths {
    pub fn new(root: &Path, sandbox_id: &str) -> Self {
        SandboxPaths { root: root.join(sandbox_id) }
    }

    /// The hypervisor's private work dir: sockets, console log.
    pub fn vm_dir(&self) -> PathBuf {
        self.root.join("vm")
    }

    /// Host side of the directory shared into the guest: a read-only view of [`Self::mounts_dir`].
    pub fn shared_dir(&self) -> PathBuf {
        self.root.join(SHARED)
    }

    /// Where the host mounts container rootfs and volumes; never exported writable.
    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join(MOUNTS)
    }

    /// Persisted state for crash cleanup.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// Host path where a container's rootfs is mounted.
    pub fn container_rootfs(&self, container_id: &str) -> PathBuf {
        self.root.join(Self::rootfs_rel(container_id))
    }

    /// A container's directory under `mounts/`, relative to the sandbox root.
    pub fn container_rel(container_id: &str) -> PathBuf {
        Path::new(MOUNTS).join(container_id)
    }

    /// A container's rootfs mount point, relative to the sandbox root.
    pub fn rootfs_rel(container_id: &str) -> PathBuf {
        Self::container_rel(container_id).join("rootfs")
    }

    /// The same rootfs as the agent sees it, relative to the guest's shared mount.
    pub fn guest_rootfs(container_id: &str) -> String {
        format!("{container_id}/rootfs")
    }
}

/// Container and sandbox ids become path components: refuse anything that could escape its directory.
pub fn check_id(kind: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid {kind} id {id:?}: use 1-128 characters of [A-Za-z0-9_.-], not starting with '.'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_for_containerd_ids() {
        let id = "a".repeat(64);
        let p = SandboxPaths::new(Path::new(DEFAULT_ROOT), &id);
        let longest = p.vm_dir().join("vhost-vsock.sock");
        assert!(longest.as_os_str().len() < 108, "{}", longest.display());
    }

    #[test]
    fn ids_that_escape_are_refused() {
        assert!(check_id("container", "abc-123_x.y").is_ok());
        for bad in ["", "..", "../x", "a/b", ".hidden", "a b"] {
            let err = check_id("container", bad).unwrap_err();
            assert!(err.starts_with("invalid container id"), "{err}");
        }
    }
}
