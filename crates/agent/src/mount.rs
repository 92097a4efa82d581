//! Filesystems the agent mounts: the init set when it is PID 1 and the shared filesystem.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use types::mountinfo::{self, MountInfo};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mount point {0}")]
    MountPoint(PathBuf, #[source] std::io::Error),
    #[error("cannot mount {fstype} '{source_name}' on {target}")]
    Mount {
        fstype: String,
        source_name: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot unmount {0}")]
    Unmount(PathBuf, #[source] nix::Error),
}

/// The shared filesystem carrying container rootfs and volumes from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedFsKind {
    VirtioFs,
    NineP,
}

pub const DEFAULT_SHARED_MOUNT: &str = "/run/kata-containers/shared";

/// One mount of the PID-1 set.
struct InitMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and cgroup2. Each failure is
/// logged and skipped (a mount that already exists is fine, e.g. devtmpfs automount).
pub fn mount_init_filesystems() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let list = [
        InitMount { fstype: "proc", target: "/proc", flags: nodev, data: None },
        InitMount { fstype: "sysfs", target: "/sys", flags: nodev, data: None },
        InitMount { fstype: "devtmpfs", target: "/dev", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
        InitMount {
            fstype: "devpts",
            target: "/dev/pts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        },
        InitMount { fstype: "tmpfs", target: "/dev/shm", flags: nodev, data: Some("mode=1777") },
        InitMount {
            fstype: "tmpfs",
            target: "/run",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        InitMount {
            fstype: "tmpfs",
            target: "/tmp",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        InitMount { fstype: "cgroup2", target: "/sys/fs/cgroup", flags: nodev, data: Some("nsdelegate") },
    ];
    for m in list {
        if is_mountpoint(Path::new(m.target)) {
            continue;
        }
        if let Err(err) = mount_fs(m.fstype, m.fstype, Path::new(m.target), m.flags, m.data) {
            tracing::warn!("{}", crate::error_chain(&err));
        }
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    for (src, dst) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        let _ = std::os::unix::fs::symlink(src, dst);
    }
}

/// Mounts the host share at `target`.
pub fn mount_shared_fs(kind: &SharedFsKind, tag: &str, target: &Path) -> Result<(), MountError> {
    if is_mountpoint(target) {
        return Ok(());
    }
    match kind {
        SharedFsKind::VirtioFs => mount_fs("virtiofs", tag, target, MsFlags::empty(), None),
        SharedFsKind::NineP => {
            mount_fs("9p", tag, target, MsFlags::empty(), Some("trans=virtio,version=9p2000.L,cache=mmap,msize=512000"))
        }
    }
}

pub fn unmount(target: &Path) -> Result<(), MountError> {
    if !is_mountpoint(target) {
        return Ok(());
    }
    umount2(target, MntFlags::MNT_DETACH).map_err(|e| MountError::Unmount(target.to_path_buf(), e))
}

fn mount_fs(fstype: &str, source: &str, target: &Path, flags: MsFlags, data: Option<&str>) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|e| MountError::MountPoint(target.to_path_buf(), e))?;
    mount(Some(source), target, Some(fstype), flags, data).map_err(|e| MountError::Mount {
        fstype: fstype.to_string(),
        source_name: source.to_string(),
        target: target.to_path_buf(),
        source: e,
    })
}

/// True when `path` is listed as a mount point in /proc/self/mountinfo.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(mounts) = mountinfo::read_self() else { return false };
    mounts_have(&mounts, path)
}

/// True when `/` is the kernel's initramfs ("rootfs"), from which pivot_root(2) is refused
/// with EINVAL; containers then need libcontainer's no-pivot mode (MS_MOVE + chroot).
pub fn root_is_initramfs() -> bool {
    let Ok(mounts) = mountinfo::read_self() else { return false };
    root_fstype(&mounts) == Some("rootfs")
}

/// The filesystem type of the last mount on `/` (it hides the earlier ones).
fn root_fstype(mounts: &[MountInfo]) -> Option<&str> {
    mounts.iter().rev().find(|m| m.mount_point == Path::new("/")).map(|m| m.fs_type.as_str())
}

fn mounts_have(mounts: &[MountInfo], path: &Path) -> bool {
    mounts.iter().any(|m| m.mount_point == path)
}

/// Enables every available controller for child cgroups of the root.
pub fn enable_cgroup_controllers() {
    let root = Path::new("/sys/fs/cgroup");
    let Ok(available) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
        tracing::warn!("no cgroup v2 hierarchy at /sys/fs/cgroup");
        return;
    };
    for c in available.split_whitespace() {
        if let Err(err) = std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::warn!(controller = c, %err, "cannot enable cgroup controller");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_matched_on_the_mount_point_field() {
        let info = mountinfo::parse(
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n30 22 0:26 / /run/kata-containers/shared rw - 9p kataShared rw\n",
        );
        assert!(mounts_have(&info, Path::new("/run/kata-containers/shared")));
        assert!(!mounts_have(&info, Path::new("/run")));
    }

    #[test]
    fn initramfs_root_is_detected() {
        let initramfs = mountinfo::parse("1 1 0:2 / / rw - rootfs rootfs rw\n22 1 0:21 / /proc rw - proc proc rw\n");
        assert_eq!(root_fstype(&initramfs), Some("rootfs"));
        let disk = mountinfo::parse("25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n");
        assert_eq!(root_fstype(&disk), Some("ext4"));
    }
}
