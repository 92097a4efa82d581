//! Files under the host root (`--host-root`, `/host` in the DaemonSet), touched without following a symlink.
//!
//! Every path is a plain absolute host path (`/usr/local/bin/kata-runtime`) resolved below the root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, one directory at a time, so a symlink planted anywhere on
//! the way (a directory component, or the file itself) is refused instead of taking the installer elsewhere.
//! Files are replaced by writing a fresh temporary file in the same directory and renaming it over the
//! target: a reader sees the old file or the new one, never half of one, and a rename replaces a symlink
//! rather than writing through it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat2, renameat, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};

/// What is at a host path, looked at without following it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Missing,
    /// A regular file, the SHA-256 of its contents and its permission bits.
    File {
        sha256: String,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
    /// A directory, device, socket or fifo.
    Other,
}

#[derive(Debug)]
pub struct HostRoot {
    path: PathBuf,
    fd: OwnedFd,
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// `/usr/local/bin/x` as `usr/local/bin/x`; anything but plain components (`..`, `.`, a relative path) is
/// refused, so a path from the manifest cannot name something outside the root.
pub fn relative(host_path: &str) -> Result<PathBuf> {
    let path = Path::new(host_path);
    let mut parts = path.components();
    let plain = parts.next() == Some(Component::RootDir)
        && path.components().count() > 1
        && parts.all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        bail!("{host_path:?} is not a plain absolute path (no `..`, `.` or relative paths)");
    }
    Ok(path.components().skip(1).collect())
}

fn split(rel: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(anyhow!("{} has no file name", rel.display())),
    }
}

impl HostRoot {
    /// Opens the host root itself; the caller named it, so it may be reached through a symlink.
    pub fn open(path: &Path) -> Result<HostRoot> {
        let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| anyhow!("open the host root {}: {e}", path.display()))?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        Ok(HostRoot { path: path.into(), fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Where `host_path` is as this process sees it (for messages).
    pub fn display(&self, host_path: &str) -> String {
        self.path.join(host_path.trim_start_matches('/')).display().to_string()
    }

    /// The directory holding `rel`, or `None` when some component is missing and `created` is `None`.
    /// With `created`, missing directories are made (0755) and their host paths pushed to it.
    fn parent_dir(&self, rel: &Path, mut created: Option<&mut Vec<String>>) -> Result<Option<OwnedFd>> {
        let (parent, _) = split(rel)?;
        let mut dir = self.fd.try_clone().context("duplicate the host root's handle")?;
        let mut walked = PathBuf::from("/");
        for part in parent.components() {
            walked.push(part);
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(beneath());
            let open = |dir: &OwnedFd| openat2(dir.as_raw_fd(), part.as_os_str(), how);
            let fd = match (open(&dir), created.as_deref_mut()) {
                (Err(Errno::ENOENT), None) => return Ok(None),
                (Err(Errno::ENOENT), Some(created)) => {
                    match mkdirat(Some(dir.as_raw_fd()), part.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) => created.push(walked.display().to_string()),
                        Err(Errno::EEXIST) => {}
                        Err(e) => bail!("create directory {}: {e}", self.display(&walked.to_string_lossy())),
                    }
                    open(&dir)
                }
                (other, _) => other,
            }
            .map_err(|e| self.refusal(&dir, part.as_os_str(), &walked, "open directory", e))?;
            // SAFETY: openat2 returned a new descriptor that nothing else owns.
            dir = unsafe { OwnedFd::from_raw_fd(fd) };
        }
        Ok(Some(dir))
    }

    /// The error for a failed open of `name` in `dir`, saying so when a symlink was refused.
    fn refusal(&self, dir: &OwnedFd, name: &std::ffi::OsStr, walked: &Path, what: &str, e: Errno) -> anyhow::Error {
        let shown = self.display(&walked.to_string_lossy());
        let is_link = fstatat(Some(dir.as_raw_fd()), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK);
        match e {
            _ if is_link => anyhow!("{shown} is a symlink; refusing to {what} through it"),
            Errno::ELOOP | Errno::EXDEV => anyhow!("{shown} leads out of the host root; refusing to {what} through it"),
            Errno::ENOTDIR => anyhow!("{shown} is not a directory; refusing to {what} through it"),
            e => anyhow!("{what} {shown}: {e}"),
        }
    }

    /// What is at `host_path`, not following a symlink there (and refusing one on the way).
    pub fn inspect(&self, host_path: &str) -> Result<Entry> {
        let rel = relative(host_path)?;
        let Some(dir) = self.parent_dir(&rel, None)? else { return Ok(Entry::Missing) };
        let (_, name) = split(&rel)?;
        let stat = match fstatat(Some(dir.as_raw_fd()), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(Entry::Missing),
            Err(e) => bail!("inspect {}: {e}", self.display(host_path)),
        };
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name)
                    .map_err(|e| anyhow!("read the symlink {}: {e}", self.display(host_path)))?;
                Ok(Entry::Symlink { target: target.into() })
            }
            SFlag::S_IFREG => {
                let mut file = self.open_file(&dir, name, host_path)?;
                let sha256 = sha256_of(&mut file).with_context(|| format!("read {}", self.display(host_path)))?;
                Ok(Entry::File { sha256, mode: stat.st_mode & 0o7777 })
            }
            _ => Ok(Entry::Other),
        }
    }

    fn open_file(&self, dir: &OwnedFd, name: &std::ffi::OsStr, host_path: &str) -> Result<File> {
        let how = OpenHow::new().flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).resolve(beneath());
        let fd = openat2(dir.as_raw_fd(), name, how)
            .map_err(|e| self.refusal(dir, name, &PathBuf::from(host_path), "read", e))?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        if !file.metadata()?.is_file() {
            bail!("{} is not a regular file", self.display(host_path));
        }
        Ok(file)
    }

    /// The regular file at `host_path`, opened for reading without following a symlink.
    pub fn open_read(&self, host_path: &str) -> Result<File> {
        let rel = relative(host_path)?;
        let dir = self.parent_dir(&rel, None)?.ok_or_else(|| anyhow!("{} does not exist", self.display(host_path)))?;
        let (_, name) = split(&rel)?;
        self.open_file(&dir, name, host_path)
    }

    /// The contents of the regular file at `host_path`, or `None` when it does not exist. A symlink there
    /// is refused, not followed.
    pub fn read(&self, host_path: &str) -> Result<Option<Vec<u8>>> {
        let rel = relative(host_path)?;
        let Some(dir) = self.parent_dir(&rel, None)? else { return Ok(None) };
        let (_, name) = split(&rel)?;
        let mut file = match self.open_file(&dir, name, host_path) {
            Ok(file) => file,
            Err(_) if matches!(self.inspect(host_path), Ok(Entry::Missing)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("read {}", self.display(host_path)))?;
        Ok(Some(bytes))
    }

    /// Replaces `host_path` with what `source` yields (mode `mode`), creating missing directories (pushed to
    /// `created`), through a temporary file renamed into place. Returns the SHA-256 written.
    pub fn write(
        &self,
        host_path: &str,
        source: &mut dyn Read,
        mode: u32,
        created: &mut Vec<String>,
    ) -> Result<String> {
        let rel = relative(host_path)?;
        let dir = self.parent_dir(&rel, Some(created))?.ok_or_else(|| anyhow!("no directory for {host_path}"))?;
        let (_, name) = split(&rel)?;
        let tmp = temp_name(name);
        let how = OpenHow::new()
            .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(0o600))
            .resolve(beneath());
        let fd = openat2(dir.as_raw_fd(), tmp.as_str(), how)
            .map_err(|e| anyhow!("create a temporary file beside {}: {e}", self.display(host_path)))?;
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let written = (|| -> Result<String> {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = source.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])?;
            }
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            file.sync_all()?;
            renameat(Some(dir.as_raw_fd()), tmp.as_str(), Some(dir.as_raw_fd()), name)?;
            Ok(hex(&hasher.finalize()))
        })();
        if written.is_err() {
            let _ = unlinkat(Some(dir.as_raw_fd()), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written.with_context(|| format!("write {}", self.display(host_path)))
    }

    /// Makes `host_path` a symlink to `target`, replacing what is there by a rename.
    pub fn symlink(&self, host_path: &str, target: &str, created: &mut Vec<String>) -> Result<()> {
        let rel = relative(host_path)?;
        let dir = self.parent_dir(&rel, Some(created))?.ok_or_else(|| anyhow!("no directory for {host_path}"))?;
        let (_, name) = split(&rel)?;
        let tmp = temp_name(name);
        symlinkat(target, Some(dir.as_raw_fd()), tmp.as_str())
            .and_then(|()| renameat(Some(dir.as_raw_fd()), tmp.as_str(), Some(dir.as_raw_fd()), name))
            .map_err(|e| {
                let _ = unlinkat(Some(dir.as_raw_fd()), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                anyhow!("make {} a symlink to {target}: {e}", self.display(host_path))
            })
    }

    /// Removes the file or symlink at `host_path` (never what a symlink points to); a missing one is fine.
    pub fn remove(&self, host_path: &str) -> Result<()> {
        let rel = relative(host_path)?;
        let Some(dir) = self.parent_dir(&rel, None)? else { return Ok(()) };
        let (_, name) = split(&rel)?;
        match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => bail!("remove {}: {e}", self.display(host_path)),
        }
    }

    /// Removes the directory at `host_path` if it is empty; says whether it did.
    pub fn remove_empty_dir(&self, host_path: &str) -> Result<bool> {
        let rel = relative(host_path)?;
        let Some(dir) = self.parent_dir(&rel, None)? else { return Ok(false) };
        let (_, name) = split(&rel)?;
        match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT | Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR) => Ok(false),
            Err(e) => bail!("remove directory {}: {e}", self.display(host_path)),
        }
    }
}

fn temp_name(name: &std::ffi::OsStr) -> String {
    format!(".{}.kata-rs.{}.tmp", name.to_string_lossy(), std::process::id())
}

pub fn sha256_of(source: &mut dyn Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(source, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> (tempfile::TempDir, HostRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::open(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn paths_must_be_plain_and_absolute() {
        for bad in ["", "/", "usr/bin/x", "/usr/../etc/passwd", "/..", "/usr/bin/.."] {
            assert!(relative(bad).is_err(), "{bad}");
        }
        assert_eq!(relative("/usr/local/bin/x").unwrap(), PathBuf::from("usr/local/bin/x"));
    }

    #[test]
    fn a_write_creates_directories_and_replaces_by_rename() {
        let (dir, root) = root();
        let mut created = Vec::new();
        let sha = root.write("/a/b/f", &mut &b"one"[..], 0o755, &mut created).unwrap();
        assert_eq!(created, vec!["/a".to_string(), "/a/b".to_string()]);
        assert_eq!(std::fs::read(dir.path().join("a/b/f")).unwrap(), b"one");
        let mode = std::fs::metadata(dir.path().join("a/b/f")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        assert_eq!(root.inspect("/a/b/f").unwrap(), Entry::File { sha256: sha, mode: 0o755 });
        root.write("/a/b/f", &mut &b"two"[..], 0o644, &mut created).unwrap();
        assert_eq!(created.len(), 2);
        assert_eq!(std::fs::read(dir.path().join("a/b/f")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path().join("a/b")).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_written_through() {
        let (dir, root) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        symlink(outside.path().join("victim"), dir.path().join("bin/f")).unwrap();
        root.write("/bin/f", &mut &b"new"[..], 0o755, &mut Vec::new()).unwrap();
        assert_eq!(std::fs::read(outside.path().join("victim")).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(dir.path().join("bin/f")).unwrap().is_file());
    }

    #[test]
    fn a_symlinked_directory_component_is_refused() {
        let (dir, root) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("usr")).unwrap();
        symlink(outside.path(), dir.path().join("usr/local")).unwrap();
        let err = root.write("/usr/local/bin/f", &mut &b"x"[..], 0o755, &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("is a symlink"), "{err:#}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // An absolute symlink that would stay inside the root is refused as well: it is resolved by the
        // host's root, not ours.
        std::fs::remove_file(dir.path().join("usr/local")).unwrap();
        symlink("/tmp", dir.path().join("usr/local")).unwrap();
        assert!(root.inspect("/usr/local/x").is_err());
        assert!(root.read("/usr/local/x").is_err());
        assert!(root.remove("/usr/local/x").is_err());
    }

    #[test]
    fn reads_do_not_follow_a_symlink() {
        let (dir, root) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        symlink(outside.path().join("secret"), dir.path().join("config")).unwrap();
        let err = root.read("/config").unwrap_err();
        assert!(format!("{err:#}").contains("is a symlink"), "{err:#}");
        assert_eq!(root.read("/missing").unwrap(), None);
        assert!(matches!(root.inspect("/config").unwrap(), Entry::Symlink { .. }));
    }

    #[test]
    fn remove_takes_the_link_not_its_target() {
        let (dir, root) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        symlink(outside.path().join("victim"), dir.path().join("l")).unwrap();
        root.remove("/l").unwrap();
        assert!(outside.path().join("victim").exists());
        assert_eq!(root.inspect("/l").unwrap(), Entry::Missing);
    }
}
