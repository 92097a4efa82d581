//! One process in a container (its init or an exec): pid, stdio and exit, plus the checks
//! done before libcontainer runs it.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::unistd::Pid;

use crate::io::ProcessIo;
use crate::reaper::{ExitInfo, ExitWatch};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the process has no args")]
    NoArgs,
    #[error("executable '{name}' not found in the container rootfs (searched $PATH={path})")]
    NotFoundInPath { name: String, path: String },
    #[error("executable '{0}' not found in the container rootfs")]
    NotFound(String),
    #[error("'{0}' in the container rootfs is not an executable file")]
    NotExecutable(String),
}

/// A started (or created) process the agent waits for.
#[derive(Debug)]
pub struct Process {
    pub pid: Pid,
    pub io: Arc<ProcessIo>,
    exit: ExitWatch,
}

impl Process {
    pub fn new(pid: Pid, io: ProcessIo, exit: ExitWatch) -> Self {
        Self { pid, io: Arc::new(io), exit }
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The reaper went away: that only happens when the agent shuts down.
                return ExitInfo { status: 255, at: std::time::SystemTime::now() };
            }
        }
    }
}

/// Checks that `args[0]` resolves to an executable inside `rootfs` the way `execvp` in the
/// container will resolve it, so a missing binary fails at create time with its name instead
/// of as an opaque error from inside libcontainer.
pub fn check_executable(rootfs: &Path, args: &[String], env: &[String], cwd: &Path) -> Result<PathBuf, ProcessError> {
    let name = args.first().ok_or(ProcessError::NoArgs)?;
    if name.contains('/') {
        let in_container = if Path::new(name).is_absolute() { PathBuf::from(name) } else { cwd.join(name) };
        let host = resolve_in_root(rootfs, &in_container).ok_or_else(|| ProcessError::NotFound(name.clone()))?;
        return if is_executable(&host) { Ok(host) } else { Err(ProcessError::NotExecutable(name.clone())) };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        if let Some(host) = resolve_in_root(rootfs, &Path::new(dir).join(name)) {
            if is_executable(&host) {
                return Ok(host);
            }
        }
    }
    Err(ProcessError::NotFoundInPath { name: name.clone(), path: path.to_string() })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Resolves `path` (as seen inside the container) to a host path under `root`, following
/// symlinks as if `root` were `/`. Returns None when it does not exist.
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut resolved = PathBuf::from("/");
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut hops = 0;
    // Components still to walk, in reverse order so pop() yields the next one.
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    while let Some(p) = pending.pop() {
        if p.is_absolute() {
            resolved = PathBuf::from("/");
        }
        let comps: Vec<_> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        stack.extend(comps.into_iter().rev());
        while let Some(c) = stack.pop() {
            if c == ".." {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&c);
            let host = root.join(candidate.strip_prefix("/").ok()?);
            let meta = std::fs::symlink_metadata(&host).ok()?;
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let target = std::fs::read_link(&host).ok()?;
                pending.push(target);
                break;
            }
            resolved = candidate;
        }
    }
    Some(root.join(resolved.strip_prefix("/").ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::write(bin.join("busybox"), b"#!").expect("write");
        std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        symlink("/bin/busybox", bin.join("echo")).expect("symlink");
        std::fs::write(bin.join("data"), b"x").expect("write");
        dir
    }

    #[test]
    fn finds_absolute_symlinks_inside_the_rootfs() {
        let root = rootfs();
        let env = vec!["PATH=/usr/bin:/bin".to_string()];
        let found = check_executable(root.path(), &["echo".into()], &env, Path::new("/")).expect("found");
        assert_eq!(found, root.path().join("bin/busybox"));
    }

    #[test]
    fn missing_binary_names_it() {
        let root = rootfs();
        let env = vec!["PATH=/bin".to_string()];
        let err = check_executable(root.path(), &["nope".into()], &env, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("'nope'"), "{err}");
        let err = check_executable(root.path(), &["/bin/data".into()], &env, Path::new("/")).unwrap_err();
        assert!(matches!(err, ProcessError::NotExecutable(_)));
    }

    #[test]
    fn dotdot_cannot_escape_the_root() {
        let root = rootfs();
        let p = resolve_in_root(root.path(), Path::new("/../../bin/busybox"));
        assert_eq!(p, Some(root.path().join("bin/busybox")));
    }
}
