//! A private containerd (the Debian binary) with its own root, state, socket and config in a temporary
//! directory, plus `ctr` helpers. Dropping it stops containerd by PID, clears what its containers left
//! (tasks, shims, mounts) and removes the directory.

mod config;

pub use config::CriOptions;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};

use crate::image::{ImageError, OciImage};
use crate::leaks::{self, LeakQuery, LeakReport, LeakedProcess};
use crate::process::{self, describe, output_with_timeout, ProcessError};
use crate::pty::{PtyError, PtySession};

/// Where containerd 1.6 puts shim sockets, whatever its state directory.
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// Set to keep the test directory (containerd log, config, state) after the test, for debugging.
pub const KEEP_ENV: &str = "KATA_E2E_KEEP";
/// Set to create test directories under this directory instead of the system temporary directory.
pub const TMPDIR_ENV: &str = "KATA_E2E_TMPDIR";

/// Errors of the containerd helpers.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{program} is not installed (not found in PATH)")]
    NotInstalled { program: String },
    #[error("could not create a test directory under {path}")]
    TempDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not start containerd ({path})")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("containerd exited during start-up ({status}); log tail:\n{log}")]
    ExitedEarly { status: String, log: String },
    #[error("containerd did not answer `ctr version` within {timeout:?}; log tail:\n{log}")]
    NotReady { timeout: Duration, log: String },
    #[error("could not watch containerd")]
    Wait(#[source] io::Error),
    #[error("`{command}` failed ({status}); stdout: {stdout}; stderr: {stderr}")]
    CommandFailed { command: String, status: String, stdout: String, stderr: String },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Pty(#[from] PtyError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// How to start containerd.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    pub containerd_bin: PathBuf,
    pub ctr_bin: PathBuf,
    /// Put first in containerd's PATH: where `containerd-shim-kata-v2` is.
    pub shim_dir: Option<PathBuf>,
    /// Namespace `ctr` calls use.
    pub namespace: String,
    /// `None` disables the CRI plugin.
    pub cri: Option<CriOptions>,
    /// TOML appended to the generated config (e.g. runtime tables).
    pub extra_config: String,
    pub debug: bool,
    /// Where the private directory is created; default `$KATA_E2E_TMPDIR` or the system temp dir.
    pub base_dir: Option<PathBuf>,
    pub start_timeout: Duration,
    /// Deadline of a `ctr` call unless one is given.
    pub ctr_timeout: Duration,
    /// Extra environment for containerd, inherited by the shims it starts (e.g. `KATA_CONF_FILE`).
    pub env: Vec<(String, String)>,
    /// A whole `config.toml` used instead of the generated one (e.g. a version 1 config), with `{dir}`
    /// replaced by the private directory. It must keep root, state and the grpc socket at
    /// `{dir}/root`, `{dir}/state` and `{dir}/containerd.sock`; `cri` and `extra_config` are ignored.
    pub config_text: Option<String>,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        Self {
            containerd_bin: PathBuf::from("containerd"),
            ctr_bin: PathBuf::from("ctr"),
            shim_dir: None,
            namespace: "default".to_owned(),
            cri: None,
            extra_config: String::new(),
            debug: false,
            base_dir: None,
            start_timeout: Duration::from_secs(30),
            ctr_timeout: Duration::from_secs(120),
            env: Vec::new(),
            config_text: None,
        }
    }
}

/// Flags of [`Containerd::run`]: `ctr run [--rm] [-t] [--runtime R] FLAGS... IMAGE ID CMD...`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// e.g. `io.containerd.kata.v2`; `None` is ctr's default (`io.containerd.runc.v2`).
    pub runtime: Option<String>,
    pub rm: bool,
    pub tty: bool,
    pub extra_flags: Vec<String>,
    /// ctr is killed by PID when it runs longer.
    pub timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { runtime: None, rm: true, tty: false, extra_flags: Vec::new(), timeout: Duration::from_secs(120) }
    }
}

impl RunOptions {
    pub fn runtime(runtime: &str) -> Self {
        Self { runtime: Some(runtime.to_owned()), ..Self::default() }
    }

    /// `ctr run -d` with `runtime`, the container kept after its task ends, ctr killed after `timeout`.
    pub fn detached(runtime: &str, timeout: Duration) -> Self {
        Self { rm: false, extra_flags: vec!["-d".into()], timeout, ..Self::runtime(runtime) }
    }
}

/// What stopping containerd took beyond a clean exit.
#[derive(Debug, Clone, Default)]
pub struct ShutdownReport {
    /// `namespace/id` of containers still present at shutdown, removed with `ctr`.
    pub removed_containers: Vec<String>,
    /// containerd needed SIGKILL after SIGTERM and the grace period.
    pub containerd_killed: bool,
    /// Processes still around after containerd exited, killed by PID.
    pub killed_processes: Vec<LeakedProcess>,
    /// Mounts under the directory that had to be unmounted.
    pub unmounted: Vec<PathBuf>,
    /// What could not be cleaned (should be empty).
    pub remaining: LeakReport,
}

/// A running private containerd.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    pid: u32,
    dir: PathBuf,
    address: PathBuf,
    namespace: String,
    ctr_bin: PathBuf,
    ctr_timeout: Duration,
    keep: bool,
    /// How to launch containerd again (see [`Containerd::restart`]).
    launch: Launch,
}

#[derive(Debug, Clone)]
struct Launch {
    bin: PathBuf,
    config_path: PathBuf,
    path_env: std::ffi::OsString,
    env: Vec<(String, String)>,
    start_timeout: Duration,
}

impl Containerd {
    /// Writes the config, starts containerd and waits until `ctr version` answers.
    pub fn start(opts: ContainerdOptions) -> Result<Self, ContainerdError> {
        let containerd_bin = resolve_program(&opts.containerd_bin)?;
        let ctr_bin = resolve_program(&opts.ctr_bin)?;
        let base = opts
            .base_dir
            .clone()
            .or_else(|| std::env::var_os(TMPDIR_ENV).map(PathBuf::from))
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("kata-e2e-")
            .tempdir_in(&base)
            .map_err(|source| ContainerdError::TempDir { path: base.clone(), source })?
            .keep();
        let layout = config::Layout {
            root: dir.join("root"),
            state: dir.join("state"),
            address: dir.join("containerd.sock"),
            opt: dir.join("opt"),
        };
        let config_path = dir.join("config.toml");
        let text = match &opts.config_text {
            Some(text) => text.replace("{dir}", &dir.to_string_lossy()),
            None => config::render(&layout, opts.cri.as_ref(), opts.debug, &opts.extra_config),
        };
        let mut this = Self {
            child: None,
            pid: 0,
            dir: dir.clone(),
            address: layout.address.clone(),
            namespace: opts.namespace.clone(),
            ctr_bin,
            ctr_timeout: opts.ctr_timeout,
            keep: std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty() && v != "0"),
            launch: Launch {
                bin: containerd_bin.clone(),
                config_path: config_path.clone(),
                path_env: shim_path(opts.shim_dir.as_deref()),
                env: opts.env.clone(),
                start_timeout: opts.start_timeout,
            },
        };
        // From here on, Drop removes the directory if anything fails.
        fs::write(&config_path, text).map_err(|source| ContainerdError::Write { path: config_path.clone(), source })?;
        this.spawn()?;
        this.wait_ready(opts.start_timeout)?;
        Ok(this)
    }

    /// Starts the containerd process (log appended) and waits until it answers.
    fn spawn(&mut self) -> Result<(), ContainerdError> {
        let log_path = self.log_path();
        let open_log = || {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|source| ContainerdError::Write { path: log_path.clone(), source })
        };
        let (log, log_err) = (open_log()?, open_log()?);
        let mut cmd = Command::new(&self.launch.bin);
        cmd.arg("--config")
            .arg(&self.launch.config_path)
            .env("PATH", &self.launch.path_env)
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .current_dir(&self.dir)
            // Its own process group: a Ctrl-C meant for the test runner reaches containerd only via Drop.
            .process_group(0);
        let child = cmd.spawn().map_err(|source| ContainerdError::Spawn { path: self.launch.bin.clone(), source })?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready(self.launch.start_timeout)
    }

    /// Stops containerd with SIGTERM (leaving shims and tasks alone, as a service restart does) and starts it
    /// again on the same state, as `systemctl restart containerd` would.
    pub fn restart(&mut self) -> Result<(), ContainerdError> {
        if let Some(mut child) = self.child.take() {
            let _ = process::terminate_child(&mut child, Duration::from_secs(10));
        }
        self.spawn()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().map_err(ContainerdError::Wait)? {
                    self.child = None;
                    return Err(ContainerdError::ExitedEarly { status: status.to_string(), log: self.log_tail(40) });
                }
            }
            if self.address.exists() {
                let mut cmd = Command::new(&self.ctr_bin);
                cmd.arg("--address").arg(&self.address).arg("version").stdin(Stdio::null());
                if let Ok(out) = output_with_timeout(&mut cmd, Duration::from_secs(5)) {
                    if out.status.success() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ContainerdError::NotReady { timeout, log: self.log_tail(40) });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The private directory holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The grpc socket (`--address`).
    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// containerd's stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `ctr --address SOCK --namespace NS ARGS...` ready to run (stdin null), e.g. for a [`PtySession`].
    pub fn ctr_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.ctr_bin);
        cmd.arg("--address").arg(&self.address).arg("--namespace").arg(&self.namespace).args(args).stdin(Stdio::null());
        cmd
    }

    /// Runs ctr with the default deadline; the exit status is not checked.
    pub fn ctr<I, S>(&self, args: I) -> Result<Output, ContainerdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctr_with_timeout(args, self.ctr_timeout)
    }

    /// Runs ctr, killing it by PID after `timeout`; the exit status is not checked.
    pub fn ctr_with_timeout<I, S>(&self, args: I, timeout: Duration) -> Result<Output, ContainerdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(output_with_timeout(&mut self.ctr_command(args), timeout)?)
    }

    /// Runs ctr and returns its stdout, or an error carrying its output if it failed.
    pub fn ctr_ok<I, S>(&self, args: I) -> Result<String, ContainerdError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.ctr_command(args);
        let out = output_with_timeout(&mut cmd, self.ctr_timeout)?;
        check(&cmd, out)
    }

    /// `ctr image import TAR`.
    pub fn import_image(&self, tar: &Path) -> Result<(), ContainerdError> {
        self.ctr_ok([OsStr::new("image"), OsStr::new("import"), tar.as_os_str()]).map(|_| ())
    }

    /// Writes `image` into the private directory and imports it.
    pub fn import(&self, image: &OciImage) -> Result<(), ContainerdError> {
        let path = image.write_cached(&self.dir.join("images"))?;
        self.import_image(&path)
    }

    /// `ctr run` of `image` as container `id` running `cmd` (empty: the image's default); returns ctr's
    /// output, whose exit status is the container's. ctr is killed by PID if it passes the deadline.
    pub fn run(&self, opts: &RunOptions, image: &str, id: &str, cmd: &[&str]) -> Result<Output, ContainerdError> {
        Ok(output_with_timeout(&mut self.ctr_command(run_args(opts, image, id, cmd)), opts.timeout)?)
    }

    /// Starts `ctr run` on a pseudo-terminal (add `tty: true` for `-t`); drive it with the session.
    pub fn run_pty(
        &self,
        opts: &RunOptions,
        image: &str,
        id: &str,
        cmd: &[&str],
    ) -> Result<PtySession, ContainerdError> {
        Ok(PtySession::spawn(self.ctr_command(run_args(opts, image, id, cmd)))?)
    }

    /// The socket containerd tells a shim to serve for container `id` in our namespace:
    /// `/run/containerd/s/<sha256 of "ADDRESS/NS/ID">`.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        shim_socket_path(&self.address, &self.namespace, id)
    }

    /// Leftovers of containers `ids`: processes below containerd or naming the directory or an id, mounts,
    /// bundles, Kata state dirs, shim sockets, and containers, tasks or snapshots containerd still lists.
    pub fn leaks(&self, ids: &[&str]) -> Result<LeakReport, ContainerdError> {
        self.leaks_with_pids(ids, &[])
    }

    /// [`Containerd::leaks`], also reporting any of `pids` (e.g. a VM's QEMU) still running.
    pub fn leaks_with_pids(&self, ids: &[&str], pids: &[u32]) -> Result<LeakReport, ContainerdError> {
        let query = LeakQuery {
            dir: self.dir.clone(),
            containerd_pid: Some(self.pid),
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            pids: pids.to_vec(),
            paths: ids.iter().map(|id| self.shim_socket(id)).collect(),
        };
        let mut report = leaks::find_leaks(&query);
        for (kind, args) in [
            ("container", ["containers", "ls", "-q"]),
            ("task", ["tasks", "ls", "-q"]),
            ("snapshot", ["snapshots", "ls", ""]),
        ] {
            let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
            let listing = self.ctr_ok(&args)?;
            // `snapshots ls` prints a header; the `-q` listings do not.
            for line in listing.lines().skip(usize::from(kind == "snapshot")) {
                let name = line.split_whitespace().next().unwrap_or_default();
                if ids.contains(&name) {
                    report.containerd_objects.push(format!("{kind} {name}"));
                }
            }
        }
        Ok(report)
    }

    /// Stops containerd and cleans up, reporting anything that needed force or could not be removed.
    pub fn stop(mut self) -> ShutdownReport {
        self.shutdown()
    }

    fn shutdown(&mut self) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        let Some(mut child) = self.child.take() else {
            self.remove_dir(&mut report);
            return report;
        };
        let ids = self.bundle_ids();
        if let Ok(None) = child.try_wait() {
            report.removed_containers = self.remove_all_containers();
        }
        match process::terminate_child(&mut child, Duration::from_secs(10)) {
            Ok((_, killed)) => report.containerd_killed = killed,
            Err(_) => report.containerd_killed = true,
        }
        // Shims and workloads that outlived containerd: found by our directory or ids, killed by PID.
        let id_refs: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
        let query = LeakQuery {
            dir: self.dir.clone(),
            containerd_pid: None,
            ids: id_refs,
            pids: Vec::new(),
            paths: Vec::new(),
        };
        let leftovers = leaks::find_leaks(&query).processes;
        for p in &leftovers {
            process::send_signal(p.pid, Signal::SIGKILL);
        }
        let pids: Vec<u32> = leftovers.iter().map(|p| p.pid).collect();
        process::wait_gone(&pids, Duration::from_secs(5));
        report.killed_processes = leftovers;
        for (ns, id) in &ids {
            let socket = shim_socket_path(&self.address, ns, id);
            if socket.exists() {
                let _ = fs::remove_file(&socket);
            }
        }
        self.remove_dir(&mut report);
        report.remaining = leaks::find_leaks(&query);
        report
    }

    fn remove_dir(&self, report: &mut ShutdownReport) {
        report.unmounted = unmount_all_under(&self.dir);
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// `(namespace, id)` of every task bundle in the state directory.
    fn bundle_ids(&self) -> Vec<(String, String)> {
        let mut ids = Vec::new();
        let tasks = self.state().join("io.containerd.runtime.v2.task");
        for ns in read_names(&tasks) {
            for id in read_names(&tasks.join(&ns)) {
                ids.push((ns.clone(), id));
            }
        }
        ids
    }

    /// Kills and deletes the tasks and containers of every namespace; returns `namespace/id` of those removed.
    fn remove_all_containers(&self) -> Vec<String> {
        let quick = Duration::from_secs(30);
        let mut removed = Vec::new();
        let Ok(namespaces) = self.ctr_with_timeout(["namespaces", "ls", "-q"], quick) else {
            return removed;
        };
        for ns in String::from_utf8_lossy(&namespaces.stdout).lines() {
            let in_ns = |args: &[&str]| {
                let mut cmd = Command::new(&self.ctr_bin);
                cmd.arg("--address").arg(&self.address).arg("--namespace").arg(ns);
                cmd.args(args).stdin(Stdio::null());
                output_with_timeout(&mut cmd, quick).ok()
            };
            let list = |args: &[&str]| -> Vec<String> {
                in_ns(args)
                    .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
                    .unwrap_or_default()
            };
            for task in list(&["tasks", "ls", "-q"]) {
                in_ns(&["tasks", "kill", "-a", "-s", "SIGKILL", &task]);
                in_ns(&["tasks", "delete", "-f", &task]);
            }
            for container in list(&["containers", "ls", "-q"]) {
                in_ns(&["containers", "delete", &container]);
                removed.push(format!("{ns}/{container}"));
            }
        }
        removed
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("containerd log ({}), last lines:\n{}", self.log_path().display(), self.log_tail(60));
        }
        let report = self.shutdown();
        if !report.remaining.is_empty() {
            eprintln!("e2e: containerd cleanup left:\n{}", report.remaining);
        }
    }
}

fn run_args(opts: &RunOptions, image: &str, id: &str, cmd: &[&str]) -> Vec<String> {
    let mut args = vec!["run".to_owned()];
    if opts.rm {
        args.push("--rm".to_owned());
    }
    if opts.tty {
        args.push("-t".to_owned());
    }
    if let Some(runtime) = &opts.runtime {
        args.push("--runtime".to_owned());
        args.push(runtime.clone());
    }
    args.extend(opts.extra_flags.iter().cloned());
    args.push(image.to_owned());
    args.push(id.to_owned());
    args.extend(cmd.iter().map(|s| (*s).to_owned()));
    args
}

/// The shim socket path containerd 1.6 derives for (`address`, `namespace`, `id`).
pub fn shim_socket_path(address: &Path, namespace: &str, id: &str) -> PathBuf {
    let key = address.join(namespace).join(id);
    let digest = Sha256::digest(key.as_os_str().as_encoded_bytes());
    Path::new(SHIM_SOCKET_DIR).join(hex::encode(digest))
}

/// Unmounts every mount at or under `dir`, deepest first (lazily if busy); returns what was unmounted.
pub fn unmount_all_under(dir: &Path) -> Vec<PathBuf> {
    let mut unmounted = Vec::new();
    // Mounts can be stacked on one point: repeat until none is left or nothing changes.
    for _ in 0..8 {
        let found = leaks::mounts_under(dir);
        if found.is_empty() {
            break;
        }
        let mut progress = false;
        for point in found {
            if umount2(&point, MntFlags::empty()).is_ok() || umount2(&point, MntFlags::MNT_DETACH).is_ok() {
                progress = true;
                unmounted.push(point);
            }
        }
        if !progress {
            break;
        }
    }
    unmounted
}

fn check(cmd: &Command, out: Output) -> Result<String, ContainerdError> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(ContainerdError::CommandFailed {
        command: describe(cmd),
        status: out.status.to_string(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn read_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// `shim_dir` first, then the current PATH, then the system directories (runc is in /usr/sbin).
fn shim_path(shim_dir: Option<&Path>) -> OsString {
    let mut dirs: Vec<PathBuf> = shim_dir.map(Path::to_owned).into_iter().collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    for system in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        if !dirs.iter().any(|d| d == Path::new(system)) {
            dirs.push(PathBuf::from(system));
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn resolve_program(program: &Path) -> Result<PathBuf, ContainerdError> {
    let not_installed = || ContainerdError::NotInstalled { program: program.display().to_string() };
    if program.components().count() > 1 {
        return if program.is_file() { Ok(program.to_owned()) } else { Err(not_installed()) };
    }
    crate::find_in_path(program.as_os_str()).ok_or_else(not_installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_socket_matches_containerd_derivation() {
        // sha256("/run/containerd/containerd.sock/default/abc")
        let path = shim_socket_path(Path::new("/run/containerd/containerd.sock"), "default", "abc");
        let expected = hex::encode(Sha256::digest(b"/run/containerd/containerd.sock/default/abc"));
        assert_eq!(path, Path::new("/run/containerd/s").join(expected));
    }

    #[test]
    fn run_args_put_flags_before_image_and_id() {
        let opts = RunOptions {
            tty: true,
            extra_flags: vec!["--env".into(), "A=1".into()],
            ..RunOptions::runtime("io.containerd.kata.v2")
        };
        assert_eq!(
            run_args(&opts, "img", "id1", &["sh", "-c", "true"]),
            [
                "run",
                "--rm",
                "-t",
                "--runtime",
                "io.containerd.kata.v2",
                "--env",
                "A=1",
                "img",
                "id1",
                "sh",
                "-c",
                "true"
            ]
        );
    }

    #[test]
    fn shim_dir_comes_first_in_path() {
        let path = shim_path(Some(Path::new("/opt/kata/bin")));
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        assert_eq!(dirs[0], Path::new("/opt/kata/bin"));
        assert!(dirs.iter().any(|d| d == Path::new("/usr/sbin")));
    }
}
