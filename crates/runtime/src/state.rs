//! Persisted sandbox state: enough for another process to find the sandbox by id and drive it
//! ([`crate::Sandbox::connect`]: the VM's configuration and processes, the agent's endpoint, the containers and
//! their processes' states), and for a later `containerd-shim-kata-v2 delete` to clean up after a shim that
//! died (kill the VMM and helpers by PID, unmount, remove directories).

use std::path::{Path, PathBuf};

use hypervisor::{AgentEndpoint, VmConfig, VmProcess};
use serde::{Deserialize, Serialize};

use crate::mounts::{self, MountSyscalls};
use crate::paths::SandboxPaths;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("write {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parse {path}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("clean up the VM")]
    Vm(#[from] hypervisor::Error),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error("tear down the pod network")]
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
    /// The port of the shim's port-forward listener in `netns`, whose iptables redirect cleanup removes.
    #[serde(default)]
    pub port_forward: Option<u16>,
    /// The VM's configuration (without its tap fds), to attach to it again.
    #[serde(default)]
    pub vm: Option<VmConfig>,
    /// Where the agent listens, once the VM started.
    #[serde(default)]
    pub agent: Option<AgentEndpoint>,
    /// The containers and their processes, as of the last change.
    #[serde(default)]
    pub containers: Vec<ContainerRecord>,
    /// `runtime.disable_guest_seccomp`: containers' seccomp profiles are dropped from their guest specs.
    #[serde(default)]
    pub disable_guest_seccomp: bool,
    /// How the VM is sized (fixed at start), and its size now.
    #[serde(default)]
    pub sizing: Option<crate::resources::Sizing>,
    #[serde(default)]
    pub vm_size: Option<crate::resources::Size>,
    /// `runtime.static_sandbox_resource_mgmt`: the VM never grows.
    #[serde(default)]
    pub static_resources: bool,
    /// The host cgroups made for the sandbox, removed by cleanup.
    #[serde(default)]
    pub host_cgroups: crate::placement::HostCgroups,
}

/// A container as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub bundle: String,
    pub is_sandbox: bool,
    pub paused: bool,
    pub init: ProcessRecord,
    pub execs: Vec<(String, ProcessRecord)>,
    /// Its CPU and memory limits, as the VM's size counts them.
    #[serde(default)]
    pub limits: crate::resources::Limits,
}

/// A process (a container's init or an exec) as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub started: bool,
    /// Its exit status, once it exited.
    pub exit_status: Option<u32>,
    /// An exec's OCI process JSON, kept until it is started.
    #[serde(default)]
    pub exec_spec: Option<Vec<u8>>,
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
            if let Some(port) = state.port_forward {
                // A rule left behind redirects to a closed port until the namespace goes: not worth failing for.
                if let Err(e) = crate::network::port_forward::remove_rule(netns, port).await {
                    tracing::warn!(sandbox = %state.sandbox_id, error = %crate::error_chain(&e), "removing the port-forward rule");
                }
            }
        }
        // After the VM's processes are gone, so its cgroups are empty.
        state.host_cgroups.release();
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
        let init = ProcessRecord { started: true, exit_status: Some(3), exec_spec: None };
        let exec = ProcessRecord { started: false, exit_status: None, exec_spec: Some(b"{}".to_vec()) };
        let state = SandboxState {
            sandbox_id: "sb".into(),
            shim_pid: Some(42),
            agent: Some(AgentEndpoint::Serial("/run/a.sock".into())),
            containers: vec![ContainerRecord {
                id: "c1".into(),
                bundle: "/b".into(),
                is_sandbox: true,
                paused: false,
                init,
                execs: vec![("e1".into(), exec)],
                limits: Default::default(),
            }],
            ..Default::default()
        };
        state.save(&path).unwrap();
        assert_eq!(SandboxState::load(&path).unwrap(), state);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn unreadable_state_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = crate::error_chain(&SandboxState::load(&path).unwrap_err());
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
