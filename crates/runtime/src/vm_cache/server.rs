//! The VM cache server: keeps `vm_cache_number` VMs ready of each kind (without a NIC, for pods without a
//! network such as `ctr run`; with one NIC, for CRI pods), makes a new one after each hand-over, and stops
//! what it holds when told to quit (SIGTERM, SIGINT, or a `quit` request).
//!
//! VMs are made one at a time, so the server never takes more than one core for itself. A VM that cannot be
//! made is logged and retried after a pause, never in a tight loop. What a killed server leaves behind is
//! cleaned by the next server at its start, or by `kata-runtime factory destroy`.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::Hypervisor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use types::config::Config;

use super::{cache_key, CachedVm, Reply, Request, CACHE_DIR, MAX_LINE};
use crate::network::parking::Parking;
use crate::paths::SandboxPaths;
use crate::state::SandboxState;
use crate::{boot, factory, host_fs, mounts, network, state};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The lock file one server holds in [`CACHE_DIR`] while it serves.
const LOCK: &str = "lock";

/// How long the server waits before trying again after a VM could not be made.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// How long after the last hand-over the server waits before making VMs again.
const REFILL_QUIET: Duration = Duration::from_secs(2);

/// How long one client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another VM cache server holds {0}")]
    Running(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotSocket(PathBuf),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    Lock(#[from] factory::FactoryError),
}

/// What the server needs to make VMs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub config: Config,
    pub endpoint: PathBuf,
    /// VMs kept ready per kind.
    pub number: u32,
    pub dial_timeout: Duration,
}

/// One VM ready to hand over.
#[derive(Debug)]
struct Ready {
    dir: PathBuf,
    nics: u32,
    key: String,
    /// Its tap's name in the parking namespace.
    tap: Option<String>,
}

#[derive(Debug)]
struct Shared {
    opts: ServerOptions,
    hv: Arc<dyn Hypervisor>,
    parking: Parking,
    ready: Mutex<VecDeque<Ready>>,
    /// Wakes the filler after a hand-over.
    taken: Notify,
    /// Set by a `quit` request.
    quit: Notify,
}

/// Runs the server until `shutdown` resolves or a client asks it to quit; then stops every VM it holds.
pub async fn serve(
    opts: ServerOptions,
    hv: Arc<dyn Hypervisor>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let dir = Path::new(CACHE_DIR);
    host_fs::private_dir(dir).map_err(|e| ServerError::Io {
        what: "create",
        path: dir.to_owned(),
        source: std::io::Error::other(e),
    })?;
    let lock_path = dir.join(LOCK);
    let Some(_lock) = factory::try_lock(&lock_path)? else {
        return Err(ServerError::Running(lock_path));
    };
    clean_leftovers(dir).await;
    let listener = listen(&opts.endpoint)?;
    let shared = Arc::new(Shared {
        opts,
        hv,
        parking: Parking::new()?,
        ready: Mutex::new(VecDeque::new()),
        taken: Notify::new(),
        quit: Notify::new(),
    });
    tracing::info!(endpoint = %shared.opts.endpoint.display(), number = shared.opts.number, "VM cache serving");
    let filler = tokio::spawn(fill(shared.clone()));
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    // One client at a time: a hand-over is quick, and the order of takes is the order of arrival.
                    if let Err(e) = handle(&shared, stream).await {
                        tracing::warn!(error = %crate::error_chain(&*e), "VM cache client");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accepting a VM cache client"),
            }
        }
    };
    tokio::select! {
        _ = shutdown => {}
        _ = shared.quit.notified() => {}
        _ = accept => {}
    }
    filler.abort();
    let _ = filler.await;
    let _ = std::fs::remove_file(&shared.opts.endpoint);
    let held: Vec<Ready> = shared.ready.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
    for vm in held {
        discard(&vm.dir).await;
    }
    tracing::info!("VM cache stopped");
    Ok(())
}

/// How long [`clean_unserved`] waits for a server that was told to quit to let go of its directory.
const QUIT_WAIT: Duration = Duration::from_secs(30);

/// Removes the VMs of a server that is gone (killed, so it could not stop them), once no server holds the
/// cache directory; waits a while for one that is quitting. Returns the directories removed.
pub async fn clean_unserved() -> Result<Vec<PathBuf>, ServerError> {
    let dir = Path::new(CACHE_DIR);
    let lock_path = dir.join(LOCK);
    if !lock_path.exists() {
        return Ok(Vec::new());
    }
    let deadline = tokio::time::Instant::now() + QUIT_WAIT;
    let _lock = loop {
        match factory::try_lock(&lock_path)? {
            Some(lock) => break lock,
            None if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            None => return Err(ServerError::Running(lock_path)),
        }
    };
    Ok(clean_leftovers(dir).await)
}

/// Binds the endpoint (root only), replacing a stale socket but nothing else.
fn listen(endpoint: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(parent) = endpoint.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ServerError::Io {
            what: "create",
            path: parent.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(endpoint) {
        Ok(meta) if meta.file_type().is_socket() => {
            let _ = std::fs::remove_file(endpoint);
        }
        Ok(_) => return Err(ServerError::NotSocket(endpoint.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(endpoint).map_err(|source| ServerError::Io {
        what: "listen on",
        path: endpoint.to_owned(),
        source,
    })?;
    std::fs::set_permissions(endpoint, std::fs::Permissions::from_mode(0o600)).map_err(|source| ServerError::Io {
        what: "restrict",
        path: endpoint.to_owned(),
        source,
    })?;
    Ok(listener)
}

/// Stops the VMs a killed server left (their directories hold their state, as a crashed shim's do).
/// Returns the directories removed.
async fn clean_leftovers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!(dir = %entry.path().display(), "stopping a VM a previous cache server left");
            discard(&entry.path()).await;
            removed.push(entry.path());
        }
    }
    removed
}

/// Stops a cached VM and removes its directory.
async fn discard(dir: &Path) {
    let paths = SandboxPaths { root: dir.to_owned() };
    if let Err(e) = state::cleanup(&mounts::Syscalls, &paths).await {
        tracing::warn!(dir = %dir.display(), error = %crate::error_chain(&e), "removing a cached VM");
    }
}

/// Keeps `number` VMs ready of each kind, making one at a time.
async fn fill(shared: Arc<Shared>) {
    let mut seq: u64 = 0;
    loop {
        let wanted = {
            let ready = shared.ready.lock().unwrap_or_else(|p| p.into_inner());
            [0u32, 1]
                .into_iter()
                .find(|nics| ready.iter().filter(|r| r.nics == *nics).count() < shared.opts.number as usize)
        };
        let Some(nics) = wanted else {
            shared.taken.notified().await;
            // Let the pods that just took VMs start before making the next ones: a VM made now would take
            // the CPU from the very starts the cache is there to speed up.
            while tokio::time::timeout(REFILL_QUIET, shared.taken.notified()).await.is_ok() {}
            continue;
        };
        seq += 1;
        let name = format!("vm{}-{seq}", std::process::id());
        match make(&shared, &name, nics).await {
            Ok(vm) => {
                tracing::info!(dir = %vm.dir.display(), nics, "VM ready in the cache");
                shared.ready.lock().unwrap_or_else(|p| p.into_inner()).push_back(vm);
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&*e), "making a VM for the cache; trying again in {RETRY_PAUSE:?}");
                discard(&Path::new(CACHE_DIR).join(&name)).await;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Starts one VM as a sandbox would, minus the pod: a clone of the template when templating is on.
async fn make(shared: &Shared, name: &str, nics: u32) -> Result<Ready, BoxError> {
    let opts = &shared.opts;
    let p = SandboxPaths::new(Path::new(CACHE_DIR), name);
    crate::sandbox::make_sandbox_dirs(&mounts::Syscalls, &p)?;
    let mut state = SandboxState { sandbox_id: name.to_string(), ..Default::default() };
    state.save(&p.state_file())?;
    // Exactly the configuration a shim gives a pod without limits, so their keys agree.
    let host_limits = types::config::HostLimits::detect()?;
    let sizing = crate::resources::Sizing::new(&opts.config, &host_limits, None);
    let (base, _) = crate::sandbox::pod_vm_config(name, &opts.config, &p, &sizing)?;
    let like = factory::template_config(&base, nics as usize).expect("at most one NIC");
    let key = cache_key(&factory::key(&*shared.hv, &like), opts.config.factory.enable_template);
    let mut config = like.clone();
    let tap = (nics == 1).then(|| format!("kc{}", short(name)));
    if let Some(tap) = &tap {
        let fd = shared.parking.tap(tap).await?;
        config.net_devices = vec![factory::template_nic(Some(Arc::new(fd)))];
    }
    if opts.config.factory.enable_template {
        let root = PathBuf::from(&opts.config.factory.template_path);
        let template = factory::ensure_waiting(&*shared.hv, &root, &like, opts.dial_timeout).await?;
        template.clone_into(&mut config);
    }
    let vm = shared.hv.vm(config);
    let booted = boot::boot_and_connect(&vm, opts.dial_timeout, |processes| {
        state.processes = processes.to_vec();
        if let Err(e) = state.save(&p.state_file()) {
            tracing::warn!(vm = name, error = %crate::error_chain(&e), "cannot persist the VM's processes");
        }
    })
    .await?;
    state.vm = Some(vm.saved().config);
    state.agent = vm.agent_endpoint();
    state.save(&p.state_file())?;
    let warmed = std::time::Instant::now();
    match warm_up(&booted.agent, &p, &opts.config).await {
        Ok(()) => tracing::info!(vm = name, took = ?warmed.elapsed(), "VM warmed up"),
        // A cold VM is still a good VM: it just starts its first container slower.
        Err(e) => tracing::warn!(vm = name, error = %crate::error_chain(&*e), "warming up a cached VM"),
    }
    // Let go of the agent and of QEMU's control socket: the shim that takes the VM connects to both.
    drop(booted);
    vm.release();
    Ok(Ready { dir: p.root, nics, key, tap })
}

/// The throw-away container of [`warm_up`].
const WARM_ID: &str = "warm-up";

/// Runs the guest through what a pod's start runs (CreateSandbox mounting the shared filesystem, a container
/// created and removed), so that under TCG its code is translated before the pod needs it. Nothing of it stays:
/// the container, its rootfs (a small tmpfs with one empty executable) and its guest state are removed. The
/// pod's own CreateSandbox then sets hostname, clock, entropy and DNS, and finds the share already mounted.
async fn warm_up(agent: &crate::agent::AgentClient, p: &SandboxPaths, config: &Config) -> Result<(), BoxError> {
    use crate::agent::SandboxSetup;
    use crate::mounts::{MountPoint, MountSpec};
    use std::os::unix::fs::PermissionsExt;
    let setup = SandboxSetup {
        sandbox_id: WARM_ID.to_string(),
        hostname: String::new(),
        dns: Vec::new(),
        shared_fs: Some(crate::sandbox::shared_fs_mount(config)),
        host_time: None,
        entropy: Vec::new(),
    };
    agent.create_sandbox(&setup).await?;
    let root = host_fs::Root::open(&p.root)?;
    let tmpfs = MountSpec { kind: "tmpfs".into(), source: "tmpfs".into(), options: vec!["size=64k".into()] };
    mounts::mount_beneath(&mounts::Syscalls, &root, &SandboxPaths::rootfs_rel(WARM_ID), MountPoint::Dir, &tmpfs)?;
    let result = async {
        let program = p.container_rootfs(WARM_ID).join(WARM_ID);
        std::fs::write(&program, b"")?;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
        let mut spec = oci_spec::runtime::Spec::default();
        if let Some(process) = spec.process_mut() {
            process.set_args(Some(vec![format!("/{WARM_ID}")]));
            process.set_terminal(Some(false));
        }
        let (guest_spec, _) = crate::spec::for_guest(&spec, WARM_ID, None, true)?;
        agent.create_container(WARM_ID, &guest_spec, &SandboxPaths::guest_rootfs(WARM_ID), false).await?;
        agent.remove_container(WARM_ID).await?;
        Ok::<_, BoxError>(())
    }
    .await;
    crate::sandbox::release_container_dir(&mounts::Syscalls, p, WARM_ID);
    result
}

/// A tap name under 16 bytes, unique per VM: the sequence part of the VM's name.
fn short(name: &str) -> String {
    name.rsplit('-').next().unwrap_or(name).chars().take(10).collect()
}

async fn handle(shared: &Shared, stream: UnixStream) -> Result<(), BoxError> {
    let peer = stream.peer_cred()?;
    if peer.uid() != 0 {
        return Err(format!("refused a client with uid {}", peer.uid()).into());
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, BufReader::new(read).take(MAX_LINE).read_line(&mut line)).await??;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => answer(shared, request).await,
        Err(e) => Reply::None { reason: format!("not a request: {e}") },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    if reply == Reply::Bye {
        shared.quit.notify_one();
    }
    Ok(())
}

async fn answer(shared: &Shared, request: Request) -> Reply {
    match request {
        Request::Status => {
            let ready = shared.ready.lock().unwrap_or_else(|p| p.into_inner());
            Reply::Status {
                ready: ready
                    .iter()
                    .map(|r| CachedVm { dir: r.dir.clone(), nics: r.nics, key: r.key.clone() })
                    .collect(),
            }
        }
        Request::Quit => Reply::Bye,
        Request::Take { key, nics, netns, tap } => {
            let found = {
                let mut ready = shared.ready.lock().unwrap_or_else(|p| p.into_inner());
                let at = ready.iter().position(|r| r.key == key && r.nics == nics);
                at.and_then(|i| ready.remove(i))
            };
            let Some(vm) = found else {
                return Reply::None { reason: format!("no VM ready for {key} with {nics} NIC(s)") };
            };
            shared.taken.notify_one();
            if let Some(parked) = &vm.tap {
                let (Some(netns), Some(tap)) = (netns, tap) else {
                    discard(&vm.dir).await;
                    return Reply::None { reason: "a VM with a NIC needs the pod's namespace and tap name".into() };
                };
                if let Err(e) = shared.parking.move_tap(parked, &netns, &tap).await {
                    discard(&vm.dir).await;
                    return Reply::None { reason: format!("handing over the tap: {}", crate::error_chain(&e)) };
                }
            }
            tracing::info!(dir = %vm.dir.display(), "VM handed over");
            Reply::Vm { dir: vm.dir }
        }
    }
}
