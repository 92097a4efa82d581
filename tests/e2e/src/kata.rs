//! What kata tests need besides containerd: the shim binary, the guest assets and helper daemons, and a
//! configuration file pointing at them.

use std::path::{Path, PathBuf};

/// Where the parts come from (set by `scripts/test.sh`).
pub const KERNEL_ENV: &str = "KATA_TEST_KERNEL";
pub const INITRD_ENV: &str = "KATA_TEST_INITRD";
pub const VIRTIOFSD_ENV: &str = "KATA_TEST_VIRTIOFSD";
pub const VSOCK_ENV: &str = "KATA_TEST_VSOCK_DAEMON";
pub const SHIM_DIR_ENV: &str = "KATA_TEST_SHIM_DIR";
/// Another QEMU binary than Debian's (e.g. a build to measure, or a wrapper that changes its arguments).
pub const QEMU_ENV: &str = "KATA_TEST_QEMU";
const DEFAULT_QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Runtime names the how-to uses; both resolve to `containerd-shim-kata-v2`.
pub const KATA_RUNTIME: &str = "io.containerd.kata.v2";
pub const KATA_RUN_RUNTIME: &str = "io.containerd.run.kata.v2";

#[derive(Debug, Clone)]
pub struct KataParts {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub virtiofsd: PathBuf,
    pub vsock_daemon: PathBuf,
    /// The directory holding `containerd-shim-kata-v2`.
    pub shim_dir: PathBuf,
}

/// The kata parts, or why kata tests through containerd cannot run here: [`crate::skip_reason`] (not root,
/// containerd, runc or busybox missing) or a part `scripts/test.sh` exports. Tests start with
/// `let parts = testutil::skip_unless!(kata_parts());`.
pub fn kata_parts() -> Result<KataParts, String> {
    match crate::skip_reason() {
        Some(reason) => Err(reason),
        None => KataParts::find(),
    }
}

impl KataParts {
    /// Finds every part, or says which one is missing (the test then skips with that reason).
    pub fn find() -> Result<Self, String> {
        let file = |env: &str| -> Result<PathBuf, String> {
            let p = std::env::var_os(env).map(PathBuf::from).ok_or_else(|| format!("{env} is not set"))?;
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!("{env}={} does not exist", p.display()))
            }
        };
        let shim_dir = match std::env::var_os(SHIM_DIR_ENV) {
            Some(d) => PathBuf::from(d),
            // Test binaries live in target/<profile>/deps; the shim in target/<profile>.
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
                .ok_or("cannot locate the target directory")?,
        };
        if !shim_dir.join("containerd-shim-kata-v2").is_file() {
            return Err(format!(
                "no containerd-shim-kata-v2 in {} (build it, or set {SHIM_DIR_ENV})",
                shim_dir.display()
            ));
        }
        let qemu = match std::env::var_os(QEMU_ENV) {
            Some(_) => file(QEMU_ENV)?,
            None => PathBuf::from(DEFAULT_QEMU),
        };
        Ok(KataParts {
            qemu,
            kernel: file(KERNEL_ENV)?,
            initrd: file(INITRD_ENV)?,
            virtiofsd: file(VIRTIOFSD_ENV)?,
            vsock_daemon: file(VSOCK_ENV)?,
            shim_dir,
        })
    }

    /// A configuration.toml for these parts (TCG-safe defaults; `accel = "auto"`).
    pub fn configuration(&self, extra_hypervisor_lines: &str) -> String {
        format!(
            "[hypervisor.qemu]\n\
             path = \"{}\"\n\
             kernel = \"{}\"\n\
             initrd = \"{}\"\n\
             machine_type = \"microvm\"\n\
             default_memory = 256\n\
             shared_fs = \"virtio-fs\"\n\
             virtio_fs_daemon = \"{}\"\n\
             vsock_daemon = \"{}\"\n\
             {extra_hypervisor_lines}\n\
             [agent.kata]\n\
             dial_timeout = 60\n",
            self.qemu.display(),
            self.kernel.display(),
            self.initrd.display(),
            self.virtiofsd.display(),
            self.vsock_daemon.display(),
        )
    }

    /// The guest kernel's release, read from the `Linux version ...` banner inside the vmlinux.
    pub fn kernel_release(&self) -> Option<String> {
        let bytes = std::fs::read(&self.kernel).ok()?;
        let marker = b"Linux version ";
        let at = bytes.windows(marker.len()).position(|w| w == marker)? + marker.len();
        let end = bytes[at..].iter().position(|b| *b == b' ')? + at;
        String::from_utf8(bytes[at..end].to_vec()).ok()
    }
}

/// A configuration file for [`KataParts`] in a temporary directory that lives as long as the value.
#[derive(Debug)]
pub struct KataConf {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl KataConf {
    /// Writes `parts.configuration("")`.
    pub fn write(parts: &KataParts) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("configuration.toml");
        std::fs::write(&path, parts.configuration(""))?;
        Ok(Self { _dir: dir, path })
    }
}

/// The per-sandbox directory kata-rs keeps on the host; must be gone after a test.
pub fn sandbox_dir(id: &str) -> PathBuf {
    Path::new("/run/kata-rs").join(id)
}

/// The sandbox's persisted `state.json` (its network namespace, the PIDs of QEMU and the helpers).
pub fn sandbox_state(id: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(sandbox_dir(id).join("state.json")).ok()?).ok()
}

/// Asserts nothing of these kata sandboxes is left: no process, mount, tap or network namespace of theirs,
/// and no sandbox directory.
pub fn assert_no_leaks(containerd: &crate::Containerd, ids: &[&str]) {
    let report = containerd.leaks(ids).expect("leak check");
    assert!(report.is_empty(), "leaked:\n{report}");
    for id in ids {
        assert!(!sandbox_dir(id).exists(), "{} left behind", sandbox_dir(id).display());
    }
}

/// Stops containerd and asserts it stopped cleanly: nothing had to be killed and nothing remains.
pub fn assert_clean_shutdown(containerd: crate::Containerd) {
    let report = containerd.stop();
    assert!(report.killed_processes.is_empty(), "{report:?}");
    assert!(report.remaining.is_empty(), "left after shutdown:\n{}", report.remaining);
}

/// kata-runtime's stand-in processes (`__standin`, `__exec-standin`) naming any of `ids`, or every one when
/// `ids` is empty.
pub fn standins(ids: &[&str]) -> Vec<(u32, String)> {
    crate::leaks::processes(|argv| {
        argv.iter().any(|a| a == "__standin" || a == "__exec-standin")
            && (ids.is_empty() || ids.iter().any(|id| argv.iter().any(|a| a == id)))
    })
}
