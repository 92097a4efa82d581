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
    /// When its program was started: at exec for an exec, at StartContainer for an init.
    pub started: std::sync::OnceLock<std::time::Instant>,
}

impl Process {
    pub fn new(pid: Pid, io: ProcessIo, exit: ExitWatch) -> Self {
        Self { pid, io: Arc::new(io), exit, started: std::sync::OnceLock::new() }
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

/// A container's filesystem as its processes will see it: the rootfs with the spec's mounts on top. Bind
/// mounts are followed to their source; what lies under any other mount (a tmpfs, proc) cannot be known
/// before it is mounted.
#[derive(Debug, Clone, Default)]
pub struct RootView {
    pub root: PathBuf,
    /// (destination in the container, source in the guest for a bind mount).
    pub mounts: Vec<(PathBuf, Option<PathBuf>)>,
}

/// Where a container path is in the guest.
enum Located {
    At(PathBuf),
    /// Under a mount whose content is only there once the container runs.
    Unknown,
}

impl RootView {
    pub fn new(root: &Path) -> Self {
        RootView { root: root.to_path_buf(), mounts: Vec::new() }
    }

    /// The deepest mount holding `path` (absolute, normalised) decides where it is.
    fn locate(&self, path: &Path) -> Located {
        let mount = self
            .mounts
            .iter()
            .filter(|(dest, _)| path.starts_with(dest))
            .max_by_key(|(dest, _)| dest.as_os_str().len());
        match mount {
            Some((dest, Some(source))) => {
                let rest = path.strip_prefix(dest).unwrap_or(Path::new(""));
                Located::At(if rest.as_os_str().is_empty() { source.clone() } else { source.join(rest) })
            }
            Some((_, None)) => Located::Unknown,
            None => Located::At(self.root.join(path.strip_prefix("/").unwrap_or(path))),
        }
    }
}

/// Checks that `args[0]` resolves to an executable in the container the way `execvp` in the container will
/// resolve it (through the rootfs and the spec's bind mounts, e.g. a script on a volume), so a missing binary
/// fails at create time with its name instead of as an opaque error from inside libcontainer. A path under a
/// mount that does not exist yet is left to the exec to judge.
pub fn check_executable(view: &RootView, args: &[String], env: &[String], cwd: &Path) -> Result<(), ProcessError> {
    let name = args.first().ok_or(ProcessError::NoArgs)?;
    if name.contains('/') {
        let in_container = if Path::new(name).is_absolute() { PathBuf::from(name) } else { cwd.join(name) };
        return match resolve_in_view(view, &in_container) {
            Resolved::Unknown => Ok(()),
            Resolved::Missing => Err(ProcessError::NotFound(name.clone())),
            Resolved::At(p) if is_executable(&p) => Ok(()),
            Resolved::At(_) => Err(ProcessError::NotExecutable(name.clone())),
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        match resolve_in_view(view, &Path::new(dir).join(name)) {
            Resolved::Unknown => return Ok(()),
            Resolved::At(p) if is_executable(&p) => return Ok(()),
            _ => {}
        }
    }
    Err(ProcessError::NotFoundInPath { name: name.clone(), path: path.to_string() })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[derive(Debug, PartialEq, Eq)]
enum Resolved {
    At(PathBuf),
    Missing,
    Unknown,
}

/// Walks `path` component by component through the view, following symlinks as the container will.
fn resolve_in_view(view: &RootView, path: &Path) -> Resolved {
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
            let Located::At(at) = view.locate(&candidate) else { return Resolved::Unknown };
            let Ok(meta) = std::fs::symlink_metadata(&at) else { return Resolved::Missing };
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    return Resolved::Missing;
                }
                let Ok(target) = std::fs::read_link(&at) else { return Resolved::Missing };
                pending.push(target);
                break;
            }
            resolved = candidate;
        }
    }
    match view.locate(&resolved) {
        Located::At(p) => Resolved::At(p),
        Located::Unknown => Resolved::Unknown,
    }
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
        check_executable(&RootView::new(root.path()), &["echo".into()], &env, Path::new("/")).expect("found");
        let found = resolve_in_view(&RootView::new(root.path()), Path::new("/bin/echo"));
        assert_eq!(found, Resolved::At(root.path().join("bin/busybox")));
    }

    #[test]
    fn missing_binary_names_it() {
        let root = rootfs();
        let env = vec!["PATH=/bin".to_string()];
        let view = RootView::new(root.path());
        let err = check_executable(&view, &["nope".into()], &env, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("'nope'"), "{err}");
        let err = check_executable(&view, &["/bin/data".into()], &env, Path::new("/")).unwrap_err();
        assert!(matches!(err, ProcessError::NotExecutable(_)));
    }

    #[test]
    fn dotdot_cannot_escape_the_root() {
        let root = rootfs();
        let p = resolve_in_view(&RootView::new(root.path()), Path::new("/../../bin/busybox"));
        assert_eq!(p, Resolved::At(root.path().join("bin/busybox")));
    }

    #[test]
    fn binaries_on_volumes_are_found_through_the_bind_mount() {
        let root = rootfs();
        let volume = tempfile::tempdir().expect("tempdir");
        std::fs::write(volume.path().join("run.sh"), b"#!/bin/sh").expect("write");
        std::fs::set_permissions(volume.path().join("run.sh"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        symlink("run.sh", volume.path().join("link.sh")).expect("symlink");
        let view = RootView {
            root: root.path().to_path_buf(),
            mounts: vec![(PathBuf::from("/scripts"), Some(volume.path().to_path_buf())), (PathBuf::from("/tmp"), None)],
        };
        let env = vec!["PATH=/bin".to_string()];
        for name in ["/scripts/run.sh", "/scripts/link.sh", "/tmp/made-at-runtime"] {
            check_executable(&view, &[name.into()], &env, Path::new("/")).expect(name);
        }
        let env = vec!["PATH=/scripts".to_string()];
        check_executable(&view, &["run.sh".into()], &env, Path::new("/")).expect("through $PATH");
        let err = check_executable(&view, &["/scripts/nope.sh".into()], &env, Path::new("/")).unwrap_err();
        assert!(matches!(err, ProcessError::NotFound(_)), "{err}");
    }
}
