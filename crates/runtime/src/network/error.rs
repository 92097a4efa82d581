use std::path::PathBuf;

/// Why the pod network could not be inspected, wired to the VM, or cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("hostNetwork pods are not supported: the VM cannot share the host's network namespace ({reason})")]
    HostNetwork { reason: String },
    #[error("cannot use network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {}", path.display())]
    EnterNetns {
        path: PathBuf,
        #[source]
        errno: nix::errno::Errno,
    },
    #[error("cannot start a worker thread for network namespace {}", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker thread for network namespace {} died", path.display())]
    ThreadDied { path: PathBuf },
    #[error("network namespace {}: cannot {action}", netns.display())]
    Netlink {
        netns: PathBuf,
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("network namespace {}: cannot {action} tap device {name}", netns.display())]
    Tap {
        netns: PathBuf,
        name: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}
