//! Host-side mounts: containerd's rootfs mounts and volumes placed inside the sandbox's shared directory.
//!
//! The syscalls sit behind [`MountSyscalls`] so the option parsing and bookkeeping are unit-tested unprivileged.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {kind} {from} on {target}: {errno}")]
    Mount { kind: String, from: String, target: PathBuf, errno: nix::errno::Errno },
    #[error("unmount {target}: {errno}")]
    Unmount { target: PathBuf, errno: nix::errno::Errno },
    #[error("create mount point {path}: {source}")]
    MountPoint { path: PathBuf, source: std::io::Error },
}

/// One mount as containerd describes it (`type`, `source`, `options`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

pub trait MountSyscalls: Send + Sync {
    fn mount(&self, source: &str, target: &Path, kind: Option<&str>, flags: MsFlags, data: Option<&str>)
        -> nix::Result<()>;
    fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
}

/// The real syscalls.
#[derive(Debug, Default)]
pub struct Syscalls;

impl MountSyscalls for Syscalls {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        kind: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(Some(source), target, kind, flags, data)
    }

    fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        nix::mount::umount2(target, flags)
    }
}

/// Splits mount(8)-style options into flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => continue,
            "defaults" => continue,
            _ => {
                data.push(opt.clone());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, data.join(","))
}

/// Mounts `spec` on `target` (created as a directory when missing). A read-only bind needs a second remount.
pub fn mount(sys: &dyn MountSyscalls, spec: &MountSpec, target: &Path) -> Result<(), MountError> {
    if !target.exists() {
        std::fs::create_dir_all(target)
            .map_err(|source| MountError::MountPoint { path: target.to_path_buf(), source })?;
    }
    let (flags, data) = parse_options(&spec.options);
    let is_bind = flags.contains(MsFlags::MS_BIND) || spec.kind == "bind";
    let err = |errno| MountError::Mount {
        kind: spec.kind.clone(),
        from: spec.source.clone(),
        target: target.to_path_buf(),
        errno,
    };
    if is_bind {
        let bind = (flags & (MsFlags::MS_BIND | MsFlags::MS_REC)) | MsFlags::MS_BIND;
        sys.mount(&spec.source, target, None, bind, None).map_err(err)?;
        let rest = flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !rest.is_empty() {
            let remount = rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
            if let Err(e) = sys.mount("", target, None, remount, None) {
                let _ = sys.umount(target, MntFlags::MNT_DETACH);
                return Err(err(e));
            }
        }
        return Ok(());
    }
    let data = (!data.is_empty()).then_some(data.as_str());
    sys.mount(&spec.source, target, Some(&spec.kind), flags, data).map_err(err)
}

/// Turns `dir` into a mount point of its own with shared propagation, so that rootfs and volume mounts made
/// under it later also appear in virtiofsd's private mount namespace (a slave copy taken at its start).
pub fn make_shared_mount_point(sys: &dyn MountSyscalls, dir: &Path) -> Result<(), MountError> {
    let err = |errno| MountError::Mount {
        kind: "bind".into(),
        from: dir.display().to_string(),
        target: dir.to_path_buf(),
        errno,
    };
    let source = dir.display().to_string();
    sys.mount(&source, dir, None, MsFlags::MS_BIND, None).map_err(err)?;
    sys.mount("", dir, None, MsFlags::MS_SHARED, None).map_err(err)
}

/// Unmounts `target`; a busy mount is detached instead so cleanup always makes progress. Not mounted is fine.
pub fn unmount(sys: &dyn MountSyscalls, target: &Path) -> Result<(), MountError> {
    match sys.umount(target, MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => sys
            .umount(target, MntFlags::MNT_DETACH)
            .map_err(|errno| MountError::Unmount { target: target.to_path_buf(), errno }),
        Err(errno) => Err(MountError::Unmount { target: target.to_path_buf(), errno }),
    }
}

/// Mount points under `dir` according to /proc/self/mountinfo, deepest first (the order to unmount them).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

#[cfg(test)]
pub(crate) mod test_double {
    use std::sync::Mutex;

    use super::*;

    /// Records calls; fails the ones listed in `fail`.
    #[derive(Debug, Default)]
    pub struct RecordingSyscalls {
        pub calls: Mutex<Vec<String>>,
        pub fail_umount_with: Option<nix::errno::Errno>,
    }

    impl MountSyscalls for RecordingSyscalls {
        fn mount(
            &self,
            source: &str,
            target: &Path,
            kind: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> nix::Result<()> {
            self.calls.lock().unwrap().push(format!(
                "mount {source} {} {} {:?} {}",
                target.display(),
                kind.unwrap_or("-"),
                flags,
                data.unwrap_or("-")
            ));
            Ok(())
        }

        fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
            self.calls.lock().unwrap().push(format!("umount {} {:?}", target.display(), flags));
            match self.fail_umount_with {
                Some(e) if flags.is_empty() => Err(e),
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_double::RecordingSyscalls;
    use super::*;

    fn spec(kind: &str, source: &str, options: &[&str]) -> MountSpec {
        MountSpec { kind: kind.into(), source: source.into(), options: options.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn overlay_options_become_data() {
        let dir = tempfile::tempdir().unwrap();
        let sys = RecordingSyscalls::default();
        let target = dir.path().join("rootfs");
        let s = spec("overlay", "overlay", &["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"]);
        mount(&sys, &s, &target).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert_eq!(
            calls[0],
            format!(
                "mount overlay {} overlay MsFlags(0x0) index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2",
                target.display()
            )
        );
        assert!(target.is_dir());
    }

    #[test]
    fn read_only_bind_is_remounted() {
        let dir = tempfile::tempdir().unwrap();
        let sys = RecordingSyscalls::default();
        mount(&sys, &spec("bind", "/src", &["rbind", "ro"]), dir.path()).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(calls[0].contains("MS_BIND | MS_REC"), "{}", calls[0]);
        assert!(calls[1].contains("MS_RDONLY | MS_REMOUNT | MS_BIND"), "{}", calls[1]);
    }

    #[test]
    fn shared_dir_becomes_a_shared_mount_point() {
        let sys = RecordingSyscalls::default();
        make_shared_mount_point(&sys, Path::new("/run/kata-rs/sb/shared")).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert_eq!(
            *calls,
            [
                "mount /run/kata-rs/sb/shared /run/kata-rs/sb/shared - MsFlags(MS_BIND) -",
                "mount  /run/kata-rs/sb/shared - MsFlags(MS_SHARED) -",
            ]
        );
    }

    #[test]
    fn busy_unmount_falls_back_to_detach() {
        let sys = RecordingSyscalls { fail_umount_with: Some(nix::errno::Errno::EBUSY), ..Default::default() };
        unmount(&sys, Path::new("/x")).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert_eq!(*calls, ["umount /x MntFlags(0x0)", "umount /x MntFlags(MNT_DETACH)"]);
    }

    #[test]
    fn not_mounted_is_not_an_error() {
        let sys = RecordingSyscalls { fail_umount_with: Some(nix::errno::Errno::EINVAL), ..Default::default() };
        unmount(&sys, Path::new("/x")).unwrap();
    }

    #[test]
    fn flags_and_data_are_split() {
        let opts: Vec<String> = ["ro", "nosuid", "mode=755", "rw"].iter().map(|s| s.to_string()).collect();
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_NOSUID);
        assert_eq!(data, "mode=755");
    }
}
