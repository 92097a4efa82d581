//! The stand-ins: host processes that a runc shim takes for the container's init and for its execs. The
//! stand-in of a container with a VM of its own owns the sandbox (the VM and the agent connection) and serves
//! the control socket (`pod`); a pod's container's stand-in and an exec's stand-in ask that one to run their
//! process. Each relays its process's stdio from the fds it inherited and exits with its process's status.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use oci_spec::runtime::Spec;
use runtime::{error_chain, Host, Rootfs, Sandbox, SandboxOptions};
use tokio::net::UnixListener;

use super::args::GlobalArgs;
use super::control::{Client, Io, Request};
use super::dir::{ContainerDir, Record};
use super::pod::{self, Pod};
use super::tty::Terminal;

/// The pipe on which a stand-in tells the command that started it "ok", or why it failed.
pub struct Ready(Option<File>);

impl Ready {
    /// Takes the pipe's write end. It is made close-on-exec at once, so the VM's processes never hold it.
    pub fn from_fd(fd: i32) -> Result<Self> {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .with_context(|| format!("--ready-fd {fd}"))?;
        // SAFETY: the fd was opened for this process by its parent (`--ready-fd`), just checked to be open,
        // and nothing else in this process owns it.
        Ok(Ready(Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))))
    }

    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }

    pub fn ok(&mut self) {
        self.send("ok");
    }

    pub fn fail(&mut self, e: &anyhow::Error) {
        self.send(&format!("{e:#}"));
    }

    /// Passes `result` through, telling the waiting command why when it is an error.
    pub fn check<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }
}

/// A path through which another process reopens this process's fd `n`, when it is a pipe (containerd's runc
/// shim hands pipes over); anything else is not connected (output is drained, input is empty).
pub fn own_fd_path(n: i32) -> String {
    let is_fifo = nix::sys::stat::fstat(n).is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFIFO);
    if is_fifo {
        format!("/proc/{}/fd/{n}", std::process::id())
    } else {
        String::new()
    }
}

/// A process's IO: its terminal's FIFOs, or this process's own stdio.
fn stdio(terminal: Option<&Terminal>) -> Io {
    match terminal {
        Some(t) => {
            let paths = t.io_paths();
            Io { stdin: paths.stdin, stdout: paths.stdout, stderr: paths.stderr, terminal: true }
        }
        None => Io { stdin: own_fd_path(0), stdout: own_fd_path(1), stderr: own_fd_path(2), terminal: false },
    }
}

/// The init's terminal, when `create` was given a console socket.
fn init_terminal(args: &ContainerArgs, dir: &ContainerDir) -> Result<Option<Terminal>> {
    args.console_socket.as_deref().map(|socket| Terminal::open(socket, &dir.path, "init")).transpose()
}

/// Detaches from the caller's session so a terminal hang-up or the caller's process group signals do not reach
/// the stand-in (it forwards signals sent to it on purpose).
fn detach() {
    let _ = nix::unistd::setsid();
}

/// What the container's stand-in needs from the command line.
#[derive(Debug)]
pub struct ContainerArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub config: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
}

/// The container's stand-in: boots the VM (or, for a pod's container, joins the pod's), creates the container,
/// says "ok" on `ready`, serves the control socket until the init exits, stops the VM and exits with the init's
/// status.
pub fn container(global: &GlobalArgs, args: ContainerArgs, mut ready: Ready) -> Result<ExitCode> {
    detach();
    let dir = ContainerDir::open(&global.root, &args.id)?;
    let _alive = ready.check(dir.standin_lock())?;
    let spec = ready.check(load_spec(&args.bundle))?;
    let annotations: BTreeMap<String, String> = spec.annotations().clone().unwrap_or_default().into_iter().collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match ready.check(pod::pod_of(&args.id, &annotations))? {
        None => rt.block_on(own_vm(global, &dir, &args, spec, annotations, ready)),
        Some(pod) => rt.block_on(member(global, &dir, &args, &pod, annotations, ready)),
    }
}

fn load_spec(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|e| anyhow!("{}: {}", path.display(), error_chain(&e)))
}

fn record(args: &ContainerArgs, spec: &Spec, annotations: BTreeMap<String, String>, sandbox: Option<String>) -> Record {
    Record {
        id: args.id.clone(),
        pid: std::process::id(),
        bundle: args.bundle.display().to_string(),
        rootfs: pod::rootfs_of(spec, &args.bundle).display().to_string(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        annotations,
        status: "created".into(),
        exit_status: None,
        sandbox,
    }
}

/// A container with a VM of its own (a lone container, or a pod's sandbox container).
async fn own_vm(
    global: &GlobalArgs,
    dir: &ContainerDir,
    args: &ContainerArgs,
    spec: Spec,
    annotations: BTreeMap<String, String>,
    mut ready: Ready,
) -> Result<ExitCode> {
    let (pod, listener) = ready.check(setup(dir, args, spec, annotations).await)?;
    ready.ok();
    let mut signals = Signals::new()?;
    let exit = {
        let pod = pod.clone();
        async move { pod.wait(&pod.id).await }
    };
    tokio::pin!(exit);
    let status = loop {
        tokio::select! {
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    tokio::spawn(pod::serve_connection(pod.clone(), stream));
                }
            }
            status = &mut exit => break status,
            signal = signals.next() => pod.forward_signal(&pod.id, signal).await,
        }
    };
    pod.set_status("stopped", Some(status));
    let _ = std::fs::remove_file(dir.socket());
    if let Err(e) = pod.sandbox.stop().await {
        super::log_error(global, &format!("stop the VM of container {}: {}", pod.id, error_chain(&e)));
    }
    Ok(ExitCode::from((status & 0xff) as u8))
}

async fn setup(
    dir: &ContainerDir,
    args: &ContainerArgs,
    spec: Spec,
    annotations: BTreeMap<String, String>,
) -> Result<(Arc<Pod>, UnixListener)> {
    let id = args.id.as_str();
    let config = runtime::pod_config::resolve(id, args.config.clone(), &annotations)
        .map_err(|e| anyhow!("configuration: {}", error_chain(&e)))?;
    let netns = runtime::network::pod_netns(&spec).map_err(|e| anyhow!(error_chain(&e)))?;
    let resources = runtime::resources::SandboxResources::of_spec(&spec).map_err(|e| anyhow!(e))?;
    let terminal = init_terminal(args, dir)?;
    let io = pod::io_paths(&stdio(terminal.as_ref()));
    let record = record(args, &spec, annotations, None);
    let opts = SandboxOptions {
        id: id.to_string(),
        config,
        root: PathBuf::from(runtime::paths::DEFAULT_ROOT),
        hostname: spec.hostname().clone().unwrap_or_default(),
        dns: Vec::new(),
        netns: netns.path().map(Path::to_path_buf),
        resources,
    };
    let sandbox = Sandbox::start(opts, Host::real()).await.map_err(|e| anyhow!("start the VM: {}", error_chain(&e)))?;
    let rootfs = Rootfs::Dir(PathBuf::from(&record.rootfs));
    let created = sandbox.create(id, &spec, &rootfs, &record.bundle, io.clone(), true).await;
    if let Err(e) = created {
        let _ = sandbox.stop().await;
        anyhow::bail!("create the container: {}", error_chain(&e));
    }
    if !io.stdin.is_empty() && !io.terminal {
        // Drop the stdin forwarding's own writer: the process sees end of file when the shim closes its end.
        let _ = sandbox.close_stdin(id, "").await;
    }
    let listener = match bind(dir) {
        Ok(l) => l,
        Err(e) => {
            let _ = sandbox.stop().await;
            return Err(e);
        }
    };
    dir.save(&record)?;
    let pod = Arc::new(Pod::new(sandbox, dir.clone(), record));
    if let Some(terminal) = &terminal {
        let (sandbox, id, rt) = (pod.sandbox.clone(), id.to_string(), tokio::runtime::Handle::current());
        let follow = move |rows: u16, cols: u16| {
            let (sandbox, id) = (sandbox.clone(), id.clone());
            rt.spawn(async move {
                if let Err(e) = sandbox.resize_pty(&id, "", u32::from(rows), u32::from(cols)).await {
                    tracing::debug!(error = %error_chain(&e), "resize the guest's terminal");
                }
            });
        };
        if let Err(e) = terminal.relay(follow) {
            let _ = pod.sandbox.stop().await;
            return Err(e);
        }
    }
    Ok((pod, listener))
}

/// A pod's container: joins the VM of the pod's sandbox container through that container's stand-in, relays
/// its IO and signals, and exits with its init's status (137 when the pod's VM went away first).
async fn member(
    global: &GlobalArgs,
    dir: &ContainerDir,
    args: &ContainerArgs,
    pod: &str,
    annotations: BTreeMap<String, String>,
    mut ready: Ready,
) -> Result<ExitCode> {
    let root = global.root.clone();
    let joined = (|| {
        let spec = load_spec(&args.bundle)?;
        let terminal = init_terminal(args, dir)?;
        let io = stdio(terminal.as_ref());
        let mut client = Client::to_pod(&root, pod, &args.id)
            .ok_or_else(|| anyhow!("the pod's sandbox container {pod} is not running"))?;
        client.call(&Request::Join { bundle: args.bundle.clone(), io, pid: std::process::id() })?;
        dir.save(&record(args, &spec, annotations, Some(pod.to_string())))?;
        if let Some(t) = &terminal {
            let (root, pod, id) = (root.clone(), pod.to_string(), args.id.clone());
            t.relay(move |rows, cols| {
                let resize = Request::Resize { exec_id: String::new(), rows: rows.into(), cols: cols.into() };
                if let Some(mut c) = Client::to_pod(&root, &pod, &id) {
                    let _ = c.call(&resize);
                }
            })?;
        }
        Ok::<_, anyhow::Error>((client, terminal))
    })();
    let (mut client, _terminal) = ready.check(joined)?;
    ready.ok();
    let mut signals = Signals::new()?;
    let exit = tokio::task::spawn_blocking(move || client.read().ok().and_then(|r| r.exit));
    tokio::pin!(exit);
    let status = loop {
        tokio::select! {
            status = &mut exit => break status.ok().flatten().unwrap_or(128 + 9),
            signal = signals.next() => {
                let (root, pod, id) = (root.clone(), pod.to_string(), args.id.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    if let Some(mut c) = Client::to_pod(&root, &pod, &id) {
                        let _ = c.call(&Request::Signal { signal });
                    }
                })
                .await;
            }
        }
    };
    let mut record = dir.load()?;
    record.status = "stopped".into();
    record.exit_status = Some(status);
    dir.save(&record)?;
    Ok(ExitCode::from((status & 0xff) as u8))
}

/// The control socket, 0600 (in the 0700 container directory, so it is never reachable by others).
fn bind(dir: &ContainerDir) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.socket();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The signals a stand-in forwards to its process (the runc shim and users signal the "init" pid).
struct Signals(Vec<(u32, tokio::signal::unix::Signal)>);

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [
            nix::libc::SIGTERM,
            nix::libc::SIGINT,
            nix::libc::SIGHUP,
            nix::libc::SIGQUIT,
            nix::libc::SIGUSR1,
            nix::libc::SIGUSR2,
            nix::libc::SIGWINCH,
        ];
        let mut v = Vec::new();
        for k in kinds {
            v.push((k as u32, signal(SignalKind::from_raw(k))?));
        }
        Ok(Signals(v))
    }

    async fn next(&mut self) -> u32 {
        let futures = self.0.iter_mut().map(|(n, s)| {
            let n = *n;
            Box::pin(async move {
                s.recv().await;
                n
            })
        });
        futures_select_all(futures).await
    }
}

/// The first of several futures to finish.
async fn futures_select_all<F: std::future::Future<Output = u32> + Unpin>(futures: impl Iterator<Item = F>) -> u32 {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(n) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(n);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// An exec's stand-in: asks the container's stand-in to run the process with this process's stdio, says "ok"
/// on `ready` once it started, and exits with its status.
pub fn exec(
    global: &GlobalArgs,
    id: &str,
    process: &Path,
    console_socket: Option<&Path>,
    mut ready: Ready,
) -> Result<ExitCode> {
    detach();
    let started = (|| {
        let dir = ContainerDir::open(&global.root, id)?;
        let json = std::fs::read(process).with_context(|| format!("read {}", process.display()))?;
        let process: serde_json::Value =
            serde_json::from_slice(&json).with_context(|| format!("parse {}", process.display()))?;
        let exec_id = format!("exec-{}", std::process::id());
        let tty = process.get("terminal").and_then(serde_json::Value::as_bool) == Some(true);
        let terminal = match (tty, console_socket) {
            (true, Some(socket)) => Some(Terminal::open(socket, &dir.path, &exec_id)?),
            (true, None) => anyhow::bail!("the process asks for a terminal but no --console-socket was given"),
            (false, _) => None,
        };
        let io = stdio(terminal.as_ref());
        let mut client = Client::to_container(&global.root, &dir).ok_or_else(|| super::not_running(id))?;
        client.call(&Request::Exec { exec_id: exec_id.clone(), process, io })?;
        if let Some(t) = &terminal {
            let (root, dir) = (global.root.clone(), dir.clone());
            t.relay(move |rows, cols| {
                let resize = Request::Resize { exec_id: exec_id.clone(), rows: rows.into(), cols: cols.into() };
                if let Some(mut c) = Client::to_container(&root, &dir) {
                    let _ = c.call(&resize);
                }
            })?;
        }
        Ok((client, terminal))
    })();
    let (mut client, terminal) = ready.check(started)?;
    ready.ok();
    let status = client.read().map(|r| r.exit.unwrap_or(255)).unwrap_or(255);
    if let Some(t) = terminal {
        t.remove();
    }
    Ok(ExitCode::from((status & 0xff) as u8))
}
