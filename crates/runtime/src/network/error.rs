use std::path::PathBuf;

/// Why the pod network could not be inspected, wired to the VM, or cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("hostNetwork pods are not supported: the VM cannot share the host's network namespace ({reason})")]
    HostNetwork { reason: String },
    #[error("network namespace {}: {source}", path.display())]
    Netns { path: PathBuf, source: std::io::Error },
    #[error("enter network namespace {}: {errno}", path.display())]
    EnterNetns { path: PathBuf, errno: nix::errno::Errno },
    #[error("start a worker thread for network namespace {}: {source}", path.display())]
    Thread { path: PathBuf, source: std::io::Error },
    #[error("the worker thread for network namespace {} died", path.display())]
    ThreadDied { path: PathBuf },
    #[error("network namespace {}: {action}: {source}", netns.display())]
    Netlink { netns: PathBuf, action: String, source: rtnetlink::Error },
    #[error("network namespace {}: tap device {name}: {action}: {source}", netns.display())]
    Tap { netns: PathBuf, name: String, action: &'static str, source: std::io::Error },
}
