//! Persisted sandbox state: enough for a later `containerd-shim-kata-v2 delete` to clean up after a shim that
//! died (kill QEMU and helpers by PID, unmount, remove directories).

use std::path::{Path, PathBuf};

use hypervisor::VmProcess;
use serde::{Deserialize, Serialize};

use crate::mounts::{self, MountSyscalls};
use crate::paths::SandboxPaths;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parse {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("clean up the VM: {0}")]
    Vm(#[from] hypervisor::Error),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error("tear down the pod network: {0}")]
    Network(#[from] crate::network::NetworkError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub sandbox_id: String,
    /// QEMU and helper processes, VMM first.
    pub processes: Vec<VmProcess>,
    /// The shim serving this sandbox, so `delete` can tell a live shim from a dead one.
    pub shim_pid: Option<u32>,
    /// The pod network namespace whose taps and tc filters we added.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

impl SandboxState {
    /// Writes atomically (temp file + rename) so a crash never leaves half a file. Root-only (0600); the
    /// temp file is created fresh, never through a symlink.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|source| StateError::Parse { path: path.into(), source })?;
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&text))
            .map_err(|source| StateError::Write { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, path).map_err(|source| StateError::Write { path: path.into(), source })
    }

    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = std::fs::read(path).map_err(|source| StateError::Read { path: path.into(), source })?;
        serde_json::from_slice(&text).map_err(|source| StateError::Parse { path: path.into(), source })
    }
}

/// What crash cleanup did, for the shim's log.
#[derive(Debug, Default)]
pub struct CleanupSummary {
    pub killed: Vec<u32>,
    pub unmounted: Vec<PathBuf>,
    pub removed: bool,
}

/// Tears down whatever of the sandbox is left: VM processes from the persisted state, every mount under the
/// sandbox directory (deepest first), then the directory. Safe to call more than once. Fails closed: the
/// directory is not removed when the mount table cannot be read or a mount stays (see
/// [`mounts::unmount_and_remove`]).
pub async fn cleanup(sys: &dyn MountSyscalls, paths: &SandboxPaths) -> Result<CleanupSummary, StateError> {
    let mut summary = CleanupSummary::default();
    if let Ok(state) = SandboxState::load(&paths.state_file()) {
        let report = hypervisor::cleanup_vm(&state.processes, &paths.vm_dir()).await?;
        summary.killed = report.killed;
        if let Some(netns) = &state.netns {
            crate::network::teardown_pod_network(netns).await?;
        }
    }
    let existed = paths.root.exists();
    summary.unmounted = mounts::unmount_and_remove(sys, &paths.root)?;
    summary.removed = existed;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let state = SandboxState { sandbox_id: "sb".into(), processes: vec![], shim_pid: Some(42), netns: None };
        state.save(&path).unwrap();
        assert_eq!(SandboxState::load(&path).unwrap(), state);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn unreadable_state_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = SandboxState::load(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("parse {}: ", path.display())), "{err}");
    }

    #[tokio::test]
    async fn cleanup_removes_the_directory_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::new(dir.path(), "sb");
        std::fs::create_dir_all(paths.vm_dir()).unwrap();
        SandboxState { sandbox_id: "sb".into(), ..Default::default() }.save(&paths.state_file()).unwrap();
        let sys = crate::mounts::test_double::RecordingSyscalls::default();
        let summary = cleanup(&sys, &paths).await.unwrap();
        assert!(summary.removed);
        assert!(!paths.root.exists());
        assert!(!paths.root.exists());
        let again = cleanup(&sys, &paths).await.unwrap();
        assert!(!again.removed);
    }
}
