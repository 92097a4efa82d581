//! A container's directory under `--root`: `<root>/<id>/` (0700) with the stand-in's control socket
//! (`standin.sock`, 0600), the state record (`state.json`), the lock that serialises commands (`lock`) and the
//! one the stand-in holds while it lives (`standin.lock`). Nothing under the root follows a symlink: the
//! container directory must be a real directory and its files are opened with `O_NOFOLLOW`.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// What the stand-in records about its container, for the commands that run after it is gone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// The container stand-in's pid (the runc shim's "init" pid).
    pub pid: u32,
    pub bundle: String,
    pub rootfs: String,
    /// RFC 3339.
    pub created: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// created, running, paused or stopped, as last recorded.
    pub status: String,
    #[serde(default)]
    pub exit_status: Option<u32>,
    /// For a pod's container: the pod's sandbox container, whose stand-in runs the VM it is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// runc's `state` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OciState {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: u32,
    pub status: String,
    pub bundle: String,
    pub rootfs: String,
    pub created: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Record {
    /// runc's state for this record with the `status` the stand-in reports (or `stopped` without one):
    /// a stopped container has no pid, as in runc.
    pub fn oci_state(&self, status: &str) -> OciState {
        OciState {
            oci_version: "1.0.2".into(),
            id: self.id.clone(),
            pid: if status == "stopped" { 0 } else { self.pid },
            status: status.into(),
            bundle: self.bundle.clone(),
            rootfs: self.rootfs.clone(),
            created: self.created.clone(),
            owner: String::new(),
            annotations: self.annotations.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub id: String,
    pub path: PathBuf,
}

impl ContainerDir {
    fn at(root: &Path, id: &str) -> Result<Self> {
        runtime::paths::check_id("container", id).map_err(|e| anyhow!(e))?;
        Ok(ContainerDir { id: id.to_string(), path: root.join(id) })
    }

    /// Makes the directory of a new container (and the root, 0700, when missing).
    pub fn create(root: &Path, id: &str) -> Result<Self> {
        let dir = Self::at(root, id)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("create the state root {}", root.display()))?;
        match DirBuilder::new().mode(0o700).create(&dir.path) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!("container with id {id} already exists"),
            Err(e) => Err(e).with_context(|| format!("create {}", dir.path.display())),
        }
    }

    /// The directory of an existing container.
    pub fn open(root: &Path, id: &str) -> Result<Self> {
        let dir = Self::at(root, id)?;
        match std::fs::symlink_metadata(&dir.path) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => bail!("{} is not a directory", dir.path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("container {id} does not exist"),
            Err(e) => Err(e).with_context(|| format!("read {}", dir.path.display())),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("standin.sock")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates file `name` in the directory, fresh (never an existing file or a symlink), root-only.
    pub fn create_file(&self, name: &str) -> Result<File> {
        let path = self.file(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("create {}", path.display()))
    }

    fn open_lock(&self, name: &str) -> Result<File> {
        let path = self.file(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))
    }

    /// Serialises the commands on this container (held until dropped).
    pub fn lock(&self) -> Result<Flock<File>> {
        Flock::lock(self.open_lock("lock")?, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("lock {}: {e}", self.file("lock").display()))
    }

    /// Held by the stand-in for as long as it lives: the kernel drops it when the stand-in exits, however.
    pub fn standin_lock(&self) -> Result<Flock<File>> {
        Flock::lock(self.open_lock("standin.lock")?, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| anyhow!("another stand-in runs container {}: {e}", self.id))
    }

    /// Whether a stand-in still lives (holds its lock).
    pub fn standin_alive(&self) -> bool {
        match self.open_lock("standin.lock") {
            Ok(f) => Flock::lock(f, FlockArg::LockSharedNonblock).is_err(),
            Err(_) => false,
        }
    }

    /// Waits up to `timeout` for the stand-in to exit.
    pub fn wait_standin_exit(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.standin_alive() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    }

    pub fn save(&self, record: &Record) -> Result<()> {
        let path = self.file("state.json");
        let tmp = self.file("state.json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = self.create_file("state.json.tmp")?;
        f.write_all(&serde_json::to_vec(record)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))
    }

    pub fn load(&self) -> Result<Record> {
        let path = self.file("state.json");
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("container {} has no state (read {})", self.id, path.display()))?;
        serde_json::from_reader(f).with_context(|| format!("parse {}", path.display()))
    }

    /// Removes the directory (its files only: it has no subdirectories).
    pub fn remove(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.path).with_context(|| format!("remove {}", self.path.display()))
    }
}

/// The container ids under `root`.
pub fn list(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| runtime::paths::check_id("container", id).is_ok())
        .collect();
    ids.sort();
    ids
}

/// Writes `pid` to the pid file as runc does: a temporary file renamed into place, so a reader never sees
/// half of it.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    std::fs::write(&tmp, pid.to_string()).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_escape_are_refused() {
        let root = tempfile::tempdir().unwrap();
        for id in ["../x", "a/b", ".hidden", ""] {
            assert!(ContainerDir::create(root.path(), id).is_err(), "{id}");
        }
    }

    #[test]
    fn a_container_directory_is_private_and_made_once() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = ContainerDir::create(root.path(), "c1").unwrap();
        let mode = std::fs::metadata(&dir.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let err = ContainerDir::create(root.path(), "c1").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(list(root.path()), vec!["c1".to_string()]);
    }

    #[test]
    fn a_symlinked_container_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("c1")).unwrap();
        assert!(ContainerDir::open(root.path(), "c1").is_err());
        assert!(ContainerDir::create(root.path(), "c1").is_err());
    }

    #[test]
    fn a_symlinked_state_file_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let dir = ContainerDir::create(root.path(), "c1").unwrap();
        let target = root.path().join("target");
        std::fs::write(&target, "{}").unwrap();
        std::os::unix::fs::symlink(&target, dir.path.join("state.json")).unwrap();
        assert!(dir.load().is_err());
        std::os::unix::fs::symlink(&target, dir.path.join("lock")).unwrap();
        assert!(dir.lock().is_err());
    }

    #[test]
    fn state_is_runcs_json() {
        let record = Record {
            id: "c1".into(),
            pid: 42,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2024-01-01T00:00:00Z".into(),
            status: "running".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(record.oci_state("running")).unwrap();
        assert_eq!(v["ociVersion"], "1.0.2");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["status"], "running");
        assert_eq!(v["rootfs"], "/b/rootfs");
        assert!(v.get("annotations").is_none());
        assert_eq!(record.oci_state("stopped").pid, 0);
    }

    #[test]
    fn the_standin_lock_tells_whether_it_lives() {
        let root = tempfile::tempdir().unwrap();
        let dir = ContainerDir::create(root.path(), "c1").unwrap();
        assert!(!dir.standin_alive());
        let held = dir.standin_lock().unwrap();
        assert!(dir.standin_alive());
        drop(held);
        assert!(!dir.standin_alive());
    }
}
