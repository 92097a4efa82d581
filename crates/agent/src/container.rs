//! One container, run by libcontainer: create, start, exec, signal, pause, update, remove.
//!
//! Every libcontainer call is synchronous and runs on the agent's single runtime thread.
//! That is deliberate: libcontainer forks with a raw `clone3`, which is only safe when no
//! other thread can hold a libc lock (malloc) at that moment, and it keeps the reaper from
//! running while libcontainer waits for its own intermediate process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libcgroups::common::{AnyManagerError, CgroupConfig, CgroupManager, ControllerOpt, CreateCgroupSetupError};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxDeviceCgroup, LinuxNamespaceType, LinuxResources, LinuxSeccomp, Process as OciProcess, Spec,
};

use crate::device_cgroup;
use crate::exec_seccomp::SeccompExecutor;
use crate::io::{ConsoleSocket, IoError, ProcessIo};
use crate::process::{check_executable, Process, ProcessError, RootView};
use crate::reaper::Reaper;
use crate::start_window;
use crate::stats::{self, ContainerStats, StatsError};

/// Where libcontainer keeps its state and the agent its bundles.
pub const STATE_ROOT: &str = "/run/kata-containers/state";
pub const BUNDLE_ROOT: &str = "/run/kata-containers/bundles";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Console sockets live here, not in the bundle: a unix socket path must fit in 108 bytes, and CRI's
/// 64-character container and exec ids make `<bundle>/console-<exec id>.sock` 171.
const CONSOLE_DIR: &str = "/run/kata-containers/console";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid OCI spec")]
    Spec(#[source] serde_json::Error),
    #[error("the OCI spec has no process")]
    NoProcess,
    #[error("the OCI spec was not prepared for the guest (the host's runtime::spec::for_guest does that): {0}")]
    NotForGuest(String),
    #[error("rootfs {0} does not exist in the guest")]
    NoRootfs(PathBuf),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Stats(#[from] StatsError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// libcontainer's init reports only "failed syscall" to the parent; `init_log` has the error lines it
    /// wrote to the process's stderr before dying (` (init log: ...)`), or is empty.
    #[error("libcontainer failed to {op}{init_log}")]
    Libcontainer {
        op: &'static str,
        init_log: String,
        /// Boxed: libcontainer's error is large and every `Result` here would carry its size.
        #[source]
        source: Box<LibcontainerError>,
    },
    #[error("libcontainer did not report a pid for the container")]
    NoPid,
    #[error("cannot signal process {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("invalid signal {0}")]
    InvalidSignal(u32),
    #[error("exec id '{0}' is already in use")]
    ExecExists(String),
    #[error("no process with exec id '{0}'")]
    NoSuchExec(String),
    #[error("exec '{0}' is still running")]
    ExecRunning(String),
    #[error("cannot open the container's cgroup")]
    CgroupOpen(#[source] CreateCgroupSetupError),
    #[error("cannot update the container's cgroup")]
    CgroupUpdate(#[source] AnyManagerError),
}

type Result<T> = std::result::Result<T, ContainerError>;

fn lc_err(op: &'static str) -> impl FnOnce(LibcontainerError) -> ContainerError {
    move |source| ContainerError::Libcontainer { op, init_log: String::new(), source: Box::new(source) }
}

/// A container known to the agent.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    cgroup_dir: PathBuf,
    /// The spec's device rules, which every update keeps.
    devices: Option<Vec<LinuxDeviceCgroup>>,
    /// The spec's seccomp profile, for exec'd processes too.
    seccomp: Option<LinuxSeccomp>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    /// Creates the container with its init process waiting to be started. `stdin`: the host will write the
    /// init's stdin (else it reads /dev/null); `init_pid_of` finds the init of another container of the sandbox,
    /// whose namespaces the spec may join.
    pub fn create(
        reaper: &Reaper,
        id: &str,
        spec_json: &[u8],
        rootfs: PathBuf,
        stdin: bool,
        init_pid_of: &dyn Fn(&str) -> Option<Pid>,
    ) -> Result<Self> {
        let began = std::time::Instant::now();
        let mut spec: Spec = serde_json::from_slice(spec_json).map_err(ContainerError::Spec)?;
        if !rootfs.is_dir() {
            return Err(ContainerError::NoRootfs(rootfs));
        }
        let cgroup_rel = protocols::container_cgroup(id);
        prepare_spec(&mut spec, &rootfs, &cgroup_rel, init_pid_of)?;
        device_cgroup::pin_memlock_limit(spec.process_mut().as_mut().ok_or(ContainerError::NoProcess)?);
        let process = spec.process().as_ref().ok_or(ContainerError::NoProcess)?;
        check_process(&view_of(&spec, &rootfs), process)?;
        let tty = process.terminal().unwrap_or(false);
        let devices = spec.linux().as_ref().and_then(|l| l.resources().as_ref()).and_then(|r| r.devices().clone());
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());

        let bundle = Path::new(BUNDLE_ROOT).join(id);
        std::fs::create_dir_all(&bundle).map_err(|source| ContainerError::Write { path: bundle.clone(), source })?;
        let config = bundle.join("config.json");
        let json = serde_json::to_vec(&spec).map_err(ContainerError::Spec)?;
        std::fs::write(&config, json).map_err(|source| ContainerError::Write { path: config.clone(), source })?;

        let (builder, io, console) =
            with_stdio(ContainerBuilder::new(id.to_string(), SyscallType::default()), tty, stdin)?;
        let prepared = began.elapsed();
        let guard = reaper.build_guard();
        let container = builder
            .with_root_path(STATE_ROOT)
            .map_err(lc_err("set its state root"))?
            .as_init(&bundle)
            .with_no_pivot(crate::mount::root_is_initramfs())
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(lc_err("create the container"))
            .map_err(|e| with_init_log(e, io.as_ref()))?;
        let pid = container.pid().ok_or(ContainerError::NoPid)?;
        let exit = reaper.register(pid);
        drop(guard);
        let io = finish_stdio(io, console)?;
        tracing::info!(id, %pid, tty, prepared_ms = prepared.as_millis(), total_ms = began.elapsed().as_millis(), "container created");
        Ok(Self {
            id: id.to_string(),
            bundle,
            rootfs,
            cgroup_dir: Path::new(CGROUP_ROOT).join(cgroup_rel.trim_start_matches('/')),
            devices,
            seccomp,
            init: Arc::new(Process::new(pid, io, exit)),
            execs: Mutex::new(HashMap::new()),
        })
    }

    fn load(&self) -> Result<LcContainer> {
        LcContainer::load(Path::new(STATE_ROOT).join(&self.id)).map_err(lc_err("load the container state"))
    }

    /// Starts the init's program and returns once it runs (as runc's start does), not when libcontainer told
    /// the init to go.
    pub async fn start(&self) -> Result<()> {
        self.load()?.start().map_err(lc_err("start the container"))?;
        let _ = self.init.started.set(std::time::Instant::now());
        start_window::wait_for_exec(self.init.pid).await;
        Ok(())
    }

    /// Runs another process in the running container; `stdin` as for [`Container::create`].
    pub fn exec(&self, reaper: &Reaper, exec_id: &str, process_json: &[u8], stdin: bool) -> Result<()> {
        if exec_id.is_empty() || lock(&self.execs).contains_key(exec_id) {
            return Err(ContainerError::ExecExists(exec_id.to_string()));
        }
        let process: OciProcess = serde_json::from_slice(process_json).map_err(ContainerError::Spec)?;
        // The running container's own view, volumes included: its init's root.
        let root = match self.init.exit() {
            None => PathBuf::from(format!("/proc/{}/root", self.init.pid)),
            Some(_) => self.rootfs.clone(),
        };
        check_process(&RootView::new(&root), &process)?;
        let tty = process.terminal().unwrap_or(false);
        let path = self.bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&path, process_json).map_err(|source| ContainerError::Write { path: path.clone(), source })?;

        let (builder, io, console) =
            with_stdio(ContainerBuilder::new(self.id.clone(), SyscallType::default()), tty, stdin)?;
        let guard = reaper.build_guard();
        let pid = builder
            .with_root_path(STATE_ROOT)
            .map_err(lc_err("set its state root"))?
            .with_executor(SeccompExecutor { seccomp: self.seccomp.clone() })
            .as_tenant()
            .with_detach(true)
            .with_process(Some(&path))
            .build()
            .map_err(lc_err("exec the process"))
            .map_err(|e| with_init_log(e, io.as_ref()))?;
        let exit = reaper.register(pid);
        drop(guard);
        let _ = std::fs::remove_file(&path);
        let io = finish_stdio(io, console)?;
        tracing::info!(id = %self.id, exec_id, %pid, tty, "exec started");
        let process = Process::new(pid, io, exit);
        let _ = process.started.set(std::time::Instant::now());
        lock(&self.execs).insert(exec_id.to_string(), Arc::new(process));
        Ok(())
    }

    /// Forgets an exec that has exited, so its id can be used again.
    pub fn remove_exec(&self, exec_id: &str) -> Result<()> {
        let mut execs = lock(&self.execs);
        let process = execs.get(exec_id).ok_or_else(|| ContainerError::NoSuchExec(exec_id.to_string()))?;
        if process.exit().is_none() {
            return Err(ContainerError::ExecRunning(exec_id.to_string()));
        }
        execs.remove(exec_id);
        Ok(())
    }

    /// The pid of the init while it runs.
    pub fn running_init_pid(&self) -> Option<Pid> {
        self.init.exit().is_none().then_some(self.init.pid)
    }

    /// The init process for an empty exec id, else the exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| ContainerError::NoSuchExec(exec_id.to_string()))
    }

    pub fn signal(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or(ContainerError::InvalidSignal(signal))?;
        if all {
            for pid in stats::pids(&self.cgroup_dir).unwrap_or_default() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        let process = self.process(exec_id)?;
        if process.exit().is_some() {
            return Ok(());
        }
        let pid = process.pid;
        start_window::deliver(process, sig).map_err(|source| ContainerError::Signal { pid: pid.as_raw(), source })
    }

    pub fn pause(&self) -> Result<()> {
        self.load()?.pause().map_err(lc_err("pause the container"))
    }

    pub fn resume(&self) -> Result<()> {
        self.load()?.resume().map_err(lc_err("resume the container"))
    }

    pub fn update(&self, resources_json: &[u8]) -> Result<()> {
        let mut resources: LinuxResources = serde_json::from_slice(resources_json).map_err(ContainerError::Spec)?;
        device_cgroup::keep_created_rules(&mut resources, self.devices.as_ref());
        let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: self.cgroup_dir.strip_prefix(CGROUP_ROOT).unwrap_or(&self.cgroup_dir).to_path_buf(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(ContainerError::CgroupOpen)?;
        let opt = ControllerOpt {
            resources: &resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        device_cgroup::without_leftovers(|| manager.apply(&opt)).map_err(ContainerError::CgroupUpdate)
    }

    pub fn pids(&self) -> Result<Vec<i32>> {
        Ok(stats::pids(&self.cgroup_dir)?)
    }

    pub fn stats(&self) -> Result<ContainerStats> {
        Ok(stats::read(&self.cgroup_dir)?)
    }

    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// Kills whatever still runs and deletes the container's state, cgroup and bundle.
    pub async fn remove(&self) -> Result<()> {
        if self.init.exit().is_none() {
            let _ = self.signal("", libc::SIGKILL as u32, true);
            let _ = nix::sys::signal::kill(self.init.pid, Signal::SIGKILL);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.init.wait()).await;
        }
        match self.load() {
            Ok(mut c) => c.delete(true).map_err(lc_err("delete the container"))?,
            Err(err) => {
                tracing::warn!(id = %self.id, error = %crate::error_chain(&err), "no libcontainer state to delete")
            }
        }
        let _ = std::fs::remove_dir_all(&self.bundle);
        Ok(())
    }
}

/// Points the spec at the container's rootfs in the guest and its namespace joins at the containers they name.
/// The host has already replaced everything that only means something on the host (`runtime::spec::for_guest`);
/// a spec that still joins host namespaces, asks for its own network namespace (the VM is the pod's) or names
/// another cgroup is refused, not silently rewritten.
fn prepare_spec(spec: &mut Spec, rootfs: &Path, cgroup: &str, init_pid_of: &dyn Fn(&str) -> Option<Pid>) -> Result<()> {
    let linux = spec.linux().as_ref().ok_or_else(|| ContainerError::NotForGuest("no linux section".into()))?;
    match linux.cgroups_path() {
        Some(path) if path == Path::new(cgroup) => {}
        other => {
            let found = other.as_ref().map_or("none".to_string(), |p| p.display().to_string());
            return Err(ContainerError::NotForGuest(format!("cgroupsPath is {found}, expected {cgroup}")));
        }
    }
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    for ns in namespaces.iter_mut() {
        if ns.typ() == LinuxNamespaceType::Network {
            return Err(ContainerError::NotForGuest("it asks for a network namespace; the VM is the pod's".into()));
        }
        if let Some(path) = ns.path() {
            let joined = container_namespace(path, ns.typ(), init_pid_of)?;
            ns.set_path(Some(joined));
        }
    }
    if let Some(linux) = spec.linux_mut() {
        if linux.namespaces().is_some() {
            linux.set_namespaces(Some(namespaces));
        }
    }
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs.to_path_buf());
    spec.set_root(Some(root));
    // runc takes the recursive spellings CRI writes ("rslave" for a host-to-container volume, "rshared" for a
    // bidirectional one); libcontainer knows only the plain ones, and always applies them recursively.
    if let Some(linux) = spec.linux_mut() {
        let plain = linux.rootfs_propagation().as_deref().map(|p| p.strip_prefix('r').unwrap_or(p).to_string());
        if let Some(p) = plain.filter(|p| ["shared", "slave", "private", "unbindable"].contains(&p.as_str())) {
            linux.set_rootfs_propagation(Some(p));
        }
    }
    // libcontainer applies resources, and with them the device cgroup, only when the spec has some: a spec
    // without `linux.resources` must still get deny-all plus the default devices, not every device.
    if let Some(linux) = spec.linux_mut() {
        if linux.resources().is_none() {
            linux.set_resources(Some(LinuxResources::default()));
        }
    }
    Ok(())
}

/// The guest path of a namespace join the host wrote as `protocols::container_namespace_path`: the namespace of
/// that container's running init. Anything else names a host path and is refused.
fn container_namespace(
    path: &Path,
    typ: LinuxNamespaceType,
    init_pid_of: &dyn Fn(&str) -> Option<Pid>,
) -> Result<PathBuf> {
    let refuse = |why: String| ContainerError::NotForGuest(format!("the {typ:?} namespace {why}"));
    let kind = match typ {
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Pid => "pid",
        _ => return Err(refuse(format!("joins host path {}", path.display()))),
    };
    let rest = path
        .strip_prefix(protocols::CONTAINER_NAMESPACE_DIR)
        .map_err(|_| refuse(format!("joins host path {}", path.display())))?;
    let parts: Vec<&str> = rest.iter().filter_map(|c| c.to_str()).collect();
    let [container, named_kind] = parts[..] else {
        return Err(refuse(format!("path {} is malformed", path.display())));
    };
    if named_kind != kind || container == ".." || container == "." {
        return Err(refuse(format!("path {} is malformed", path.display())));
    }
    let pid =
        init_pid_of(container).ok_or_else(|| refuse(format!("joins container {container}, which is not running")))?;
    Ok(PathBuf::from(format!("/proc/{pid}/ns/{kind}")))
}

/// The container's filesystem as its init will see it: the rootfs and the spec's mounts.
fn view_of(spec: &Spec, rootfs: &Path) -> RootView {
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| {
            let bind =
                m.typ().as_deref() == Some("bind") || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
            (m.destination().clone(), if bind { m.source().clone() } else { None })
        })
        .collect();
    RootView { root: rootfs.to_path_buf(), mounts }
}

/// libcontainer's init reports only "failed syscall" to the parent; the details are in the
/// log lines it wrote to the process's stderr before dying. Adds the last error lines.
fn with_init_log(err: ContainerError, io: Option<&ProcessIo>) -> ContainerError {
    let ContainerError::Libcontainer { op, source, .. } = err else { return err };
    let log = io.map(|io| io.stderr_so_far()).unwrap_or_default();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).map(str::trim).collect();
    let shown = &errors[errors.len().saturating_sub(3)..];
    let init_log = if shown.is_empty() { String::new() } else { format!(" (init log: {})", shown.join(" | ")) };
    ContainerError::Libcontainer { op, init_log, source }
}

fn check_process(view: &RootView, process: &OciProcess) -> Result<()> {
    let args = process.args().clone().unwrap_or_default();
    let env = process.env().clone().unwrap_or_default();
    check_executable(view, &args, &env, process.cwd())?;
    Ok(())
}

type StdioSetup = (ContainerBuilder, Option<ProcessIo>, Option<(ConsoleSocket, PathBuf)>);

fn with_stdio(builder: ContainerBuilder, tty: bool, stdin: bool) -> Result<StdioSetup> {
    if tty {
        let path = console_socket_path()?;
        let socket = ConsoleSocket::bind(&path)?;
        let builder = builder.with_console_socket(Some(&path));
        return Ok((builder, None, Some((socket, path))));
    }
    let (io, child) = ProcessIo::pipes(stdin)?;
    let builder = builder.with_stdin(child.stdin).with_stdout(child.stdout).with_stderr(child.stderr);
    Ok((builder, Some(io), None))
}

/// A fresh, short socket path for receiving one console master.
fn console_socket_path() -> Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new(CONSOLE_DIR);
    std::fs::create_dir_all(dir).map_err(|source| ContainerError::Write { path: dir.to_path_buf(), source })?;
    Ok(dir.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed))))
}

fn finish_stdio(io: Option<ProcessIo>, console: Option<(ConsoleSocket, PathBuf)>) -> Result<ProcessIo> {
    match (io, console) {
        (Some(io), _) => Ok(io),
        (None, Some((socket, path))) => {
            let master = socket.receive_master();
            let _ = std::fs::remove_file(path);
            Ok(ProcessIo::tty(master?)?)
        }
        (None, None) => Err(IoError::NoTerminal.into()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_spec_gets_its_rootfs() {
        let json = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
            "linux":{"cgroupsPath":"/kata/c1","namespaces":[{"type":"pid"},{"type":"ipc"}]}}"#;
        let mut spec: Spec = serde_json::from_str(json).expect("spec");
        prepare_spec(&mut spec, Path::new("/run/kata-containers/shared/c1/rootfs"), "/kata/c1", &|_| None)
            .expect("prepare");
        assert_eq!(
            spec.root().as_ref().map(|r| r.path().clone()),
            Some(PathBuf::from("/run/kata-containers/shared/c1/rootfs"))
        );
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        assert_eq!(resources, Some(LinuxResources::default()), "no resources still means the default device cgroup");
    }

    #[test]
    fn recursive_rootfs_propagation_is_spelled_for_libcontainer() {
        for (given, expected) in
            [("rshared", "shared"), ("rslave", "slave"), ("private", "private"), ("bogus", "bogus")]
        {
            let json = format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"linux":{{"cgroupsPath":"/kata/c1","rootfsPropagation":"{given}"}}}}"#
            );
            let mut spec: Spec = serde_json::from_str(&json).expect("spec");
            prepare_spec(&mut spec, Path::new("/r"), "/kata/c1", &|_| None).expect("prepare");
            let got = spec.linux().as_ref().and_then(|l| l.rootfs_propagation().clone());
            assert_eq!(got.as_deref(), Some(expected), "{given}");
        }
    }

    #[test]
    fn host_specs_are_refused_with_the_reason() {
        let cases = [
            (
                r#"{"cgroupsPath":"/kubepods/x","namespaces":[{"type":"pid"}]}"#,
                "cgroupsPath is /kubepods/x, expected /kata/c1",
            ),
            (r#"{"namespaces":[{"type":"pid"}]}"#, "cgroupsPath is none, expected /kata/c1"),
            (
                r#"{"cgroupsPath":"/kata/c1","namespaces":[{"type":"network","path":"/var/run/netns/cni-1"}]}"#,
                "network namespace",
            ),
            (
                r#"{"cgroupsPath":"/kata/c1","namespaces":[{"type":"ipc","path":"/proc/5/ns/ipc"}]}"#,
                "joins host path /proc/5/ns/ipc",
            ),
        ];
        for (linux, expected) in cases {
            let json = format!(r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"linux":{linux}}}"#);
            let mut spec: Spec = serde_json::from_str(&json).expect("spec");
            let err = prepare_spec(&mut spec, Path::new("/r"), "/kata/c1", &|_| None).expect_err(linux).to_string();
            assert!(err.contains(expected) && err.contains("for_guest"), "{linux}: {err}");
        }
    }

    #[test]
    fn joins_of_another_container_go_to_its_init() {
        let json = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"cgroupsPath":"/kata/c1","namespaces":[
            {"type":"ipc","path":"/run/kata-containers/namespaces/pause/ipc"},{"type":"mount"},
            {"type":"pid","path":"/run/kata-containers/namespaces/pause/pid"}]}}"#;
        let running = |id: &str| (id == "pause").then(|| Pid::from_raw(42));
        let mut spec: Spec = serde_json::from_str(json).expect("spec");
        prepare_spec(&mut spec, Path::new("/r"), "/kata/c1", &running).expect("prepare");
        let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
        let paths: Vec<_> = namespaces.iter().map(|n| n.path().clone()).collect();
        assert_eq!(paths, [Some(PathBuf::from("/proc/42/ns/ipc")), None, Some(PathBuf::from("/proc/42/ns/pid"))]);

        for (ns, expected) in [
            (r#"{"type":"ipc","path":"/run/kata-containers/namespaces/gone/ipc"}"#, "gone, which is not running"),
            (r#"{"type":"ipc","path":"/run/kata-containers/namespaces/pause/uts"}"#, "malformed"),
            (r#"{"type":"ipc","path":"/run/kata-containers/namespaces/pause/../x/ipc"}"#, "malformed"),
            (r#"{"type":"mount","path":"/run/kata-containers/namespaces/pause/mnt"}"#, "joins host path"),
        ] {
            let json = format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"linux":{{"cgroupsPath":"/kata/c1","namespaces":[{ns}]}}}}"#
            );
            let mut spec: Spec = serde_json::from_str(&json).expect("spec");
            let err = prepare_spec(&mut spec, Path::new("/r"), "/kata/c1", &running).expect_err(ns).to_string();
            assert!(err.contains(expected), "{ns}: {err}");
        }
    }
}
