//! `kata-runtime` as an OCI runtime with runc's command line, so containerd's runc shims (`katacli`,
//! `ctr run --runc-binary`) drive it as they drive runc. Every container runs in a VM through `runtime`'s
//! lifecycle, owned by a long-lived stand-in process (`standin`) whose pid the shim takes for the container's
//! init; a CRI pod's containers join the VM of its pause container (`pod`). Commands are stateless: each finds its container by id under `--root` and talks to the stand-in over
//! its control socket (`control`); what is left after the stand-in exits is in the container's directory
//! (`dir`).

pub mod args;
mod control;
mod dir;
mod events;
mod pod;
mod standin;
mod tty;
mod update;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use args::{CreateArgs, ExecArgs, GlobalArgs, LogFormat, OciCommand};
use control::{Client, Request};
use dir::ContainerDir;

/// How long `delete` waits for a stand-in to stop its VM and exit.
const STANDIN_EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs an OCI command; errors go to `--log` as runc writes them (the runc shim reports the last one).
pub fn run(global: &GlobalArgs, config: Option<PathBuf>, command: OciCommand) -> ExitCode {
    match dispatch(global, config, command) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            log_error(global, &msg);
            eprintln!("kata-runtime: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// One error line in the `--log` file: `{"level":"error","msg":...,"time":...}` in the json format.
pub fn log_error(global: &GlobalArgs, msg: &str) {
    let Some(path) = &global.log else { return };
    let line =
        log_line(global.log_format, msg, &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true));
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(line.as_bytes());
    }
}

fn log_line(format: LogFormat, msg: &str, time: &str) -> String {
    match format {
        LogFormat::Json => format!("{}\n", serde_json::json!({ "level": "error", "msg": msg, "time": time })),
        LogFormat::Text => format!("time=\"{time}\" level=error msg={msg:?}\n"),
    }
}

/// A signal by number, or by name with or without `SIG` in any case (`9`, `KILL`, `SIGKILL`, `sigterm`).
pub fn parse_signal(s: &str) -> Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal {s}: numbers go from 1 to 64");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    nix::sys::signal::Signal::from_str(&name).map(|sig| sig as u32).map_err(|_| anyhow!("unknown signal {s:?}"))
}

fn dispatch(global: &GlobalArgs, config: Option<PathBuf>, command: OciCommand) -> Result<ExitCode> {
    let root = global.root.as_path();
    match command {
        OciCommand::Create(args) => {
            create(global, config, &args)?;
        }
        OciCommand::Run { create: args, detach } => {
            let pid = create(global, config, &args)?;
            call(root, &args.id, &Request::Start)?;
            if !detach {
                return wait_child(pid);
            }
        }
        OciCommand::Start { id } => {
            call(root, &id, &Request::Start)?;
        }
        OciCommand::State { id } => {
            let dir = ContainerDir::open(root, &id)?;
            let _lock = dir.lock()?;
            let record = dir.load()?;
            let status = match Client::to_container(root, &dir) {
                Some(mut c) => c.call(&Request::State)?.status.unwrap_or_else(|| "stopped".into()),
                None => "stopped".into(),
            };
            println!("{}", serde_json::to_string_pretty(&record.oci_state(&status))?);
        }
        OciCommand::Kill { all, id, signal } => {
            let signal = parse_signal(&signal)?;
            call(root, &id, &Request::Kill { signal, all })?;
        }
        OciCommand::Delete { force, id } => delete(root, &id, force)?,
        OciCommand::Ps { format, id, ps_args } => {
            if !ps_args.is_empty() {
                bail!("ps options are not supported: the container's processes are in a VM");
            }
            let pids = call(root, &id, &Request::Ps)?.pids.unwrap_or_default();
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string(&pids)?),
                "table" => {
                    println!("PID");
                    for p in pids {
                        println!("{p}");
                    }
                }
                other => bail!("invalid format {other:?}: use table or json"),
            }
        }
        OciCommand::Pause { id } => {
            call(root, &id, &Request::Pause)?;
        }
        OciCommand::Resume { id } => {
            call(root, &id, &Request::Resume)?;
        }
        OciCommand::Update(args) => {
            let resources = update::resources(&args)?;
            call(root, &args.id, &Request::Update { resources })?;
        }
        OciCommand::Exec(args) => return exec(global, config, &args),
        OciCommand::Events { stats, interval, id } => {
            let interval = events::parse_interval(&interval)?;
            loop {
                let data = call(root, &id, &Request::Stats)?.stats.unwrap_or_default();
                println!("{}", events::stats_event(&id, data));
                if stats {
                    break;
                }
                std::thread::sleep(interval);
                let dir = ContainerDir::open(root, &id)?;
                if Client::to_container(root, &dir).is_none() {
                    break;
                }
            }
        }
        OciCommand::List { format, quiet } => list(root, &format, quiet)?,
        OciCommand::Features => println!("{}", serde_json::to_string_pretty(&features())?),
        OciCommand::Spec { bundle } => {
            let path = bundle.join("config.json");
            if path.exists() {
                bail!("{} already exists", path.display());
            }
            oci_spec::runtime::Spec::default().save(&path).map_err(|e| anyhow!("write {}: {e}", path.display()))?;
        }
        OciCommand::Standin { bundle, ready_fd, console_socket, id } => {
            let ready = standin::Ready::from_fd(ready_fd)?;
            let args = standin::ContainerArgs { id, bundle, config, console_socket };
            return standin::container(global, args, ready);
        }
        OciCommand::ExecStandin { process, ready_fd, console_socket, id } => {
            let ready = standin::Ready::from_fd(ready_fd)?;
            return standin::exec(global, &id, &process, console_socket.as_deref(), ready);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Why a command on a container whose init has exited fails. runc's words: the runc shim recognises them
/// ("container not running") and treats the process as finished rather than the kill as failed.
pub fn not_running(id: &str) -> anyhow::Error {
    anyhow!("container not running: the init of {id} has exited")
}

/// Sends one request to a container's stand-in, under the container's lock.
fn call(root: &Path, id: &str, req: &Request) -> Result<control::Reply> {
    let dir = ContainerDir::open(root, id)?;
    let _lock = dir.lock()?;
    let mut client = Client::to_container(root, &dir).ok_or_else(|| not_running(id))?;
    client.call(req)
}

/// The command line that starts a stand-in: this binary with the same global flags.
fn standin_command(global: &GlobalArgs, config: &Option<PathBuf>) -> Result<Command> {
    let exe = std::env::current_exe().context("find this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(&global.root);
    if let Some(log) = &global.log {
        cmd.arg("--log").arg(log);
    }
    cmd.arg("--log-format").arg(match global.log_format {
        LogFormat::Json => "json",
        LogFormat::Text => "text",
    });
    if global.debug {
        cmd.arg("--debug");
    }
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    Ok(cmd)
}

/// Starts a stand-in and waits for its word: "ok" once its process exists, or why it failed. Returns its pid.
fn spawn_standin(mut cmd: Command) -> Result<u32> {
    let (read, write) = nix::unistd::pipe().context("make a pipe")?;
    nix::fcntl::fcntl(read.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    cmd.arg("--ready-fd").arg(write.as_raw_fd().to_string());
    let mut child = cmd.spawn().context("start the stand-in")?;
    drop(write);
    let mut word = String::new();
    std::fs::File::from(read).read_to_string(&mut word).context("read the stand-in's word")?;
    if word == "ok" {
        return Ok(child.id());
    }
    let _ = child.wait();
    if word.is_empty() {
        bail!("the stand-in exited before the container was ready");
    }
    bail!(word)
}

fn create(global: &GlobalArgs, config: Option<PathBuf>, args: &CreateArgs) -> Result<u32> {
    if args.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: file descriptors cannot cross into the VM");
    }
    let bundle = std::path::absolute(&args.bundle).with_context(|| format!("bundle {}", args.bundle.display()))?;
    let dir = ContainerDir::create(&global.root, &args.id)?;
    let created = (|| {
        let _lock = dir.lock()?;
        let mut cmd = standin_command(global, &config)?;
        cmd.arg("__standin").arg("--bundle").arg(&bundle);
        console(&mut cmd, args.console_socket.as_deref());
        cmd.arg(&args.id);
        let pid = spawn_standin(cmd)?;
        if let Some(path) = &args.pid_file {
            dir::write_pid_file(path, pid)?;
        }
        Ok(pid)
    })();
    if created.is_err() && !dir.standin_alive() {
        let _ = dir.remove();
    }
    created
}

/// Hands a stand-in the console socket, when there is one. The shim then reads the command's output to its end
/// with the terminal on the socket: the stand-in must not hold that output open.
fn console(cmd: &mut Command, socket: Option<&Path>) {
    if let Some(socket) = socket {
        cmd.arg("--console-socket").arg(socket);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    }
}

fn wait_child(pid: u32) -> Result<ExitCode> {
    use nix::sys::wait::{waitpid, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitCode::from((code & 0xff) as u8)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ExitCode::from(128 + sig as u8)),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("wait for {pid}: {e}"),
        }
    }
}

fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let dir = match ContainerDir::open(root, id) {
        Ok(dir) => dir,
        // runc's `delete --force` of a container that does not exist succeeds.
        Err(_) if force && runtime::paths::check_id("container", id).is_ok() => return Ok(()),
        Err(e) => return Err(e),
    };
    let _lock = dir.lock()?;
    let pod = dir.load().ok().and_then(|r| r.sandbox);
    if let Some(mut client) = Client::to_container(root, &dir) {
        client.call(&Request::Delete { force })?;
    }
    if !dir.wait_standin_exit(STANDIN_EXIT_TIMEOUT) {
        bail!("the stand-in of container {id} did not exit within {STANDIN_EXIT_TIMEOUT:?}");
    }
    if let Some(pod) = pod {
        // A pod's container leaves the pod's VM (which is gone already when its stand-in is).
        if let Some(mut client) = Client::to_pod(root, &pod, id) {
            client.call(&Request::Remove).with_context(|| format!("remove container {id} from the VM of {pod}"))?;
        }
        return dir.remove();
    }
    // A stand-in that was killed left its VM: the sandbox's persisted state says what to stop and unmount.
    let paths = runtime::paths::SandboxPaths::new(Path::new(runtime::paths::DEFAULT_ROOT), id);
    if std::fs::symlink_metadata(&paths.root).is_ok() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(runtime::state::cleanup(&runtime::mounts::Syscalls, &paths))
            .map_err(|e| anyhow!("clean up the VM of container {id}: {}", runtime::error_chain(&e)))?;
    }
    dir.remove()
}

fn exec(global: &GlobalArgs, config: Option<PathBuf>, args: &ExecArgs) -> Result<ExitCode> {
    let dir = ContainerDir::open(&global.root, &args.id)?;
    let lock = dir.lock()?;
    // The inline form's process goes through a file like --process, private to the container's directory.
    let inline_name = format!("exec-{}.json", std::process::id());
    let inline = dir.path.join(&inline_name);
    let process = match &args.process {
        Some(p) => p.clone(),
        None => {
            if args.command.is_empty() {
                bail!("exec needs --process FILE or a command");
            }
            let mut f = dir.create_file(&inline_name)?;
            f.write_all(&serde_json::to_vec(&inline_process(args))?)?;
            inline.clone()
        }
    };
    let mut cmd = standin_command(global, &config)?;
    cmd.arg("__exec-standin").arg("--process").arg(&process);
    console(&mut cmd, args.console_socket.as_deref());
    cmd.arg(&args.id);
    let spawned = spawn_standin(cmd);
    let _ = std::fs::remove_file(&inline);
    let pid = spawned?;
    if let Some(path) = &args.pid_file {
        dir::write_pid_file(path, pid)?;
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    drop(lock);
    wait_child(pid)
}

/// The OCI Process of `exec ID CMD...`.
fn inline_process(args: &ExecArgs) -> serde_json::Value {
    let (uid, gid) = match args.user.as_deref().map(|u| u.split_once(':').unwrap_or((u, "0"))) {
        Some((u, g)) => (u.parse::<u32>().unwrap_or(0), g.parse::<u32>().unwrap_or(0)),
        None => (0, 0),
    };
    let mut env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env.extend(args.env.iter().cloned());
    serde_json::json!({
        "terminal": args.tty,
        "user": { "uid": uid, "gid": gid },
        "args": args.command,
        "env": env,
        "cwd": args.cwd.clone().unwrap_or_else(|| "/".into()),
    })
}

fn list(root: &Path, format: &str, quiet: bool) -> Result<()> {
    let mut states = Vec::new();
    for id in dir::list(root) {
        let Ok(dir) = ContainerDir::open(root, &id) else { continue };
        let Ok(record) = dir.load() else { continue };
        let status = Client::to_container(root, &dir)
            .and_then(|mut c| c.call(&Request::State).ok())
            .and_then(|r| r.status)
            .unwrap_or_else(|| "stopped".into());
        states.push(record.oci_state(&status));
    }
    if quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(());
    }
    match format {
        "json" => println!("{}", serde_json::to_string(&states)?),
        "table" => {
            println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
            for s in &states {
                println!("{}\t{}\t{}\t{}\t{}\troot", s.id, s.pid, s.status, s.bundle, s.created);
            }
        }
        other => bail!("invalid format {other:?}: use table or json"),
    }
    Ok(())
}

/// runc's `features` JSON, for what a VM runtime can honour.
fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": { "v1": true, "v2": true, "systemd": false },
            "seccomp": { "enabled": true },
        },
        "annotations": {
            "io.katacontainers.runtime": "kata-rs",
            "io.katacontainers.runtime.vm": "every container runs in a VM; a CRI pod's containers share its pause container's",
        },
    })
}

#[cfg(test)]
mod tests;
