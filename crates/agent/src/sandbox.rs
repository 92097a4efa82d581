//! The sandbox: the guest-wide state (hostname, clock, DNS, shared fs) and its containers.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, Notify};

use crate::container::{Container, ContainerError};
use crate::mount::{self, MountError, SharedFsKind, DEFAULT_SHARED_MOUNT};
use crate::reaper::Reaper;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("container '{0}' does not exist")]
    NoContainer(String),
    #[error("container '{0}' already exists")]
    ContainerExists(String),
    #[error("invalid container id '{0}'")]
    InvalidId(String),
    #[error("cannot set the hostname to '{0}'")]
    Hostname(String, #[source] nix::Error),
    #[error("cannot set the guest clock")]
    Clock(#[source] nix::Error),
    #[error("cannot reseed the guest's random number generator")]
    Entropy(#[source] std::io::Error),
    #[error("cannot write /etc/resolv.conf")]
    Dns(#[source] std::io::Error),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Container(#[from] ContainerError),
}

type Result<T> = std::result::Result<T, SandboxError>;

/// How often the OOM watcher looks at memory.events without being told a file changed.
const OOM_BACKSTOP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFsConfig {
    pub kind: SharedFsKind,
    pub tag: String,
    pub mount_point: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxConfig {
    pub sandbox_id: String,
    pub hostname: String,
    pub dns: Vec<String>,
    pub shared_fs: Option<SharedFsConfig>,
    pub host_time: Option<SystemTime>,
    /// Host randomness to reseed the guest's generator with (see `reseed_random`).
    pub entropy: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDetails {
    pub kernel_release: String,
    pub agent_version: String,
    pub boot_id: String,
}

#[derive(Debug)]
pub struct Sandbox {
    pub reaper: Reaper,
    /// Guest-wide changes (hostname, clock, resolv.conf) only when we own the machine.
    is_init: bool,
    shared_mount: Mutex<PathBuf>,
    /// Whether the shared filesystem is mounted at `shared_mount`: a VM warmed up by the VM cache had its
    /// CreateSandbox before its pod's, and virtio's channel serves one mount.
    shared_mounted: Mutex<bool>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom: broadcast::Sender<String>,
    /// Tells the OOM watcher to look at a new container.
    container_added: Arc<Notify>,
}

impl Sandbox {
    pub fn new(reaper: Reaper, is_init: bool) -> Arc<Self> {
        let (oom, _) = broadcast::channel(64);
        let sandbox = Arc::new(Self {
            reaper,
            is_init,
            shared_mount: Mutex::new(PathBuf::from(DEFAULT_SHARED_MOUNT)),
            shared_mounted: Mutex::new(false),
            containers: Mutex::new(HashMap::new()),
            oom,
            container_added: Arc::new(Notify::new()),
        });
        tokio::spawn(watch_oom(Arc::downgrade(&sandbox), sandbox.container_added.clone()));
        sandbox
    }

    pub fn create(&self, cfg: &SandboxConfig) -> Result<()> {
        if self.is_init {
            if !cfg.entropy.is_empty() {
                crate::random::reseed(&cfg.entropy).map_err(SandboxError::Entropy)?;
            }
            if !cfg.hostname.is_empty() {
                nix::unistd::sethostname(&cfg.hostname).map_err(|e| SandboxError::Hostname(cfg.hostname.clone(), e))?;
            }
            if let Some(t) = cfg.host_time {
                set_clock(t)?;
            }
            if !cfg.dns.is_empty() {
                let mut text = cfg.dns.join("\n");
                text.push('\n');
                std::fs::write("/etc/resolv.conf", text).map_err(SandboxError::Dns)?;
            }
        } else {
            tracing::info!("not PID 1: leaving hostname, clock and resolv.conf alone");
        }
        if let Some(fs) = &cfg.shared_fs {
            let target = if fs.mount_point.as_os_str().is_empty() {
                PathBuf::from(DEFAULT_SHARED_MOUNT)
            } else {
                fs.mount_point.clone()
            };
            let mut mounted = lock(&self.shared_mounted);
            let mut mount_point = lock(&self.shared_mount);
            if !(*mounted && *mount_point == target) {
                if *mounted {
                    mount::unmount(&mount_point)?;
                    *mounted = false;
                }
                mount::mount_shared_fs(&fs.kind, &fs.tag, &target)?;
                *mounted = true;
                *mount_point = target;
            }
        }
        tracing::info!(id = %cfg.sandbox_id, hostname = %cfg.hostname, "sandbox created");
        Ok(())
    }

    pub fn set_time(&self, t: SystemTime) -> Result<()> {
        if self.is_init {
            set_clock(t)?;
        }
        Ok(())
    }

    /// Whether this agent is the guest's init: only then does it change guest-wide state such as the clock or
    /// which CPUs are online (run on a host for debugging, it must not).
    pub fn is_init(&self) -> bool {
        self.is_init
    }

    pub async fn destroy(&self) -> Result<()> {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        for id in ids {
            if let Err(err) = self.remove_container(&id).await {
                tracing::warn!(id, "{}", crate::error_chain(&err));
            }
        }
        let mount_point = lock(&self.shared_mount).clone();
        mount::unmount(&mount_point)?;
        *lock(&self.shared_mounted) = false;
        Ok(())
    }

    pub fn create_container(&self, id: &str, spec_json: &[u8], rootfs: &str, stdin: bool) -> Result<()> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(SandboxError::InvalidId(id.to_string()));
        }
        if lock(&self.containers).contains_key(id) {
            return Err(SandboxError::ContainerExists(id.to_string()));
        }
        let rootfs = self.rootfs_path(id, rootfs);
        let init_pid_of = |other: &str| lock(&self.containers).get(other).and_then(|c| c.running_init_pid());
        let container = Container::create(&self.reaper, id, spec_json, rootfs, stdin, &init_pid_of)?;
        lock(&self.containers).insert(id.to_string(), Arc::new(container));
        self.container_added.notify_one();
        Ok(())
    }

    fn rootfs_path(&self, id: &str, rootfs: &str) -> PathBuf {
        let shared = lock(&self.shared_mount).clone();
        if rootfs.is_empty() {
            shared.join(id).join("rootfs")
        } else if Path::new(rootfs).is_absolute() {
            PathBuf::from(rootfs)
        } else {
            shared.join(rootfs)
        }
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers).get(id).cloned().ok_or_else(|| SandboxError::NoContainer(id.to_string()))
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        c.remove().await?;
        lock(&self.containers).remove(id);
        Ok(())
    }

    pub fn subscribe_oom(&self) -> broadcast::Receiver<String> {
        self.oom.subscribe()
    }

    pub fn guest_details(&self) -> GuestDetails {
        let kernel_release =
            nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string();
        GuestDetails { kernel_release, agent_version: env!("CARGO_PKG_VERSION").to_string(), boot_id }
    }
}

fn set_clock(t: SystemTime) -> Result<()> {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ts = nix::sys::time::TimeSpec::from_duration(d);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(SandboxError::Clock)
}

/// Reports new OOM kills of each container, read from its memory.events. It looks when inotify says one of
/// those files changed (cgroup v2 signals every counted event), when a container was added, and every
/// [`OOM_BACKSTOP`]: a 1 s poll kept every idle VM waking for nothing.
async fn watch_oom(sandbox: std::sync::Weak<Sandbox>, added: Arc<Notify>) {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .inspect_err(|err| tracing::warn!(%err, "no inotify: OOM kills are noticed every {OOM_BACKSTOP:?}"))
        .ok();
    // SAFETY: the descriptor stays open and unchanged while `changed` exists: `inotify` owns it and, declared
    // first, is dropped last.
    let changed = inotify.as_ref().and_then(|i| unsafe { AsyncFd::register(i.as_fd().as_raw_fd()) }.ok());
    let mut seen: HashMap<String, u64> = HashMap::new();
    loop {
        let Some(sb) = sandbox.upgrade() else { return };
        let containers: Vec<Arc<Container>> = lock(&sb.containers).values().cloned().collect();
        seen.retain(|id, _| containers.iter().any(|c| &c.id == id));
        for c in containers {
            if let Some(i) = &inotify {
                // The same file gets the same watch again; a removed cgroup drops its watch by itself.
                let _ = i.add_watch(&c.cgroup_dir().join("memory.events"), AddWatchFlags::IN_MODIFY);
            }
            let kills = crate::stats::oom_kills(c.cgroup_dir());
            let before = seen.insert(c.id.clone(), kills).unwrap_or(0);
            if kills > before {
                tracing::info!(id = %c.id, "OOM kill in container");
                let _ = sb.oom.send(c.id.clone());
            }
        }
        drop(sb);
        let events = async {
            match (&changed, &inotify) {
                (Some(fd), Some(i)) => {
                    if let Ok(mut ready) = fd.readable().await {
                        while i.read_events().is_ok() {}
                        ready.clear_ready();
                    }
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = events => {}
            _ = added.notified() => {}
            _ = tokio::time::sleep(OOM_BACKSTOP) => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
