//! Symlink-safe file operations under a sandbox's directory.
//!
//! Paths below a sandbox root are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, one
//! component at a time when creating, so no symlink planted anywhere on the way (by a guest that reached a
//! shared directory, or by anyone else) can make the host create, open or mount outside the sandbox root.
//! Mounts then target the opened file descriptor (`/proc/self/fd/N`), never a path that could be swapped
//! between the check and the mount.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{mkdirat, Mode};

#[derive(Debug, thiserror::Error)]
pub enum HostFsError {
    #[error("{what} {path}: {err}")]
    Io { what: &'static str, path: PathBuf, err: std::io::Error },
    #[error("{what} {path}: {errno}")]
    Sys { what: &'static str, path: PathBuf, errno: Errno },
    #[error("{path} is not a plain relative path")]
    NotRelative { path: PathBuf },
    #[error("{path} is a symlink or not a directory; refusing to use it")]
    NotPrivateDir { path: PathBuf },
}

type Result<T> = std::result::Result<T, HostFsError>;

/// What a path below a root may not do while it is resolved: leave the root, or follow any symlink.
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// Creates `dir` (and missing parents) owned by us with mode 0700, or tightens an existing one to 0700.
/// The last component must not be a symlink.
pub fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if !meta.file_type().is_dir() => return Err(HostFsError::NotPrivateDir { path: dir.into() }),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create", dir))?;
        }
        Err(e) => return Err(io("inspect", dir)(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io("restrict permissions of", dir))
}

/// A directory handle from which relative paths are resolved without leaving it or following symlinks.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    fd: OwnedFd,
}

impl Root {
    /// Opens `path`, which must be a directory and not a symlink.
    pub fn open(path: &Path) -> Result<Root> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(path, flags, Mode::empty()).map_err(|errno| HostFsError::Sys {
            what: "open",
            path: path.into(),
            errno,
        })?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        Ok(Root { path: path.into(), fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` below the root as an `O_PATH` handle, following no symlink.
    pub fn open_path(&self, rel: &Path) -> Result<OwnedFd> {
        let rel = check_relative(rel)?;
        // No O_NOFOLLOW: with it, O_PATH would hand out a trailing symlink itself; without it,
        // RESOLVE_NO_SYMLINKS refuses every symlink, the last component's too.
        let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC).resolve(beneath());
        let fd = openat2(self.fd.as_raw_fd(), rel, how).map_err(|errno| HostFsError::Sys {
            what: "open",
            path: self.path.join(rel),
            errno,
        })?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Creates the directory `rel` and its missing parents below the root (mode 0700), one component at a
    /// time, and returns a handle to it.
    pub fn create_dirs(&self, rel: &Path) -> Result<OwnedFd> {
        let rel = check_relative(rel)?;
        let mut dir = self.dup()?;
        let mut walked = PathBuf::new();
        for part in rel.components() {
            walked.push(part);
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(beneath());
            let open = |dir: &OwnedFd| openat2(dir.as_raw_fd(), part.as_os_str(), how);
            let fd = match open(&dir) {
                Err(Errno::ENOENT) => {
                    match mkdirat(Some(dir.as_raw_fd()), part.as_os_str(), Mode::from_bits_truncate(0o700)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(errno) => {
                            return Err(HostFsError::Sys { what: "create", path: self.path.join(&walked), errno })
                        }
                    }
                    open(&dir)
                }
                other => other,
            }
            .map_err(|errno| HostFsError::Sys {
                what: "open directory",
                path: self.path.join(&walked),
                errno,
            })?;
            // SAFETY: openat2 returned a new descriptor that nothing else owns.
            dir = unsafe { OwnedFd::from_raw_fd(fd) };
        }
        Ok(dir)
    }

    /// Creates the empty regular file `rel` (a mount point for a file) below the root, with its parents,
    /// and returns an `O_PATH` handle to it. An existing regular file is reused; anything else is refused.
    pub fn create_file(&self, rel: &Path) -> Result<OwnedFd> {
        let rel = check_relative(rel)?;
        let (parent, name) = match (rel.parent(), rel.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => return Err(HostFsError::NotRelative { path: rel.into() }),
        };
        let dir = if parent.as_os_str().is_empty() { self.dup()? } else { self.create_dirs(parent)? };
        let how = OpenHow::new()
            .flags(OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(0o600))
            .resolve(beneath());
        let fd = openat2(dir.as_raw_fd(), name, how).map_err(|errno| HostFsError::Sys {
            what: "create file",
            path: self.path.join(rel),
            errno,
        })?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let meta = file.metadata().map_err(io("inspect", &self.path.join(rel)))?;
        if !meta.file_type().is_file() {
            return Err(HostFsError::NotPrivateDir { path: self.path.join(rel) });
        }
        drop(file);
        self.open_path(rel)
    }

    fn dup(&self) -> Result<OwnedFd> {
        self.fd.try_clone().map_err(io("duplicate handle of", &self.path))
    }
}

/// The path through which a mount syscall reaches exactly the file behind `fd`.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn check_relative(rel: &Path) -> Result<&Path> {
    let plain = !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(rel)
    } else {
        Err(HostFsError::NotRelative { path: rel.into() })
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HostFsError {
    let path = path.to_path_buf();
    move |err| HostFsError::Io { what, path, err }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn private_dir_is_0700_and_tightens_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&new).unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn private_dir_refuses_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/tmp", &link).unwrap();
        let err = private_dir(&link).unwrap_err().to_string();
        assert!(err.contains("is a symlink or not a directory"), "{err}");
    }

    #[test]
    fn creates_dirs_and_files_beneath() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        root.create_dirs(Path::new("c1/rootfs")).unwrap();
        assert!(dir.path().join("c1/rootfs").is_dir());
        assert_eq!(std::fs::metadata(dir.path().join("c1")).unwrap().mode() & 0o777, 0o700);
        let fd = root.create_file(Path::new("c1/mounts/3")).unwrap();
        assert!(dir.path().join("c1/mounts/3").is_file());
        assert_eq!(
            std::fs::canonicalize(fd_path(&fd)).unwrap(),
            dir.path().join("c1/mounts/3").canonicalize().unwrap()
        );
        root.create_file(Path::new("c1/mounts/3")).unwrap();
    }

    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("c1")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("c1/mounts")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), dir.path().join("c1/file")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let err = root.create_dirs(Path::new("c1/mounts/0")).unwrap_err().to_string();
        assert!(err.contains("c1/mounts"), "{err}");
        assert!(root.create_file(Path::new("c1/mounts/0")).is_err());
        assert!(root.create_file(Path::new("c1/file")).is_err());
        assert!(root.open_path(Path::new("c1/mounts")).is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing was created outside");
    }

    #[test]
    fn escaping_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::open(dir.path()).unwrap();
        for bad in ["", "/etc", "../x", "a/../../x"] {
            assert!(root.create_dirs(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
