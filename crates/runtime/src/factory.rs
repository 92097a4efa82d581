//! VM templating (Kata's `[factory] enable_template`). One VM boots to an idle agent, is paused, and saved: its
//! RAM stays in a file, its device state goes to another. Every pod VM is then a clone: QEMU maps the RAM file
//! copy-on-write and loads the device state instead of booting, so the guest resumes where the template
//! stopped. Pages a clone only reads (kernel, agent, page cache) are in host memory once for all clones.
//!
//! Templates live in `<template_path>/<key>/`, where the key is the SHA-256 of everything that shapes the guest
//! (the normalized VM configuration, its NICs, and the size and modification time of QEMU, the kernel and the
//! initrd). That description is saved beside the template as `config.json`, written last: a template is
//! complete when it is there, and one whose `config.json` says anything else is not used. A changed
//! configuration or a rebuilt initrd gets a new template; stale ones stay until `kata-runtime factory destroy`.
//!
//! One node-wide lock (`<template_path>/.lock`) serialises making templates, and no pod ever waits for it:
//! while another shim makes a template, [`ensure`] answers [`Ensured::Busy`] at once and the pod boots its own
//! VM.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use hypervisor::{GuestMemory, Hypervisor, NetDevice, SharedFs, Vm, VmConfig, VmProcess};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::boot::{self, BootError};

/// Files of a complete template.
const MEMORY: &str = "memory";
const STATE: &str = "state";
/// What the template was made from ([`TemplateSpec`]), written last: its presence marks a complete template.
const CONFIG: &str = "config.json";
/// Left in a template by a pod that could not load it while the lock was taken: whoever takes the lock next
/// removes the template.
const BROKEN: &str = "broken";
/// The template VM's processes while it runs, so a shim that dies making it leaves nothing running: the
/// next one to take the lock ends them by PID.
const PROCESSES: &str = "processes.json";
/// Serialises making and removing templates between shims.
const LOCK: &str = ".lock";
/// How long the template's guest gets to notice that the host left the agent port before it is paused, so a
/// clone starts with no session open. Not needed for correctness (the agent copes either way).
const SETTLE: Duration = Duration::from_millis(100);
/// How often [`ensure_waiting`] looks again while another process makes the template.
const BUSY_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the template VM")]
    Vm(#[source] hypervisor::Error),
    #[error("the template VM")]
    Boot(#[source] BootError),
    #[error("the template VM cannot be saved: its hypervisor has no snapshots")]
    NoSnapshot,
    #[error("template_path {root} is too long: the template VM's sockets in {root}/<{KEY_LEN}-digit key>/vm/ would exceed {MAX_SOCKET_PATH} bytes; use a path of at most {max} bytes")]
    RootTooLong { root: PathBuf, max: usize },
}

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Hex digits of the SHA-256 that name a template directory: 128 bits, so names do not collide by chance,
/// short enough that the template VM's socket paths leave room for a template root of about 50 bytes. A
/// template is used only when its saved configuration equals the one asked for, so even a collision could not
/// make a pod clone the wrong VM.
const KEY_LEN: usize = 32;

/// The length of the longest socket path of the template VM of `<root>/<key>`.
fn longest_socket(hv: &dyn Hypervisor, root: &Path) -> usize {
    let vm_dir = root.join("0".repeat(KEY_LEN)).join("vm");
    hv.sockets(&vm_dir).iter().map(|s| s.as_os_str().len()).max().unwrap_or(0)
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

/// Most network interfaces a pod may have and still be a clone.
const MAX_TEMPLATE_NICS: usize = 1;

/// The one rule for which template a pod clones: pods without a network clone the template without a NIC, pods
/// with one interface the template with one NIC (a NIC costs a clone about 4 MiB). `None`: a pod with more
/// interfaces boots its own VM.
pub fn template_config(pod: &VmConfig, interfaces: usize) -> Option<VmConfig> {
    if interfaces > MAX_TEMPLATE_NICS {
        return None;
    }
    let mut like_template = pod.clone();
    like_template.net_devices = (0..interfaces).map(|_| template_nic(None)).collect();
    Some(like_template)
}

/// Every template [`template_config`] can ask for pods like `pod`, for making them ahead of time.
pub fn template_configs(pod: &VmConfig) -> Vec<VmConfig> {
    (0..=MAX_TEMPLATE_NICS).filter_map(|nics| template_config(pod, nics)).collect()
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

/// What [`ensure`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// A complete template made from this very configuration.
    Ready(Template),
    /// Another process holds the template lock (it is making a template, this one or another). The caller
    /// boots its VM on its own instead of waiting for that boot.
    Busy,
}

/// The template for VMs like `config`: an existing one, or one made now (booting one VM) when there is none
/// yet and no other process is making templates. Never waits for another process.
pub async fn ensure(hv: &dyn Hypervisor, root: &Path, config: &VmConfig, timeout: Duration) -> Result<Ensured> {
    if longest_socket(hv, root) > MAX_SOCKET_PATH {
        let max = MAX_SOCKET_PATH.saturating_sub(longest_socket(hv, Path::new("")));
        return Err(FactoryError::RootTooLong { root: root.to_path_buf(), max });
    }
    let spec = TemplateSpec::of(hv, config);
    let template = Template { dir: root.join(spec.key()) };
    if saved(&template.dir, &spec) == Saved::Matches {
        return Ok(Ensured::Ready(template));
    }
    create_private_dir(root)?;
    let Some(_lock) = try_lock(&root.join(LOCK))? else {
        tracing::info!(dir = %template.dir.display(), "another process holds the VM template lock; not waiting for it");
        return Ok(Ensured::Busy);
    };
    match saved(&template.dir, &spec) {
        Saved::Matches => return Ok(Ensured::Ready(template)),
        Saved::Absent => {}
        Saved::Unfinished => remove_unfinished(&template.dir).await, // its maker died; we hold the lock
        Saved::Broken => {
            tracing::warn!(dir = %template.dir.display(), "the VM template is incomplete or did not load; making a new one");
            remove_template(&template.dir);
        }
        Saved::Differs => {
            tracing::warn!(
                dir = %template.dir.display(),
                "the VM template's {CONFIG} does not describe this configuration; not using it, making a new one"
            );
            remove_template(&template.dir);
        }
    }
    let started = std::time::Instant::now();
    if let Err(e) = make(hv, &template.dir, &spec, config, timeout).await {
        let _ = std::fs::remove_dir_all(&template.dir);
        return Err(e);
    }
    tracing::info!(dir = %template.dir.display(), took = ?started.elapsed(), "VM template made");
    Ok(Ensured::Ready(template))
}

/// [`ensure`], waiting while another process makes templates: for `kata-runtime factory init`, not for pods.
pub async fn ensure_waiting(
    hv: &dyn Hypervisor,
    root: &Path,
    config: &VmConfig,
    timeout: Duration,
) -> Result<Template> {
    loop {
        match ensure(hv, root, config, timeout).await? {
            Ensured::Ready(template) => return Ok(template),
            Ensured::Busy => tokio::time::sleep(BUSY_POLL).await,
        }
    }
}

/// What lies at a template's directory, judged against what this configuration needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Saved {
    Absent,
    /// No `config.json`: being made, or its maker died.
    Unfinished,
    /// Complete, but marked broken or missing its memory or state.
    Broken,
    /// Complete, and `config.json` says it was made from another configuration (or cannot be read).
    Differs,
    Matches,
}

fn saved(dir: &Path, spec: &TemplateSpec) -> Saved {
    if !dir.is_dir() {
        return Saved::Absent;
    }
    let Ok(text) = std::fs::read(dir.join(CONFIG)) else {
        return Saved::Unfinished;
    };
    if dir.join(BROKEN).exists() || !is_complete(dir) {
        return Saved::Broken;
    }
    match serde_json::from_slice::<serde_json::Value>(&text) {
        Ok(found) if found == spec.0 => Saved::Matches,
        _ => Saved::Differs,
    }
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
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "cleaning an unfinished template VM: {}", crate::error_chain(&e))
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Templates hold a guest's memory and device state: root only, like the sandboxes' own directories.
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("cannot restrict permissions of", dir))
}

fn is_complete(dir: &Path) -> bool {
    dir.join(CONFIG).is_file() && dir.join(STATE).is_file() && dir.join(MEMORY).is_file()
}

/// Makes the template in `dir` itself (its template VM's sockets must fit in 107 bytes: `<root>/<key>/vm/` plus
/// a socket name, no suffix to spare), with `config.json` written last.
async fn make(
    hv: &dyn Hypervisor,
    dir: &Path,
    spec: &TemplateSpec,
    config: &VmConfig,
    timeout: Duration,
) -> Result<()> {
    create_private_dir(dir)?;
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).map_err(io("cannot create", &shared))?;
    let mut c = config.clone();
    c.name = format!("template-{}", &spec.key()[..16]);
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
    let vm = hv.vm(c);
    let result = boot_and_save(&vm, dir, timeout).await;
    if let Err(e) = vm.stop().await {
        tracing::warn!(error = %crate::error_chain(&e), "stopping the template VM");
    }
    result?;
    let _ = std::fs::remove_file(dir.join(PROCESSES));
    let text = serde_json::to_vec_pretty(&spec.0).unwrap_or_default();
    let (path, partial) = (dir.join(CONFIG), dir.join(format!("{CONFIG}.partial")));
    std::fs::write(&partial, text).map_err(io("cannot write", &partial))?;
    std::fs::rename(&partial, &path).map_err(io("cannot write", &path))
}

async fn boot_and_save(vm: &std::sync::Arc<dyn Vm>, dir: &Path, timeout: Duration) -> Result<()> {
    let snapshot = vm.snapshot().ok_or(FactoryError::NoSnapshot)?;
    let path = dir.join(PROCESSES);
    let mut persisted = Ok(());
    let booted = boot::boot_and_connect(vm, timeout, |processes| {
        let processes = serde_json::to_vec(processes).unwrap_or_default();
        persisted = std::fs::write(&path, processes).map_err(io("cannot write", &path));
    })
    .await;
    persisted?;
    // The template's guest must notice that the host left the agent port before it is paused, so a clone
    // starts with no session open.
    drop(booted.map_err(FactoryError::Boot)?);
    tokio::time::sleep(SETTLE).await;
    snapshot.save(&dir.join(STATE)).await.map_err(FactoryError::Vm)
}

/// Everything that shapes a template's guest, as the JSON saved in its `config.json`; the key is its SHA-256.
#[derive(Debug, Clone, PartialEq)]
struct TemplateSpec(serde_json::Value);

#[derive(Serialize)]
struct SpecFields<'a> {
    /// Per-VM names and paths blanked.
    vm: VmConfig,
    /// NICs are not serialised with the VM config (they hold fds); their ids and MACs shape the guest.
    nics: Vec<(&'a str, &'a str)>,
    /// A rebuilt QEMU, kernel or initrd needs a new template.
    files: Vec<FileStamp>,
    /// So does a kata-rs that launches VMs with other arguments (machine options, devices).
    launch: Vec<String>,
}

#[derive(Serialize)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    mtime_ns: u64,
}

impl TemplateSpec {
    fn of(hv: &dyn Hypervisor, config: &VmConfig) -> Self {
        let programs = hv.programs(config);
        let files = programs
            .iter()
            .chain([&config.kernel])
            .chain(config.initrd.as_ref())
            .map(|file| {
                let (len, mtime) = std::fs::metadata(file)
                    .map(|m| {
                        (m.len(), m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default())
                    })
                    .unwrap_or_default();
                FileStamp { path: file.clone(), len, mtime_ns: u64::try_from(mtime.as_nanos()).unwrap_or(u64::MAX) }
            })
            .collect();
        let vm = normalized(config);
        let fields = SpecFields {
            launch: hv.launch_shape(&vm),
            vm,
            nics: config.net_devices.iter().map(|n| (n.id.as_str(), n.mac.as_str())).collect(),
            files,
        };
        // Plain data (strings, numbers, enums): serialising it cannot fail.
        Self(serde_json::to_value(fields).unwrap_or_default())
    }

    /// The first [`KEY_LEN`] hex digits of the SHA-256 of the JSON text (the same configuration always
    /// serialises the same way).
    fn key(&self) -> String {
        let digest = Sha256::digest(self.0.to_string().as_bytes());
        digest.iter().take(KEY_LEN / 2).map(|b| format!("{b:02x}")).collect()
    }
}

/// The part of `config` that shapes the guest: per-VM names and paths are blanked.
fn normalized(config: &VmConfig) -> VmConfig {
    let mut c = config.clone();
    c.name.clear();
    c.work_dir = PathBuf::new();
    c.memory = GuestMemory::Memfd;
    // Per VM; a VM cache of booted VMs (virtio-fs) keys them with this too.
    if let SharedFs::Virtio9p { shared_dir } | SharedFs::VirtioFs { shared_dir, .. } = &mut c.shared_fs {
        *shared_dir = PathBuf::new();
    }
    c.net_devices.clear();
    c
}

/// The name of the template for `config` under the template root: [`KEY_LEN`] hex digits of a SHA-256.
pub fn key(hv: &dyn Hypervisor, config: &VmConfig) -> String {
    TemplateSpec::of(hv, config).key()
}

/// An exclusive `flock` on `path`, or `None` at once when another process holds it.
pub(crate) fn try_lock(path: &Path) -> Result<Option<Flock<std::fs::File>>> {
    let file = open_lock(path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => Ok(Some(locked)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io("cannot lock", path)(errno.into())),
    }
}

/// An exclusive `flock` on `path`, waiting for it: only for `destroy`, never on a pod's path.
async fn lock(path: &Path) -> Result<Flock<std::fs::File>> {
    let file = open_lock(path)?;
    tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno.into()))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|locked| locked)
        .map_err(io("cannot lock", path))
}

fn open_lock(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io("cannot open", path))
}

/// Removes a template that turned out broken, so the next pod makes a new one. Only under the template lock,
/// taken without waiting, so it never removes a template another process is making in the same place; when
/// the lock is taken, the template is marked broken instead: `ensure` uses no marked template, and whoever
/// takes the lock next removes it.
pub fn discard(template: &Template) {
    let lock = template.dir.parent().map(|root| try_lock(&root.join(LOCK)));
    match lock {
        Some(Ok(Some(_lock))) => remove_template(&template.dir),
        _ => {
            if let Err(e) = std::fs::write(template.dir.join(BROKEN), b"") {
                tracing::warn!(dir = %template.dir.display(), "cannot mark the VM template broken: {e}");
            }
        }
    }
}

/// Moved aside first, so no pod starts cloning it meanwhile; clones already running keep its files open.
fn remove_template(dir: &Path) {
    let aside = dir.with_extension(format!("broken-{}", std::process::id()));
    if std::fs::rename(dir, &aside).is_ok() {
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
    use hypervisor::Qemu;

    fn config(dir: &Path, name: &str) -> VmConfig {
        let mut c = VmConfig::new(name, dir.join("vmlinux"), dir.join(name));
        c.qemu.path = "/bin/true".into();
        c.shared_fs = SharedFs::Virtio9p { shared_dir: dir.join(name).join("shared") };
        c
    }

    #[test]
    fn key_ignores_per_vm_names_and_follows_what_shapes_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"k1").unwrap();
        let a = config(dir.path(), "pod-a");
        let b = config(dir.path(), "pod-b");
        assert_eq!(key(&Qemu, &a), key(&Qemu, &b));
        assert_eq!(key(&Qemu, &a).len(), KEY_LEN);
        assert!(key(&Qemu, &a).chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{}", key(&Qemu, &a));

        let mut more_memory = a.clone();
        more_memory.memory_mib += 128;
        assert_ne!(key(&Qemu, &a), key(&Qemu, &more_memory));
        let mut no_sandbox = a.clone();
        no_sandbox.qemu.seccomp_sandbox = None;
        assert_ne!(key(&Qemu, &a), key(&Qemu, &no_sandbox));
        let mut with_nic = a.clone();
        with_nic.net_devices = vec![template_nic(None)];
        assert_ne!(key(&Qemu, &a), key(&Qemu, &with_nic));

        // Booted VMs for the VM cache: virtio-fs shares are per VM too.
        let virtiofs = |c: &VmConfig, dir: &str| VmConfig {
            shared_fs: SharedFs::VirtioFs {
                daemon: "/usr/libexec/virtiofsd".into(),
                extra_args: vec![],
                shared_dir: PathBuf::from(dir),
            },
            ..c.clone()
        };
        assert_eq!(key(&Qemu, &virtiofs(&a, "/run/a/shared")), key(&Qemu, &virtiofs(&b, "/run/b/shared")));

        let before = key(&Qemu, &a);
        std::fs::write(dir.path().join("vmlinux"), b"kernel two").unwrap();
        assert_ne!(key(&Qemu, &a), before, "a rebuilt kernel needs a new template");

        assert_ne!(key(&Qemu, &a), key(&Relaunched, &a), "a build that launches VMs otherwise needs a new template");
        let shape = Qemu.launch_shape(&normalized(&a));
        assert!(shape.iter().any(|arg| arg.starts_with("microvm,")), "{shape:?}");
        assert!(!shape.iter().any(|arg| arg.contains("pod-a")), "per-VM names and paths: {shape:?}");
    }

    /// QEMU launched with one more argument, as by another build of kata-rs.
    #[derive(Debug)]
    struct Relaunched;

    #[async_trait::async_trait]
    impl Hypervisor for Relaunched {
        fn vm(&self, config: VmConfig) -> std::sync::Arc<dyn hypervisor::Vm> {
            Qemu.vm(config)
        }
        async fn attach(&self, saved: hypervisor::SavedVm) -> hypervisor::Result<std::sync::Arc<dyn hypervisor::Vm>> {
            Qemu.attach(saved).await
        }
        fn sockets(&self, work_dir: &Path) -> Vec<PathBuf> {
            Qemu.sockets(work_dir)
        }
        fn programs(&self, config: &VmConfig) -> Vec<PathBuf> {
            Qemu.programs(config)
        }
        fn launch_shape(&self, config: &VmConfig) -> Vec<String> {
            let mut args = Qemu.launch_shape(config);
            args.push("-no-hpet".into());
            args
        }
    }

    #[tokio::test]
    async fn an_unfinished_template_left_by_a_dead_maker_is_ended_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let new_dir = dir.path().join("abcd");
        std::fs::create_dir_all(new_dir.join("vm")).unwrap();
        // Stands in for the orphaned template QEMU (not our child once "its shim died": we only know its PID).
        let mut child = std::process::Command::new("/bin/sleep").arg("300").spawn().unwrap();
        let argv = vec!["/bin/sleep".to_string(), "300".to_string()];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default() != b"/bin/sleep\x00300\x00" {
            assert!(std::time::Instant::now() < deadline, "the child never showed its argv");
            std::thread::sleep(Duration::from_millis(1));
        }
        let recorded = vec![VmProcess { role: hypervisor::ProcessRole::Vmm, pid: child.id(), argv, start_time: None }];
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
        for (name, complete) in [("aaaa", true), ("bbbb", false)] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join(MEMORY), b"m").unwrap();
            std::fs::write(root.join(name).join(STATE), b"s").unwrap();
            if complete {
                std::fs::write(root.join(name).join(CONFIG), b"{}").unwrap();
            }
        }
        let listed = list(&root);
        assert_eq!(
            listed.iter().map(|t| (t.dir.clone(), t.complete)).collect::<Vec<_>>(),
            [(root.join("aaaa"), true), (root.join("bbbb"), false)]
        );
        let removed = destroy(&root).await.unwrap();
        assert_eq!(removed.len(), 2);
        assert!(!root.exists());
        assert!(destroy(&root).await.unwrap().is_empty());
    }

    /// A complete template for `config` under `root`, as `make` leaves it, with `config.json` as given.
    fn fake_template(root: &Path, config: &VmConfig, saved_config: &serde_json::Value) -> Template {
        let template = Template { dir: root.join(key(&Qemu, config)) };
        std::fs::create_dir_all(&template.dir).unwrap();
        std::fs::write(template.memory_file(), b"m").unwrap();
        std::fs::write(template.state_file(), b"s").unwrap();
        std::fs::write(template.dir.join(CONFIG), serde_json::to_vec_pretty(saved_config).unwrap()).unwrap();
        template
    }

    /// A pod config whose QEMU (`/bin/false`) fails at once: `ensure` errs if it tries to make a template.
    fn failing_config(dir: &Path) -> VmConfig {
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        let mut c = config(dir, "pod");
        c.qemu.path = "/bin/false".into();
        c.agent = Some(hypervisor::AgentTransport::Serial { port: "agent.channel.0".into() });
        c
    }

    #[tokio::test]
    async fn template_sockets_fit_under_the_default_template_path_and_a_long_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
        let vm_dir =
            Path::new(types::config::DEFAULT_TEMPLATE_PATH).join(key(&Qemu, &config(dir.path(), "pod"))).join("vm");
        let longest = hypervisor::qemu::cmdline::VmPaths::new(&vm_dir)
            .sockets()
            .iter()
            .map(|s| s.as_os_str().len())
            .max()
            .unwrap();
        assert!(longest <= MAX_SOCKET_PATH, "{longest} bytes under {}", vm_dir.display());
        let max_root_len = MAX_SOCKET_PATH - longest_socket(&Qemu, Path::new(""));
        assert!(types::config::DEFAULT_TEMPLATE_PATH.len() <= max_root_len);

        let root = Path::new("/").join("r".repeat(max_root_len));
        let err = ensure(&Qemu, &root, &config(dir.path(), "pod"), Duration::from_secs(1)).await.expect_err("too long");
        assert!(matches!(err, FactoryError::RootTooLong { .. }), "{err}");
        assert!(err.to_string().contains(&format!("at most {max_root_len} bytes")), "{err}");
        assert!(!root.exists());
    }

    #[tokio::test]
    async fn a_template_is_used_only_when_its_saved_config_matches() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        let config = failing_config(dir.path());
        let spec = TemplateSpec::of(&Qemu, &config);

        let template = fake_template(&root, &config, &spec.0);
        let ensured = ensure(&Qemu, &root, &config, Duration::from_secs(5)).await.unwrap();
        assert_eq!(ensured, Ensured::Ready(template.clone()), "a matching template is used without a boot");

        // Same key, but config.json describes another VM (edited, or a colliding key): not used. `ensure` removes
        // it and tries to make a new one, which fails here.
        let mut other = spec.0.clone();
        other["vm"]["memory_mib"] = serde_json::json!(4096);
        fake_template(&root, &config, &other);
        let err =
            ensure(&Qemu, &root, &config, Duration::from_secs(5)).await.expect_err("makes a new one, which fails");
        assert!(matches!(err, FactoryError::Boot(_)), "{err}");
        assert!(!template.dir.exists(), "the mismatched template is gone");

        // Unreadable config.json, and a template a pod marked broken: not used either.
        fake_template(&root, &config, &spec.0);
        std::fs::write(template.dir.join(CONFIG), b"not json").unwrap();
        assert_eq!(saved(&template.dir, &spec), Saved::Differs);
        fake_template(&root, &config, &spec.0);
        std::fs::write(template.dir.join(BROKEN), b"").unwrap();
        assert_eq!(saved(&template.dir, &spec), Saved::Broken);
        std::fs::remove_file(template.dir.join(CONFIG)).unwrap();
        assert_eq!(saved(&template.dir, &spec), Saved::Unfinished, "no config.json: still being made");
    }

    #[tokio::test]
    async fn ensure_does_not_wait_for_the_template_lock() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir_all(&root).unwrap();
        let config = failing_config(dir.path());
        // Another shim making a template (here: this test) holds the lock for as long as its VM boots.
        let held = Flock::lock(open_lock(&root.join(LOCK)).unwrap(), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();

        let started = std::time::Instant::now();
        let ensured =
            tokio::time::timeout(Duration::from_secs(2), ensure(&Qemu, &root, &config, Duration::from_secs(60)))
                .await
                .expect("ensure returns at once")
                .unwrap();
        assert_eq!(ensured, Ensured::Busy);
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(!root.join(key(&Qemu, &config)).exists(), "nothing was started");

        // A complete template is used whoever holds the lock.
        let template = fake_template(&root, &config, &TemplateSpec::of(&Qemu, &config).0);
        assert_eq!(
            ensure(&Qemu, &root, &config, Duration::from_secs(5)).await.unwrap(),
            Ensured::Ready(template.clone())
        );

        // A pod that cannot load it while the lock is held only marks it; the lock's next holder removes it.
        discard(&template);
        assert!(template.dir.join(BROKEN).exists());
        assert_eq!(ensure(&Qemu, &root, &config, Duration::from_secs(5)).await.unwrap(), Ensured::Busy);
        drop(held);
        let err =
            ensure(&Qemu, &root, &config, Duration::from_secs(5)).await.expect_err("remakes it, which fails here");
        assert!(matches!(err, FactoryError::Boot(_)), "{err}");
        assert!(!template.dir.exists());
    }
}
