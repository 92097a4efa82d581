//! The stand-ins: host processes that a runc shim takes for the container's init and for its execs. The
//! container's stand-in owns the sandbox (the VM and the agent connection) and serves the control socket; an
//! exec's stand-in asks it to run the exec. Each relays its process's stdio from the fds it inherited and exits
//! with its process's status.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use oci_spec::runtime::Spec;
use runtime::io::IoPaths;
use runtime::{error_chain, Host, Rootfs, Sandbox, SandboxOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::args::GlobalArgs;
use super::control::{Client, Io, Reply, Request};
use super::dir::{ContainerDir, Record};
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

fn own_io() -> Io {
    Io { stdin: own_fd_path(0), stdout: own_fd_path(1), stderr: own_fd_path(2), terminal: false }
}

fn io_paths(io: &Io) -> IoPaths {
    IoPaths { stdin: io.stdin.clone(), stdout: io.stdout.clone(), stderr: io.stderr.clone(), terminal: io.terminal }
}

/// Detaches from the caller's session so a terminal hang-up or the caller's process group signals do not reach
/// the stand-in (it forwards signals sent to it on purpose).
fn detach() {
    let _ = nix::unistd::setsid();
}

struct Container {
    id: String,
    sandbox: Arc<Sandbox>,
    dir: ContainerDir,
    record: Mutex<Record>,
    started: AtomicBool,
    /// The init's exit status: the stand-in ends with it.
    exit: mpsc::UnboundedSender<u32>,
}

impl Container {
    fn set_status(&self, status: &str, exit_status: Option<u32>) {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        record.status = status.to_string();
        record.exit_status = exit_status;
        if let Err(e) = self.dir.save(&record) {
            tracing::warn!(error = %format!("{e:#}"), "save the container's state");
        }
    }

    fn status(&self) -> Result<String> {
        let state = self.sandbox.state(&self.id, "").map_err(|e| anyhow!(error_chain(&e)))?;
        Ok(match state.status {
            runtime::Status::Created => "created",
            runtime::Status::Running => "running",
            runtime::Status::Paused => "paused",
            runtime::Status::Stopped => "stopped",
        }
        .to_string())
    }

    async fn handle(self: &Arc<Self>, req: Request, out: &mut tokio::net::unix::OwnedWriteHalf) -> Result<Reply> {
        let (sandbox, id) = (&self.sandbox, self.id.as_str());
        let chain = |e: runtime::LifecycleError| anyhow!(error_chain(&e));
        match req {
            Request::Start => {
                let exit = self.exit.clone();
                sandbox
                    .start_process(id, "", move |e| {
                        let _ = exit.send(e.status);
                    })
                    .await
                    .map_err(chain)?;
                self.started.store(true, Ordering::SeqCst);
                self.set_status("running", None);
            }
            Request::State => return Ok(Reply { status: Some(self.status()?), ..Default::default() }),
            Request::Kill { signal, all } => {
                sandbox.kill(id, "", signal, all).await.map_err(chain)?;
                if !self.started.load(Ordering::SeqCst) {
                    // A never-started init ends at once (runc's created container dies the same way).
                    let _ = self.exit.send(128 + signal);
                }
            }
            Request::Pause => {
                sandbox.pause(id).await.map_err(chain)?;
                self.set_status("paused", None);
            }
            Request::Resume => {
                sandbox.resume(id).await.map_err(chain)?;
                self.set_status("running", None);
            }
            Request::Update { resources } => {
                sandbox.update(id, &serde_json::to_vec(&resources)?).await.map_err(chain)?;
            }
            Request::Ps => {
                let list = sandbox.pids(id).await.map_err(chain)?;
                let own = std::process::id();
                let others = list.pids.iter().filter(|&&p| Some(p) != list.init).filter_map(|&p| u32::try_from(p).ok());
                let pids = list.init.map(|_| own).into_iter().chain(others).collect();
                return Ok(Reply { pids: Some(pids), ..Default::default() });
            }
            Request::Exec { exec_id, process, io } => {
                sandbox.exec(id, &exec_id, serde_json::to_vec(&process)?, io_paths(&io)).map_err(chain)?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                if let Err(e) = sandbox
                    .start_process(id, &exec_id, move |e| {
                        let _ = tx.send(e.status);
                    })
                    .await
                {
                    let _ = sandbox.delete(id, &exec_id).await;
                    return Err(chain(e));
                }
                write_reply(out, &Reply::default()).await?;
                let status = rx.await.unwrap_or(255);
                if let Err(e) = sandbox.delete(id, &exec_id).await {
                    tracing::warn!(exec = %exec_id, error = %error_chain(&e), "delete the exec");
                }
                return Ok(Reply { exit: Some(status), ..Default::default() });
            }
            Request::Resize { exec_id, rows, cols } => {
                sandbox.resize_pty(id, &exec_id, rows, cols).await.map_err(chain)?;
            }
            Request::Delete { force } => {
                let status = self.status()?;
                match status.as_str() {
                    "created" => {
                        let _ = self.exit.send(128 + 9);
                    }
                    "stopped" => {}
                    _ if force => sandbox.kill(id, "", 9, true).await.map_err(chain)?,
                    _ => anyhow::bail!("cannot delete container {id} that is not stopped: {status}"),
                }
            }
        }
        Ok(Reply::default())
    }
}

async fn write_reply(out: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    Ok(())
}

async fn serve_connection(container: Arc<Container>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => container.handle(req, &mut write).await.unwrap_or_else(|e| Reply::error(format!("{e:#}"))),
            Err(e) => Reply::error(format!("bad request: {e}")),
        };
        if write_reply(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

/// What the container's stand-in needs from the command line.
#[derive(Debug)]
pub struct ContainerArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub config: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
}

/// The container's stand-in: boots the VM, creates the container, says "ok" on `ready`, serves the control
/// socket until the init exits, stops the VM and exits with the init's status.
pub fn container(global: &GlobalArgs, args: ContainerArgs, mut ready: Ready) -> Result<ExitCode> {
    detach();
    let dir = ContainerDir::open(&global.root, &args.id)?;
    let _alive = match dir.standin_lock() {
        Ok(lock) => lock,
        Err(e) => {
            ready.fail(&e);
            return Err(e);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
        let (container, listener) = match setup(&dir, &args, exit_tx).await {
            Ok(c) => c,
            Err(e) => {
                ready.fail(&e);
                return Err(e);
            }
        };
        ready.ok();
        let mut signals = Signals::new()?;
        let status = loop {
            tokio::select! {
                conn = listener.accept() => {
                    if let Ok((stream, _)) = conn {
                        tokio::spawn(serve_connection(container.clone(), stream));
                    }
                }
                status = exit_rx.recv() => break status.unwrap_or(255),
                signal = signals.next() => {
                    if container.started.load(Ordering::SeqCst) {
                        if let Err(e) = container.sandbox.kill(&container.id, "", signal, false).await {
                            tracing::debug!(error = %error_chain(&e), "forward a signal");
                        }
                    }
                }
            }
        };
        container.set_status("stopped", Some(status));
        let _ = std::fs::remove_file(dir.socket());
        if let Err(e) = container.sandbox.stop().await {
            super::log_error(global, &format!("stop the VM of container {}: {}", container.id, error_chain(&e)));
        }
        Ok(ExitCode::from((status & 0xff) as u8))
    })
}

async fn setup(
    dir: &ContainerDir,
    args: &ContainerArgs,
    exit: mpsc::UnboundedSender<u32>,
) -> Result<(Arc<Container>, UnixListener)> {
    let id = args.id.as_str();
    let spec_path = args.bundle.join("config.json");
    let spec = Spec::load(&spec_path).map_err(|e| anyhow!("{}: {}", spec_path.display(), error_chain(&e)))?;
    let annotations: BTreeMap<String, String> = spec.annotations().clone().unwrap_or_default().into_iter().collect();
    let config = runtime::pod_config::resolve(id, args.config.clone(), &annotations)
        .map_err(|e| anyhow!("configuration: {}", error_chain(&e)))?;
    let netns = runtime::network::pod_netns(&spec).map_err(|e| anyhow!(error_chain(&e)))?;
    let resources = runtime::resources::SandboxResources::of_spec(&spec).map_err(|e| anyhow!(e))?;
    let terminal = match &args.console_socket {
        Some(socket) => Some(Terminal::open(socket, &dir.path, "init")?),
        None => None,
    };
    let io = terminal.as_ref().map(Terminal::io_paths).unwrap_or_else(|| io_paths(&own_io()));
    let rootfs = spec.root().as_ref().map(|r| r.path().clone()).unwrap_or_else(|| PathBuf::from("rootfs"));
    let rootfs = if rootfs.is_absolute() { rootfs } else { args.bundle.join(rootfs) };
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
    let bundle = args.bundle.display().to_string();
    let created = sandbox.create(id, &spec, &Rootfs::Dir(rootfs.clone()), &bundle, io.clone(), true).await;
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
    let record = Record {
        id: id.to_string(),
        pid: std::process::id(),
        bundle,
        rootfs: rootfs.display().to_string(),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        annotations,
        status: "created".into(),
        exit_status: None,
    };
    dir.save(&record)?;
    let container = Container {
        id: id.to_string(),
        sandbox: Arc::new(sandbox),
        dir: dir.clone(),
        record: Mutex::new(record),
        started: AtomicBool::new(false),
        exit,
    };
    let container = Arc::new(container);
    if let Some(terminal) = &terminal {
        let (sandbox, id, rt) = (container.sandbox.clone(), id.to_string(), tokio::runtime::Handle::current());
        let follow = move |rows: u16, cols: u16| {
            let (sandbox, id) = (sandbox.clone(), id.clone());
            rt.spawn(async move {
                if let Err(e) = sandbox.resize_pty(&id, "", u32::from(rows), u32::from(cols)).await {
                    tracing::debug!(error = %error_chain(&e), "resize the guest's terminal");
                }
            });
        };
        if let Err(e) = terminal.relay(follow) {
            let _ = container.sandbox.stop().await;
            return Err(e);
        }
    }
    Ok((container, listener))
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
        let io = match &terminal {
            Some(t) => {
                let paths = t.io_paths();
                Io { stdin: paths.stdin, stdout: paths.stdout, stderr: paths.stderr, terminal: true }
            }
            None => own_io(),
        };
        let mut client = Client::connect(&dir).ok_or_else(|| anyhow!("container {id} is not running"))?;
        client.call(&Request::Exec { exec_id: exec_id.clone(), process, io })?;
        if let Some(t) = &terminal {
            let dir = dir.clone();
            t.relay(move |rows, cols| {
                let resize = Request::Resize { exec_id: exec_id.clone(), rows: rows.into(), cols: cols.into() };
                if let Some(mut c) = Client::connect(&dir) {
                    let _ = c.call(&resize);
                }
            })?;
        }
        Ok((client, terminal))
    })();
    let (mut client, terminal) = match started {
        Ok(c) => c,
        Err(e) => {
            ready.fail(&e);
            return Err(e);
        }
    };
    ready.ok();
    let status = client.read().map(|r| r.exit.unwrap_or(255)).unwrap_or(255);
    if let Some(t) = terminal {
        t.remove();
    }
    Ok(ExitCode::from((status & 0xff) as u8))
}
