//! End-to-end test harness for kata-rs: locally built OCI images ([`image`]), a private containerd with
//! `ctr` helpers ([`containerd`]), a pseudo-terminal driver for `ctr run -t` ([`pty`]) and a finder for
//! leftover processes, mounts and state ([`leaks`]).
//!
//! Tests using it need root and the Debian `containerd` package; they start with
//! `testutil::skip_unless!(e2e::skip_reason())`, which returns early with the reason when one is missing (and
//! fails the test under `CI=true`).

pub mod checks;
pub mod config_files;
pub mod containerd;
pub mod cri;
pub mod image;
pub mod kata;
pub mod kubernetes;
pub mod leaks;
pub mod process;
pub mod pty;

pub use containerd::{Containerd, ContainerdError, ContainerdOptions, CriOptions, RunOptions, ShutdownReport};
pub use image::{OciImage, BUSYBOX_IMAGE, PAUSE_IMAGE};
pub use leaks::{find_leaks, LeakQuery, LeakReport};
pub use pty::PtySession;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A container id unique across concurrent tests and test processes (shim sockets in
/// `/run/containerd/s/` are shared by every containerd): `PREFIX-PID-COUNTER-NANOS`.
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or_default();
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Why containerd end-to-end tests cannot run here (not root, a program missing), or `None`.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root".to_owned());
    }
    for program in ["containerd", "ctr", "runc"] {
        if find_in_path(OsStr::new(program)).is_none() {
            return Some(format!("{program} is not installed (Debian package containerd / runc)"));
        }
    }
    if !std::path::Path::new(image::DEFAULT_BUSYBOX).exists() {
        return Some(format!("{} is missing (Debian package busybox-static)", image::DEFAULT_BUSYBOX));
    }
    None
}

/// The first executable file called `program` in PATH (or the system directories).
pub fn find_in_path(program: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_differ_and_are_valid_container_ids() {
        let a = unique_id("e2e");
        let b = unique_id("e2e");
        assert_ne!(a, b);
        assert!(a.len() <= 76, "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
    }
}
