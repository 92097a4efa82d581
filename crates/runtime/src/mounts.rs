//! Host-side mounts: containerd's rootfs mounts and volumes placed inside the sandbox's shared directory.
//!
//! The syscalls sit behind [`MountSyscalls`] so the option parsing and bookkeeping are unit-tested unprivileged.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

use crate::host_fs::{self, HostFsError, Root};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {kind} {from} on {target}: {errno}")]
    Mount { kind: String, from: String, target: PathBuf, errno: nix::errno::Errno },
    #[error("unmount {target}: {errno}")]
    Unmount { target: PathBuf, errno: nix::errno::Errno },
    #[error(transparent)]
    HostFs(#[from] HostFsError),
    #[error("read {MOUNTINFO}: {err}; nothing is removed without knowing what is mounted")]
    MountInfo { err: std::io::Error },
    #[error("{target} is still mounted; leaving its directory in place")]
    StillMounted { target: PathBuf },
    #[error("remove {path}: {err}")]
    Remove { path: PathBuf, err: std::io::Error },
}

/// One mount as containerd describes it (`type`, `source`, `options`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

pub trait MountSyscalls: Send + Sync {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        kind: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
    /// The mount table, as /proc/self/mountinfo shows it.
    fn mountinfo(&self) -> std::io::Result<String> {
        std::fs::read_to_string(MOUNTINFO)
    }
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

/// Mounts `spec` on `target` with `forced` flags added. A bind needs a second remount for its flags (`ro`,
/// `nosuid`, ...); `remount_target` names the new mount for it, since `target` is a `/proc/self/fd/N` path
/// that still names the directory under the mount.
fn mount_with(
    sys: &dyn MountSyscalls,
    spec: &MountSpec,
    target: &Path,
    forced: MsFlags,
    remount_target: impl FnOnce() -> Result<PathBuf, MountError>,
) -> Result<(), MountError> {
    let (mut flags, data) = parse_options(&spec.options);
    flags |= forced;
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
            let again = remount_target()?;
            if let Err(e) = sys.mount("", &again, None, remount, None) {
                let _ = sys.umount(&again, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
                return Err(err(e));
            }
        }
        return Ok(());
    }
    let data = (!data.is_empty()).then_some(data.as_str());
    sys.mount(&spec.source, target, Some(&spec.kind), flags, data).map_err(err)
}

/// What a mount point below a sandbox root is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountPoint {
    Dir,
    File,
}

/// Mounts container data (`spec`) on `rel` below the sandbox root, always `nosuid,nodev`: a setuid binary or a
/// device node a container made must never be usable from the host. The mount point is created and opened
/// without following symlinks, and the mount targets the opened handle, so nothing can redirect it.
pub fn mount_beneath(
    sys: &dyn MountSyscalls,
    root: &Root,
    rel: &Path,
    point: MountPoint,
    spec: &MountSpec,
) -> Result<(), MountError> {
    let fd = match point {
        MountPoint::Dir => root.create_dirs(rel)?,
        MountPoint::File => root.create_file(rel)?,
    };
    let target = host_fs::fd_path(&fd);
    let path = root.path().join(rel);
    let forced = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut reopened = None;
    mount_with(sys, spec, &target, forced, || {
        // The handle still names the directory under the new mount: open the mount's root afresh.
        let fd = root.open_path(rel)?;
        let path = host_fs::fd_path(&fd);
        reopened = Some(fd);
        Ok(path)
    })
    .map_err(|e| match e {
        MountError::Mount { kind, from, errno, .. } => MountError::Mount { kind, from, target: path, errno },
        other => other,
    })
}

/// Sets up Kata's shared-file layout: `mounts` becomes a mount point of its own with a private peer group of
/// its own (shared, so mounts made under it later propagate), and `shared` a read-only, `nosuid,nodev` bind of
/// it that is a slave of that group. Rootfs and volume mounts made under `mounts` then appear in `shared`, in
/// virtiofsd's private mount namespace (a slave copy taken at its start) and so in the guest, while the guest
/// can write inside those mounts but never create, replace or remove the mount points themselves.
pub fn make_shared_view(sys: &dyn MountSyscalls, mounts: &Path, shared: &Path) -> Result<(), MountError> {
    let err = |target: &Path| {
        let target = target.to_path_buf();
        move |errno| MountError::Mount { kind: "bind".into(), from: mounts.display().to_string(), target, errno }
    };
    let source = mounts.display().to_string();
    sys.mount(&source, mounts, None, MsFlags::MS_BIND, None).map_err(err(mounts))?;
    // Leave whatever peer group the parent belongs to, then start our own.
    sys.mount("", mounts, None, MsFlags::MS_PRIVATE, None).map_err(err(mounts))?;
    sys.mount("", mounts, None, MsFlags::MS_SHARED, None).map_err(err(mounts))?;
    sys.mount(&source, shared, None, MsFlags::MS_BIND, None).map_err(err(shared))?;
    sys.mount("", shared, None, MsFlags::MS_SLAVE, None).map_err(err(shared))?;
    let read_only =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    sys.mount("", shared, None, read_only, None).map_err(err(shared))
}

/// Unmounts `target` without following a symlink in its last component; a busy mount is detached instead
/// so cleanup always makes progress. Not mounted is fine.
pub fn unmount(sys: &dyn MountSyscalls, target: &Path) -> Result<(), MountError> {
    match sys.umount(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => sys
            .umount(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
            .map_err(|errno| MountError::Unmount { target: target.to_path_buf(), errno }),
        Err(errno) => Err(MountError::Unmount { target: target.to_path_buf(), errno }),
    }
}

/// Mount points under `dir` (and `dir` itself) according to /proc/self/mountinfo, deepest first (the order
/// to unmount them). Fails when mountinfo cannot be read: callers must then not remove anything, since a
/// still-mounted host volume would be deleted with the directory.
pub fn mounts_under(sys: &dyn MountSyscalls, dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let text = sys.mountinfo().map_err(|err| MountError::MountInfo { err })?;
    Ok(mount_points_under(&text, dir))
}

const MOUNTINFO: &str = types::mountinfo::SELF_MOUNTINFO;

/// The mount points of a mountinfo text under `dir`, deepest first.
pub fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> =
        types::mountinfo::parse(mountinfo).into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(dir)).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Unmounts everything under `dir`, then removes it. Fails closed: when mountinfo cannot be read, or a mount
/// is still there after unmounting, nothing is removed, because removing a directory with a host volume still
/// mounted in it would delete the volume's contents. `std::fs::remove_dir_all` does not follow symlinks.
pub fn unmount_and_remove(sys: &dyn MountSyscalls, dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let targets = mounts_under(sys, dir)?;
    for target in &targets {
        unmount(sys, target)?;
    }
    if let Some(left) = mounts_under(sys, dir)?.into_iter().next() {
        return Err(MountError::StillMounted { target: left });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(targets),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(targets),
        Err(err) => Err(MountError::Remove { path: dir.to_path_buf(), err }),
    }
}

#[cfg(test)]
pub(crate) mod test_double {
    use std::sync::Mutex;

    use super::*;

    /// Records calls; fails the ones listed in `fail`. `mounted` is its mount table: mounts add to it,
    /// unmounts remove from it, and `mountinfo_fails` makes the table unreadable.
    #[derive(Debug, Default)]
    pub struct RecordingSyscalls {
        pub calls: Mutex<Vec<String>>,
        pub fail_umount_with: Option<nix::errno::Errno>,
        pub mounted: Mutex<Vec<PathBuf>>,
        pub stuck: Option<PathBuf>,
        pub mountinfo_fails: bool,
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
                Some(e) if !flags.contains(MntFlags::MNT_DETACH) => Err(e),
                _ => {
                    if self.stuck.as_deref() != Some(target) {
                        self.mounted.lock().unwrap().retain(|m| m != target);
                    }
                    Ok(())
                }
            }
        }

        fn mountinfo(&self) -> std::io::Result<String> {
            if self.mountinfo_fails {
                return Err(std::io::Error::from_raw_os_error(nix::libc::EACCES));
            }
            let lines: Vec<String> = self
                .mounted
                .lock()
                .unwrap()
                .iter()
                .map(|m| format!("36 35 0:1 / {} rw - tmpfs tmpfs rw", m.display()))
                .collect();
            Ok(lines.join("\n"))
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
        let root = Root::open(dir.path()).unwrap();
        let sys = RecordingSyscalls::default();
        let s = spec("overlay", "overlay", &["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"]);
        mount_beneath(&sys, &root, Path::new("rootfs"), MountPoint::Dir, &s).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert!(
            calls[0]
                .ends_with(" overlay MsFlags(MS_NOSUID | MS_NODEV) index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2"),
            "{}",
            calls[0]
        );
        assert!(dir.path().join("rootfs").is_dir());
    }

    #[test]
    fn read_only_bind_is_remounted() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let sys = RecordingSyscalls::default();
        mount_beneath(&sys, &root, Path::new("vol"), MountPoint::Dir, &spec("bind", "/src", &["rbind", "ro"])).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(calls[0].contains("MS_BIND | MS_REC"), "{}", calls[0]);
        assert!(calls[1].contains("MS_RDONLY | MS_NOSUID | MS_NODEV | MS_REMOUNT | MS_BIND"), "{}", calls[1]);
    }

    #[test]
    fn the_guest_gets_a_read_only_slave_view_of_the_host_mounts() {
        let sys = RecordingSyscalls::default();
        make_shared_view(&sys, Path::new("/r/sb/mounts"), Path::new("/r/sb/shared")).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert_eq!(
            *calls,
            [
                "mount /r/sb/mounts /r/sb/mounts - MsFlags(MS_BIND) -",
                "mount  /r/sb/mounts - MsFlags(MS_PRIVATE) -",
                "mount  /r/sb/mounts - MsFlags(MS_SHARED) -",
                "mount /r/sb/mounts /r/sb/shared - MsFlags(MS_BIND) -",
                "mount  /r/sb/shared - MsFlags(MS_SLAVE) -",
                "mount  /r/sb/shared - MsFlags(MS_RDONLY | MS_NOSUID | MS_NODEV | MS_REMOUNT | MS_BIND) -",
            ]
        );
    }

    #[test]
    fn container_data_is_mounted_nosuid_nodev_through_a_handle() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        let sys = RecordingSyscalls::default();
        let overlay = spec("overlay", "overlay", &["lowerdir=/l", "suid", "dev"]);
        mount_beneath(&sys, &root, Path::new("mounts/c1/rootfs"), MountPoint::Dir, &overlay).unwrap();
        mount_beneath(
            &sys,
            &root,
            Path::new("mounts/c1/mounts/2"),
            MountPoint::File,
            &spec("bind", "/etc/hosts", &["rbind"]),
        )
        .unwrap();
        assert!(dir.path().join("mounts/c1/rootfs").is_dir());
        assert!(dir.path().join("mounts/c1/mounts/2").is_file());
        let calls = sys.calls.lock().unwrap();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert!(calls[0].starts_with("mount overlay /proc/self/fd/"), "{}", calls[0]);
        assert!(calls[0].ends_with("overlay MsFlags(MS_NOSUID | MS_NODEV) lowerdir=/l"), "{}", calls[0]);
        assert!(calls[1].starts_with("mount /etc/hosts /proc/self/fd/"), "{}", calls[1]);
        assert!(calls[2].contains("MS_NOSUID | MS_NODEV | MS_REMOUNT | MS_BIND"), "{}", calls[2]);
    }

    #[test]
    fn a_symlinked_mount_point_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("mounts/c1")).unwrap();
        std::os::unix::fs::symlink(victim.path(), dir.path().join("mounts/c1/mounts")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let sys = RecordingSyscalls::default();
        let err =
            mount_beneath(&sys, &root, Path::new("mounts/c1/mounts/0"), MountPoint::Dir, &spec("bind", "/x", &[]))
                .unwrap_err();
        assert!(err.to_string().contains("mounts/c1/mounts"), "{err}");
        assert!(sys.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn busy_unmount_falls_back_to_detach_and_never_follows_symlinks() {
        let sys = RecordingSyscalls { fail_umount_with: Some(nix::errno::Errno::EBUSY), ..Default::default() };
        unmount(&sys, Path::new("/x")).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert_eq!(*calls, ["umount /x MntFlags(UMOUNT_NOFOLLOW)", "umount /x MntFlags(MNT_DETACH | UMOUNT_NOFOLLOW)"]);
    }

    #[test]
    fn removal_fails_closed_when_the_mount_table_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("volume-data"), b"precious").unwrap();
        let sys = RecordingSyscalls { mountinfo_fails: true, ..Default::default() };
        let err = unmount_and_remove(&sys, dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("read /proc/self/mountinfo: "), "{err}");
        assert!(dir.path().join("volume-data").exists());
    }

    #[test]
    fn removal_fails_closed_while_something_stays_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("mounts/c1/mounts/0");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(volume.join("data"), b"precious").unwrap();
        let sys = RecordingSyscalls { stuck: Some(volume.clone()), ..Default::default() };
        sys.mounted.lock().unwrap().extend([dir.path().join("mounts"), volume.clone()]);
        let err = unmount_and_remove(&sys, dir.path()).unwrap_err().to_string();
        assert_eq!(err, format!("{} is still mounted; leaving its directory in place", volume.display()));
        assert!(volume.join("data").exists());
    }

    #[test]
    fn removal_unmounts_deepest_first_then_removes() {
        let dir = tempfile::tempdir().unwrap();
        let sys = RecordingSyscalls::default();
        let (outer, inner) = (dir.path().join("mounts"), dir.path().join("mounts/c1/rootfs"));
        std::fs::create_dir_all(&inner).unwrap();
        sys.mounted.lock().unwrap().extend([outer.clone(), inner.clone()]);
        assert_eq!(unmount_and_remove(&sys, dir.path()).unwrap(), [inner, outer]);
        assert!(!dir.path().exists());
    }

    #[test]
    fn mountinfo_paths_are_unescaped_and_filtered() {
        let text = "1 0 0:1 / /run/kata-rs/sb/mounts/a\\040b rw - x x rw\n2 0 0:1 / /run/kata-rs/sbx rw - x x rw";
        assert_eq!(
            mount_points_under(text, Path::new("/run/kata-rs/sb")),
            [PathBuf::from("/run/kata-rs/sb/mounts/a b")]
        );
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
