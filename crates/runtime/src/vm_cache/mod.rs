//! The warm VM cache, Kata's `[factory] vm_cache_number`: a per-host server ([`server`], run by `kata-runtime
//! factory init`) keeps VMs started and ready, and a shim about to start a VM takes one instead ([`take`]).
//!
//! A cached VM is an ordinary sandbox directory under [`CACHE_DIR`] (state.json, `vm/`, `mounts/`, `shared/`,
//! made as [`crate::Sandbox::start`] makes them) whose VM runs and whose agent answered, but which has no pod yet:
//! no hostname, clock, entropy or network in the guest, no containers. The shim that takes it renames the
//! directory to its sandbox's ([`adopt`]; the same filesystem, and the VM's open files and listening sockets
//! follow the rename), attaches to the VM and then sets it up exactly as one it started itself. VMs with a NIC
//! bring a tap that the server moves into the pod's network namespace on hand-over.
//!
//! The protocol is one JSON request and one JSON reply per connection, on a unix socket only root may use (mode
//! 0600, and the peer's uid is checked). Anything going wrong on the way (no server, no VM of the kind, a
//! failed hand-over) makes the shim start its own VM, as without a cache.

pub mod server;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hypervisor::{AgentEndpoint, SavedVm, SharedFs};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::paths::SandboxPaths;
use crate::state::{SandboxState, StateError};

/// Where the server keeps its VMs: beside the sandboxes' root, on the same filesystem, so a hand-over is a rename.
pub const CACHE_DIR: &str = "/run/kata-rs-vm-cache";

/// The longest request or reply line either side reads.
const MAX_LINE: u64 = 64 * 1024;

/// How long a shim waits for the server before starting its own VM.
const TAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    /// A VM made for `key`, with `nics` NICs (0 or 1); with a NIC, its tap is moved into `netns` as `tap`.
    Take { key: String, nics: u32, netns: Option<PathBuf>, tap: Option<String> },
    /// What the cache holds.
    Status,
    /// Stop every cached VM and exit.
    Quit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// The VM's directory, now the caller's.
    Vm {
        dir: PathBuf,
    },
    /// No VM handed over, and why.
    None {
        reason: String,
    },
    Status {
        ready: Vec<CachedVm>,
    },
    Bye,
}

/// One ready VM, as `Status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedVm {
    pub dir: PathBuf,
    pub nics: u32,
    pub key: String,
}

/// What a cached VM is for: the template key of its configuration, and whether it is a clone.
pub fn cache_key(template_key: &str, clone: bool) -> String {
    format!("{template_key}-{}", if clone { "clone" } else { "boot" })
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the VM cache at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM cache at {path} answered {what}")]
    Protocol { path: PathBuf, what: String },
    #[error("no answer from the VM cache at {0} in time")]
    Timeout(PathBuf),
}

/// Sends `request` to the server at `endpoint` and reads its reply.
pub async fn call(endpoint: &Path, request: &Request, timeout: Duration) -> Result<Reply, CacheError> {
    let io = |source| CacheError::Io { path: endpoint.to_owned(), source };
    let exchange = async {
        let mut stream = UnixStream::connect(endpoint).await.map_err(io)?;
        let mut line = serde_json::to_vec(request).expect("requests serialise");
        line.push(b'\n');
        stream.write_all(&line).await.map_err(io)?;
        let mut reply = String::new();
        BufReader::new(stream).take(MAX_LINE).read_line(&mut reply).await.map_err(io)?;
        serde_json::from_str::<Reply>(&reply)
            .map_err(|e| CacheError::Protocol { path: endpoint.to_owned(), what: format!("{reply:?}: {e}") })
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| CacheError::Timeout(endpoint.to_owned()))?
}

/// Asks the server at `endpoint` for a VM; `None` (and why, logged) when there is none to have.
pub async fn take(endpoint: &Path, request: &Request) -> Option<PathBuf> {
    if !endpoint.exists() {
        return None;
    }
    match call(endpoint, request, TAKE_TIMEOUT).await {
        Ok(Reply::Vm { dir }) => Some(dir),
        Ok(Reply::None { reason }) => {
            tracing::info!(%reason, "no VM from the cache");
            None
        }
        Ok(other) => {
            tracing::warn!(reply = ?other, "the VM cache answered a take with something else");
            None
        }
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "no VM from the cache");
            None
        }
    }
}

/// A cached VM, made the sandbox's: its directory renamed to the sandbox's, and its state's paths and name
/// rewritten to match. Returns the state as the server left it. The caller owns the directory either way.
pub fn adopt(cached: &Path, paths: &SandboxPaths, sandbox_id: &str) -> Result<(SavedVm, AgentEndpoint), AdoptError> {
    // Only a directory the server made, straight under its own directory.
    let plain_name =
        cached.file_name().and_then(|n| n.to_str()).is_some_and(|n| crate::paths::check_id("vm", n).is_ok());
    if cached.parent() != Some(Path::new(CACHE_DIR)) || !plain_name {
        return Err(AdoptError::Outside(cached.to_owned()));
    }
    std::fs::rename(cached, &paths.root).map_err(|source| AdoptError::Rename { from: cached.to_owned(), source })?;
    let mut state = SandboxState::load(&paths.state_file())?;
    let (Some(mut config), Some(endpoint), false) = (state.vm.take(), state.agent.take(), state.processes.is_empty())
    else {
        return Err(AdoptError::Incomplete);
    };
    let old_vm_dir = config.work_dir.clone();
    config.name = sandbox_id.to_string();
    config.work_dir = paths.vm_dir();
    match &mut config.shared_fs {
        SharedFs::Virtio9p { shared_dir } | SharedFs::VirtioFs { shared_dir, .. } => *shared_dir = paths.shared_dir(),
        SharedFs::None => {}
    }
    let moved = |old: &Path| paths.vm_dir().join(old.strip_prefix(&old_vm_dir).unwrap_or(old));
    let endpoint = match endpoint {
        AgentEndpoint::Serial(path) => AgentEndpoint::Serial(moved(&path)),
        AgentEndpoint::HybridVsock(path) => AgentEndpoint::HybridVsock(moved(&path)),
    };
    Ok((SavedVm { config, processes: state.processes }, endpoint))
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("{0} is not a VM of the cache")]
    Outside(PathBuf),
    #[error("move the cached VM {from} to the sandbox")]
    Rename {
        from: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the cached VM's state has no VM, agent or processes")]
    Incomplete,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_are_one_json_line() {
        let take = Request::Take { key: "k".into(), nics: 1, netns: Some("/n".into()), tap: Some("tap0_kata".into()) };
        let text = serde_json::to_string(&take).unwrap();
        assert!(!text.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), take);
        let reply: Reply = serde_json::from_str(r#"{"none":{"reason":"empty"}}"#).unwrap();
        assert_eq!(reply, Reply::None { reason: "empty".into() });
    }

    #[test]
    fn only_directories_of_the_cache_are_adopted() {
        let paths = SandboxPaths::new(Path::new("/tmp/nowhere"), "sb");
        for bad in ["/etc", "/run/kata-rs-vm-cache/../etc", "/run/kata-rs-vm-cache/a/b", "/run/kata-rs-vm-cache/.."] {
            assert!(matches!(adopt(Path::new(bad), &paths, "sb"), Err(AdoptError::Outside(_))), "{bad}");
        }
    }
}
