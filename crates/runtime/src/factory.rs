//! VM templating (Kata's `[factory] enable_template`). One VM boots to an idle agent, is paused, and saved: its
//! RAM stays in a file, its device state goes to another. Every pod VM is then a clone: QEMU maps the RAM file
//! copy-on-write and loads the device state instead of booting, so the guest resumes where the template
//! stopped. Pages a clone only reads (kernel, agent, page cache) are in host memory once for all clones.
//!
//! Templates live in `<template_path>/<key>/`, where the key sums up everything that shapes the guest (QEMU,
//! kernel, initrd and their file stamps, machine, CPUs, memory, kernel parameters). A changed configuration
//! or a rebuilt initrd gets a new template; stale ones stay until `kata-runtime factory destroy`.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use hypervisor::{GuestMemory, Hypervisor, NetDevice, QemuVm, SharedFs, VmConfig, VmProcess};
use nix::fcntl::{Flock, FlockArg};

use crate::agent::AgentClient;

/// Files of a complete template.
const MEMORY: &str = "memory";
const STATE: &str = "state";
/// The configuration it was made from, for people (`kata-runtime factory status`).
const CONFIG: &str = "config.json";
/// The template VM's processes while it runs, so a shim that dies making it leaves nothing running: the
/// next one to take the lock ends them by PID.
const PROCESSES: &str = "processes.json";
/// A template being made is `<key>.new` until it is complete.
const NEW_SUFFIX: &str = ".new";
/// Serialises making templates between shims.
const LOCK: &str = ".lock";
/// How long the template's guest gets to notice that the host left the agent port before it is paused, so a
/// clone starts with no session open. Not needed for correctness (the agent copes either way).
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, #[source] source: std::io::Error },
    #[error("the template VM: {0}")]
    Vm(#[source] hypervisor::Error),
    #[error("the template VM's agent did not answer: {source}; last lines of its console:\n{console}")]
    Agent { source: crate::agent::AgentError, console: String },
    #[error("the template VM has no agent serial port; templating needs the virtio-serial agent transport")]
    NoSerialPort,
}

type Result<T> = std::result::Result<T, FactoryError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FactoryError {
    let path = path.to_path_buf();
    move |source| FactoryError::Io { what, path, source }
}

/// The MAC of the template's NIC. Every clone starts with it; the agent then gives the NIC the pod's MAC.
/// Locally administered, unicast.
pub const TEMPLATE_NIC_MAC: &str = "02:6b:61:74:61:00";

/// The NIC of a template for pods with a network, and of its clones: without a host side in the template,
/// on the pod's tap in a clone.
pub fn template_nic(tap: Option<std::sync::Arc<std::os::fd::OwnedFd>>) -> NetDevice {
    NetDevice { id: "net0".to_string(), mac: TEMPLATE_NIC_MAC.to_string(), fd: tap }
}

/// A complete template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub dir: PathBuf,
}

impl Template {
    pub fn memory_file(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// Makes `config` (a pod VM's) a clone of this template.
    pub fn clone_into(&self, config: &mut VmConfig) {
        config.memory = GuestMemory::Clone { file: self.memory_file(), state: self.state_file() };
    }
}

/// The template for VMs like `config`, made now (booting one VM) when there is none yet. Shims that need the
/// same template at once wait for the one making it.
pub async fn ensure(root: &Path, config: &VmConfig, timeout: Duration) -> Result<Template> {
    let key = key(config);
    let template = Template { dir: root.join(&key) };
    if is_complete(&template.dir) {
        return Ok(template);
    }
    create_private_dir(root)?;
    let _lock = lock(&root.join(LOCK)).await?;
    if is_complete(&template.dir) {
        return Ok(template);
    }
    let started = std::time::Instant::now();
    let new_dir = root.join(format!("{key}{NEW_SUFFIX}"));
    remove_unfinished(&new_dir).await; // left by a shim that died making it; we hold the lock
    let made = make(&new_dir, &key, config, timeout).await;
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&new_dir);
        return Err(e);
    }
    std::fs::rename(&new_dir, &template.dir).map_err(io("cannot move the new template to", &template.dir))?;
    tracing::info!(dir = %template.dir.display(), took = ?started.elapsed(), "VM template made");
    Ok(template)
}

/// Ends the processes of a template VM whose maker died (recorded in `PROCESSES`; each is checked to be the
/// one started before it is killed) and removes its directory.
async fn remove_unfinished(dir: &Path) {
    if let Ok(bytes) = std::fs::read(dir.join(PROCESSES)) {
        if let Ok(processes) = serde_json::from_slice::<Vec<VmProcess>>(&bytes) {
            match hypervisor::cleanup_vm(&processes, &dir.join("vm")).await {
                Ok(report) if !report.killed.is_empty() => {
                    tracing::warn!(dir = %dir.display(), killed = ?report.killed, "ended an unfinished template VM")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(dir = %dir.display(), "cleaning an unfinished template VM: {e}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Templates hold a guest's memory and device state: root only, like the sandboxes' own directories.
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io("cannot restrict permissions of", dir))
}

fn is_complete(dir: &Path) -> bool {
    dir.join(STATE).is_file() && dir.join(MEMORY).is_file()
}

async fn make(dir: &Path, key: &str, config: &VmConfig, timeout: Duration) -> Result<()> {
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).map_err(io("cannot create", &shared))?;
    let mut c = config.clone();
    c.name = format!("template-{key}");
    c.work_dir = dir.join("vm");
    c.memory = GuestMemory::Template { file: dir.join(MEMORY) };
    // The clone's 9p device serves the pod's own directory; the template's only has to exist.
    if let SharedFs::Virtio9p { shared_dir } = &mut c.shared_fs {
        *shared_dir = shared;
    }
    // The same NICs as the clones, without their taps.
    for nic in &mut c.net_devices {
        nic.fd = None;
    }
    let vm = QemuVm::new(c);
    let result = boot_and_save(&vm, dir, timeout).await;
    if let Err(e) = vm.stop().await {
        tracing::warn!("stopping the template VM: {e}");
    }
    result?;
    let _ = std::fs::remove_file(dir.join(PROCESSES));
    let text = serde_json::to_vec_pretty(&normalized(config)).unwrap_or_default();
    let path = dir.join(CONFIG);
    std::fs::write(&path, text).map_err(io("cannot write", &path))
}

async fn boot_and_save(vm: &QemuVm, dir: &Path, timeout: Duration) -> Result<()> {
    let started = vm.start().await;
    let processes = serde_json::to_vec(&vm.pids()).unwrap_or_default();
    let path = dir.join(PROCESSES);
    std::fs::write(&path, processes).map_err(io("cannot write", &path))?;
    started.map_err(FactoryError::Vm)?;
    let socket = vm.agent_serial_socket().ok_or(FactoryError::NoSerialPort)?;
    match AgentClient::connect_serial(&socket, timeout).await {
        Ok(agent) => drop(agent),
        Err(source) => {
            let console = vm.console().tail(20);
            return Err(FactoryError::Agent { source, console });
        }
    }
    tokio::time::sleep(SETTLE).await;
    vm.save_template(&dir.join(STATE)).await.map_err(FactoryError::Vm)
}

/// The part of `config` that shapes the guest: per-VM names and paths are blanked. NICs are never serialised
/// (they hold fds), so `key` adds them itself.
fn normalized(config: &VmConfig) -> VmConfig {
    let mut c = config.clone();
    c.name.clear();
    c.work_dir = PathBuf::new();
    c.memory = GuestMemory::Memfd;
    if let SharedFs::Virtio9p { shared_dir } = &mut c.shared_fs {
        *shared_dir = PathBuf::new();
    }
    c
}

/// 16 hex digits naming the template for `config`: FNV-1a over its normalized form and the size and
/// modification time of QEMU, the kernel and the initrd.
pub fn key(config: &VmConfig) -> String {
    let mut text = serde_json::to_string(&normalized(config)).unwrap_or_default();
    // NICs are not serialised (they hold fds); their ids and MACs shape the guest.
    for nic in &config.net_devices {
        text.push_str(&format!("|nic:{}:{}", nic.id, nic.mac));
    }
    for file in [Some(&config.qemu_path), Some(&config.kernel), config.initrd.as_ref()].into_iter().flatten() {
        let (len, mtime) = std::fs::metadata(file)
            .map(|m| (m.len(), m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default()))
            .unwrap_or_default();
        text.push_str(&format!("|{}:{len}:{}", file.display(), mtime.as_nanos()));
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// An exclusive `flock` on `path`, held until the guard is dropped.
async fn lock(path: &Path) -> Result<Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io("cannot open", path))?;
    tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno.into()))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|locked| locked)
        .map_err(io("cannot lock", path))
}

/// Removes a template that turned out broken, so the next pod makes a new one. Moved aside first, so no
/// pod starts cloning it meanwhile; clones already running keep its files open.
pub fn discard(template: &Template) {
    let aside = template.dir.with_extension(format!("broken-{}", std::process::id()));
    if std::fs::rename(&template.dir, &aside).is_ok() {
        let _ = std::fs::remove_dir_all(&aside);
    }
}

/// One template directory, as `kata-runtime factory status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateInfo {
    pub dir: PathBuf,
    pub complete: bool,
    /// Bytes of the memory file that are allocated (it is sparse).
    pub memory_bytes: u64,
}

/// The templates under `root`, complete or not.
pub fn list(root: &Path) -> Vec<TemplateInfo> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut list: Vec<TemplateInfo> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let dir = e.path();
            let memory_bytes = std::fs::metadata(dir.join(MEMORY)).map(|m| m.blocks() * 512).unwrap_or(0);
            TemplateInfo { complete: is_complete(&dir), dir, memory_bytes }
        })
        .collect();
    list.sort_by(|a, b| a.dir.cmp(&b.dir));
    list
}

/// Removes every template under `root` and `root` itself. Running clones keep their memory: they hold the
/// file open. Waits for a template being made.
pub async fn destroy(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let lock_file = root.join(LOCK);
    let _lock = lock(&lock_file).await?;
    let removed: Vec<PathBuf> = list(root).into_iter().map(|t| t.dir).collect();
    for dir in &removed {
        remove_unfinished(dir).await;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io("cannot remove", dir))?;
        }
    }
    let _ = std::fs::remove_file(&lock_file);
    let _ = std::fs::remove_dir(root);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, name: &str) -> VmConfig {
        let mut c = VmConfig::new(name, "/bin/true", dir.join("vmlinux"), dir.join(name));
        c.shared_fs = SharedFs::Virtio9p { shared_dir: dir.join(name).join("shared") };
        c
    }

    #[test]
    fn key_ignores_per_vm_names_and_follows_what_shapes_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"k1").unwrap();
        let a = config(dir.path(), "pod-a");
        let b = config(dir.path(), "pod-b");
        assert_eq!(key(&a), key(&b));
        assert_eq!(key(&a).len(), 16);

        let mut more_memory = a.clone();
        more_memory.memory_mib += 128;
        assert_ne!(key(&a), key(&more_memory));

        let before = key(&a);
        std::fs::write(dir.path().join("vmlinux"), b"kernel two").unwrap();
        assert_ne!(key(&a), before, "a rebuilt kernel needs a new template");
    }

    #[tokio::test]
    async fn an_unfinished_template_left_by_a_dead_maker_is_ended_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let new_dir = dir.path().join(format!("abcd{NEW_SUFFIX}"));
        std::fs::create_dir_all(new_dir.join("vm")).unwrap();
        // Stands in for the orphaned template QEMU (not our child once "its shim died": we only know its PID).
        let mut child = std::process::Command::new("/bin/sleep").arg("300").spawn().unwrap();
        let argv = vec!["/bin/sleep".to_string(), "300".to_string()];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default() != b"/bin/sleep\x00300\x00" {
            assert!(std::time::Instant::now() < deadline, "the child never showed its argv");
            std::thread::sleep(Duration::from_millis(1));
        }
        let recorded = vec![VmProcess { role: hypervisor::ProcessRole::Qemu, pid: child.id(), argv, start_time: None }];
        std::fs::write(new_dir.join(PROCESSES), serde_json::to_vec(&recorded).unwrap()).unwrap();

        remove_unfinished(&new_dir).await;
        let status = child.wait().unwrap();
        assert!(!status.success(), "the recorded process was killed: {status:?}");
        assert!(!new_dir.exists());
    }

    #[test]
    fn a_discarded_template_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let template = Template { dir: dir.path().join("abcd") };
        std::fs::create_dir_all(&template.dir).unwrap();
        std::fs::write(template.memory_file(), b"m").unwrap();
        std::fs::write(template.state_file(), b"s").unwrap();
        discard(&template);
        assert!(!template.dir.exists());
        assert!(list(dir.path()).is_empty(), "{:?}", list(dir.path()));
    }

    #[tokio::test]
    async fn list_and_destroy() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("templates");
        for (name, complete) in [("aaaa", true), ("bbbb.new", false)] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            if complete {
                std::fs::write(root.join(name).join(MEMORY), b"m").unwrap();
                std::fs::write(root.join(name).join(STATE), b"s").unwrap();
            }
        }
        let listed = list(&root);
        assert_eq!(listed.iter().map(|t| (t.dir.clone(), t.complete)).collect::<Vec<_>>(), [
            (root.join("aaaa"), true),
            (root.join("bbbb.new"), false)
        ]);
        let removed = destroy(&root).await.unwrap();
        assert_eq!(removed.len(), 2);
        assert!(!root.exists());
        assert!(destroy(&root).await.unwrap().is_empty());
    }
}
