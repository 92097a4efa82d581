//! The QEMU backend: one QEMU child process per VM (never `-daemonize`, so we own its PID), plus per-VM
//! `virtiofsd` and `vhost-device-vsock` helpers, controlled over QMP.
//!
//! QEMU runs under `-sandbox` (seccomp) by default, so it opens no path it was not given and starts no process:
//! the guest console reaches us through a socket it inherits, and template state through a file we open and
//! hand over with QMP `getfd`. Neither the console nor any process's output is a file: each is a bounded ring.

pub mod cmdline;
pub mod resize;
mod validate;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::accel::{detect_accel, resolve_accel, Accel, AccelChoice};
use crate::config::{AgentEndpoint, AgentTransport, GuestMemory, SharedFs, VmConfig, VmSize};
use crate::console::{self, GuestConsole};
use crate::error::{Error, Result};
use crate::process::{wait_exit, ManagedChild, ProcessOutput, ProcessRole, VmExit, VmProcess};
use crate::qmp::{QmpClient, QmpError};
use crate::{Hypervisor, SavedVm, Snapshot, Vm, VmStatus};
use cmdline::VmPaths;
use validate::validate;

/// How long helpers get to create their vhost-user socket. Generous: the host may be busy compiling.
const HELPER_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU gets to open its QMP socket and answer the handshake.
const QMP_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on every QMP command.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long loading a clone's state or saving a template's may take. Only device state moves (guest RAM
/// stays in the template's file), which takes milliseconds; the margin is for a loaded host.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU gets to exit after `quit` before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(10);
/// How long a helper gets after SIGTERM before SIGKILL.
const HELPER_GRACE: Duration = Duration::from_secs(2);
/// Lines of console / process output quoted in start errors.
const TAIL_LINES: usize = 20;
/// How long the readers get to take in what a process (or the guest, through QEMU) wrote before it exited, for
/// the error message.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// How often an attached VM's processes are looked at while waiting for them to end.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// The QEMU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qemu;

#[async_trait::async_trait]
impl Hypervisor for Qemu {
    fn vm(&self, config: VmConfig) -> Arc<dyn Vm> {
        Arc::new(QemuVm::new(config))
    }

    async fn attach(&self, saved: SavedVm) -> Result<Arc<dyn Vm>> {
        Ok(Arc::new(QemuVm::attach(saved).await?))
    }

    fn sockets(&self, work_dir: &Path) -> Vec<PathBuf> {
        VmPaths::new(work_dir).sockets().to_vec()
    }

    fn programs(&self, config: &VmConfig) -> Vec<PathBuf> {
        vec![config.qemu.path.clone()]
    }

    fn launch_shape(&self, config: &VmConfig) -> Vec<String> {
        let accel = resolve_accel(config.accel, &detect_accel()).unwrap_or(Accel::Tcg);
        // Whether the guest gets a TSC frequency changes the machine (see `cmdline`), not which one it gets.
        // Looked up as a launch does (measured at most once per host boot, then read from its file).
        cmdline::qemu_args(config, accel, tsc_hint(accel).map(|_| 0))
    }
}

/// The host TSC frequency a guest is told under `accel` (see `cmdline::kernel_params`): only under TCG.
fn tsc_hint(accel: Accel) -> Option<u32> {
    match accel {
        Accel::Tcg => crate::tsc::host_tsc_khz(),
        Accel::Kvm => None,
    }
}

/// A VM run by QEMU. See [`Vm`] for the lifecycle.
#[derive(Debug)]
pub struct QemuVm {
    config: VmConfig,
    paths: VmPaths,
    /// Fed by a task that drains QEMU's console socket; outlives QEMU.
    console: GuestConsole,
    /// Serialises prepare/start/stop; never held by wait/status/pause.
    lifecycle: tokio::sync::Mutex<()>,
    /// Serialises resizes, which pick free slots and device ids from what QEMU has.
    resizing: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    phase: Phase,
    plan: Option<Plan>,
    qemu: Option<Arc<ManagedChild>>,
    helpers: Vec<Arc<ManagedChild>>,
    qmp: Option<Arc<QmpClient>>,
    /// The processes of a VM another process started ([`QemuVm::attach`]): not our children, so they are
    /// watched and ended by PID, each checked to still be the process that was started.
    adopted: Vec<VmProcess>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Created,
    Prepared,
    Running,
    Stopped,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Created => "not prepared",
            Phase::Prepared => "not started",
            Phase::Running => "running",
            Phase::Stopped => "stopped",
        }
    }
}

/// Everything `start` needs, computed by `prepare`.
#[derive(Debug, Clone)]
struct Plan {
    accel: Accel,
    qemu_args: Vec<String>,
    /// The tap fds, inherited by QEMU after the console socket, in `qemu_args`' order.
    tap_fds: Vec<Arc<OwnedFd>>,
    helpers: Vec<HelperPlan>,
}

#[derive(Debug, Clone)]
struct HelperPlan {
    role: ProcessRole,
    program: PathBuf,
    args: Vec<String>,
    socket: PathBuf,
}

impl QemuVm {
    pub fn new(config: VmConfig) -> Self {
        let paths = VmPaths::new(&config.work_dir);
        Self {
            config,
            paths,
            console: GuestConsole::new(),
            lifecycle: tokio::sync::Mutex::new(()),
            resizing: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Finds a running VM again from what [`Vm::saved`] recorded, through its QMP socket. QEMU serves one QMP
    /// client at a time, so this succeeds only once the process that started the VM let go of it (exited).
    pub async fn attach(saved: SavedVm) -> Result<Self> {
        let vm = QemuVm::new(saved.config);
        match saved.processes.first() {
            Some(vmm) if vmm.role == ProcessRole::Vmm && vmm.is_running() => {}
            _ => return Err(Error::InvalidState { op: "attach to", state: "not running" }),
        }
        let qmp = QmpClient::connect(&vm.paths.qmp_socket(), QMP_COMMAND_TIMEOUT).await?;
        {
            let mut state = vm.state();
            state.phase = Phase::Running;
            state.qmp = Some(Arc::new(qmp));
            state.adopted = saved.processes;
        }
        tracing::info!(vm = %vm.config.name, "attached to a running VM");
        Ok(vm)
    }

    /// The accelerator chosen by `prepare`.
    pub fn accel(&self) -> Option<Accel> {
        self.state().plan.as_ref().map(|plan| plan.accel)
    }

    /// QEMU's full argument list (without the program), once prepared.
    pub fn qemu_args(&self) -> Option<Vec<String>> {
        self.state().plan.as_ref().map(|plan| plan.qemu_args.clone())
    }

    /// QEMU's own stdout and stderr, once it was started (also after it exited).
    pub fn qemu_output(&self) -> Option<ProcessOutput> {
        self.state().qemu.as_ref().map(|qemu| qemu.output().clone())
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.paths.qmp_socket()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep going rather than cascade.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn qmp(&self, op: &'static str) -> Result<Arc<QmpClient>> {
        let state = self.state();
        match (state.phase, &state.qmp) {
            (Phase::Running, Some(qmp)) => Ok(qmp.clone()),
            (phase, _) => Err(Error::InvalidState { op, state: phase.name() }),
        }
    }

    async fn prepare_locked(&self) -> Result<()> {
        let phase = self.state().phase;
        if phase != Phase::Created {
            return Err(Error::InvalidState { op: "prepare", state: phase.name() });
        }
        validate(&self.config)?;
        let report = detect_accel();
        let accel = resolve_accel(self.config.accel, &report)?;
        if self.config.accel == AccelChoice::Auto && accel == Accel::Tcg {
            tracing::info!(reason = %report.kvm.reason, "KVM not usable, VM runs under TCG");
        }
        let tsc_khz = tokio::task::spawn_blocking(move || tsc_hint(accel)).await.unwrap_or(None);
        create_private_dir(&self.config.work_dir)?;
        remove_runtime_files(&self.paths);

        let plan = Plan {
            accel,
            qemu_args: cmdline::qemu_args(&self.config, accel, tsc_khz),
            tap_fds: self.config.net_devices.iter().filter_map(|net| net.fd.clone()).collect(),
            helpers: helper_plans(&self.config, &self.paths),
        };
        let mut state = self.state();
        state.plan = Some(plan);
        state.phase = Phase::Prepared;
        Ok(())
    }

    async fn start_locked(&self) -> Result<()> {
        if self.state().phase == Phase::Created {
            self.prepare_locked().await?;
        }
        let plan = {
            let state = self.state();
            match (&state.phase, &state.plan) {
                (Phase::Prepared, Some(plan)) => plan.clone(),
                (phase, _) => return Err(Error::InvalidState { op: "start", state: phase.name() }),
            }
        };
        let mut spawned = Spawned::default();
        match self.launch(&plan, &mut spawned).await {
            Ok((qemu, qmp)) => {
                spawned.qemu = None;
                let helpers = std::mem::take(&mut spawned.helpers);
                reap_helpers_after_qemu(&qemu, &helpers);
                let mut state = self.state();
                state.qemu = Some(qemu);
                state.helpers = helpers;
                state.qmp = Some(Arc::new(qmp));
                state.phase = Phase::Running;
                Ok(())
            }
            Err(e) => {
                spawned.kill_all().await;
                remove_runtime_files(&self.paths);
                Err(e)
            }
        }
    }

    /// Starts helpers, then QEMU, then connects QMP. Records every process in `spawned` as soon as it exists so
    /// the caller can kill it on failure.
    async fn launch(&self, plan: &Plan, spawned: &mut Spawned) -> Result<(Arc<ManagedChild>, QmpClient)> {
        for helper in &plan.helpers {
            let child = ManagedChild::spawn(helper.role, &helper.program, &helper.args, &[], 0, false)?;
            spawned.helpers.push(Arc::new(child));
        }
        // Both helpers are already running; wait for their sockets together.
        let waits = plan.helpers.iter().zip(&spawned.helpers).map(|(helper, child)| wait_for_socket(child, helper));
        for result in join_all(waits).await {
            result?;
        }

        let (console, qemu_console) =
            std::os::unix::net::UnixStream::pair().map_err(Error::io("cannot create the console socket pair"))?;
        let mut qemu_fds = vec![Arc::new(OwnedFd::from(qemu_console))];
        qemu_fds.extend(plan.tap_fds.iter().cloned());
        let qemu = ManagedChild::spawn(
            ProcessRole::Vmm,
            &self.config.qemu.path,
            &plan.qemu_args,
            &qemu_fds,
            cmdline::CONSOLE_FD,
            // Under TCG, QEMU asks for huge pages for its translation buffer, so each region of it it starts
            // costs 2 MiB however little code lands there; 4 KiB pages keep only what is used (about 3 MiB
            // less per VM cloned from a template). Under KVM the guest RAM keeps its huge pages.
            plan.accel == Accel::Tcg,
        )?;
        let qemu = spawned.qemu.insert(Arc::new(qemu)).clone();
        // Only QEMU may hold its end: the reader sees end-of-file when QEMU is gone.
        drop(qemu_fds);
        drain_console(console, self.console.clone())?;
        tracing::info!(vm = %self.config.name, pid = qemu.info().pid, accel = %plan.accel, "QEMU started");
        let qmp = self.connect_qmp(&qemu, &spawned.helpers).await?;
        if let GuestMemory::Clone { state, .. } = &self.config.memory {
            self.load_state(&qemu, &qmp, state)
                .await
                .map_err(|cause| Error::StateLoad { state: state.clone(), cause: Box::new(cause) })?;
        }
        Ok((qemu, qmp))
    }

    /// Loads a clone's device state and resumes the guest. Guest RAM is not in the stream (`x-ignore-shared`):
    /// it is the template's file, already mapped. The template was saved paused, so the clone loads paused.
    async fn load_state(&self, qemu: &ManagedChild, qmp: &QmpClient, state: &Path) -> Result<()> {
        qmp.execute("migrate-set-capabilities", Some(ignore_shared())).await?;
        let file = File::options()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(state)
            .map_err(Error::io(format!("cannot open the template state {}", state.display())))?;
        hand_over_migration_fd(qmp, file).await?;
        qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": cmdline::migration_uri() }))).await?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            if let Some(status) = qemu.exited() {
                return Err(self.qemu_exited(qemu, status).await);
            }
            match qmp.query_status().await {
                Ok(s) if s.status == "running" => return Ok(()),
                Ok(s) if s.status == "paused" => {
                    qmp.cont().await?;
                    return Ok(());
                }
                Ok(s) if s.status != "inmigrate" => {
                    return Err(Error::Migration(format!("loading {} left the VM {}", state.display(), s.status)))
                }
                Ok(_) => {}
                // QEMU exits when the state does not load; that explains more than the broken socket.
                Err(e) => match qemu.wait_timeout(Duration::from_millis(500)).await {
                    Some(status) => return Err(self.qemu_exited(qemu, status).await),
                    None => return Err(e.into()),
                },
            }
            if Instant::now() >= deadline {
                return Err(Error::Migration(format!("loading {} took over {MIGRATION_TIMEOUT:?}", state.display())));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// See [`Snapshot::save`].
    async fn save_template(&self, state: &Path) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        if !matches!(self.config.memory, GuestMemory::Template { .. }) {
            return Err(Error::InvalidConfig("only a VM with template memory can be saved as a template".into()));
        }
        let qmp = self.qmp("save")?;
        qmp.stop().await?;
        qmp.execute("migrate-set-capabilities", Some(ignore_shared())).await?;
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(state)
            .map_err(Error::io(format!("cannot create the template state {}", state.display())))?;
        hand_over_migration_fd(&qmp, file).await?;
        qmp.execute("migrate", Some(serde_json::json!({ "uri": cmdline::migration_uri() }))).await?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            match info.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = info.get("error-desc").and_then(|s| s.as_str()).unwrap_or("no reason given");
                    return Err(Error::Migration(format!("saving to {} failed: {why}", state.display())));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Migration(format!("saving to {} took over {MIGRATION_TIMEOUT:?}", state.display())));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn connect_qmp(&self, qemu: &ManagedChild, helpers: &[Arc<ManagedChild>]) -> Result<QmpClient> {
        let socket = self.paths.qmp_socket();
        let deadline = Instant::now() + QMP_READY_TIMEOUT;
        loop {
            if let Some(status) = qemu.exited() {
                return Err(self.qemu_exited(qemu, status).await);
            }
            for helper in helpers {
                if let Some(status) = helper.exited() {
                    return Err(helper_exited(helper, status).await);
                }
            }
            if is_socket(&socket) {
                match QmpClient::connect(&socket, QMP_COMMAND_TIMEOUT).await {
                    Ok(qmp) => return Ok(qmp),
                    // QEMU binds before it listens; keep trying until the deadline.
                    Err(QmpError::Connect { .. }) if Instant::now() < deadline => {}
                    Err(e) => {
                        // QEMU dying mid-handshake explains more than the broken socket does.
                        if let Some(status) = qemu.wait_timeout(Duration::from_millis(500)).await {
                            return Err(self.qemu_exited(qemu, status).await);
                        }
                        return Err(e.into());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::SocketTimeout {
                    role: ProcessRole::Vmm,
                    socket,
                    timeout: QMP_READY_TIMEOUT,
                    tail: qemu.output().tail(TAIL_LINES),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn qemu_exited(&self, qemu: &ManagedChild, status: VmExit) -> Error {
        // QEMU is gone; let the readers take in its last words and the guest's before quoting them.
        let drained = futures_util::future::join(self.console.closed(), qemu.output().closed());
        let _ = tokio::time::timeout(OUTPUT_DRAIN, drained).await;
        Error::VmmExited {
            vmm: "QEMU",
            status,
            vmm_tail: qemu.output().tail(TAIL_LINES),
            console_tail: self.console.tail(TAIL_LINES),
        }
    }

    async fn stop_locked(&self) -> Result<()> {
        let (phase, qemu, helpers, qmp) = {
            let state = self.state();
            (state.phase, state.qemu.clone(), state.helpers.clone(), state.qmp.clone())
        };
        if phase == Phase::Stopped {
            return Ok(());
        }
        if let Some(qemu) = &qemu {
            if qemu.exited().is_none() {
                if let Some(qmp) = &qmp {
                    if let Err(e) = qmp.quit().await {
                        tracing::warn!(vm = %self.config.name, error = ?e, "QMP quit failed, killing QEMU");
                    }
                }
                if qemu.wait_timeout(QUIT_GRACE).await.is_none() {
                    tracing::warn!(vm = %self.config.name, "QEMU ignored quit, killing it");
                }
                qemu.kill().await;
            }
        }
        // After QEMU: a helper killed first would make QEMU see its vhost-user peer vanish.
        join_all(helpers.iter().map(|h| h.terminate(HELPER_GRACE))).await;
        let adopted = std::mem::take(&mut self.state().adopted);
        if let Some(vmm) = adopted.first().filter(|vmm| vmm.is_running()) {
            if let Some(qmp) = &qmp {
                if let Err(e) = qmp.quit().await {
                    tracing::warn!(vm = %self.config.name, error = ?e, "QMP quit failed, killing QEMU");
                }
            }
            crate::process::wait_for_exit(vmm, Some(QUIT_GRACE), ADOPTED_POLL).await;
        }
        if !adopted.is_empty() {
            // Kills what is left (QEMU first, then its helpers), each only if it is still the process started.
            crate::process::cleanup_vm(&adopted, &self.config.work_dir).await?;
        }

        {
            let mut state = self.state();
            state.phase = Phase::Stopped;
            state.qmp = None;
            state.helpers.clear();
        }
        if phase != Phase::Created {
            match std::fs::remove_dir_all(&self.config.work_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        context: format!("cannot remove VM work dir {}", self.config.work_dir.display()),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Snapshot for QemuVm {
    async fn save(&self, state: &Path) -> Result<()> {
        self.save_template(state).await
    }
}

#[async_trait::async_trait]
impl Vm for QemuVm {
    async fn prepare(&self) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        self.prepare_locked().await
    }

    async fn start(&self) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        self.start_locked().await
    }

    async fn stop(&self) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        self.stop_locked().await
    }

    async fn wait(&self) -> Result<VmExit> {
        let (exit, adopted) = {
            let state = self.state();
            match (&state.qemu, state.adopted.first()) {
                (Some(qemu), _) => (Some(qemu.exit_watch()), None),
                (None, Some(vmm)) => (None, Some(vmm.clone())),
                (None, None) => return Err(Error::InvalidState { op: "wait for", state: state.phase.name() }),
            }
        };
        if let Some(exit) = exit {
            return Ok(wait_exit(exit).await);
        }
        // Attached: QEMU is not our child, so its exit status is its parent's to read. Watch for it to be gone.
        if let Some(vmm) = &adopted {
            crate::process::wait_for_exit(vmm, None, ADOPTED_POLL).await;
        }
        Ok(VmExit { code: None, signal: None })
    }

    async fn pause(&self) -> Result<()> {
        Ok(self.qmp("pause")?.stop().await?)
    }

    async fn resume(&self) -> Result<()> {
        Ok(self.qmp("resume")?.cont().await?)
    }

    async fn status(&self) -> Result<VmStatus> {
        let (phase, qemu, qmp, adopted_gone) = {
            let state = self.state();
            let adopted_gone = state.adopted.first().is_some_and(|vmm| !vmm.is_running());
            (state.phase, state.qemu.clone(), state.qmp.clone(), adopted_gone)
        };
        let mut exited = qemu.as_ref().and_then(|q| q.exited());
        if adopted_gone {
            exited = Some(VmExit { code: None, signal: None });
        }
        match (phase, exited, qmp) {
            (Phase::Created, ..) => Ok(VmStatus::Created),
            (Phase::Prepared, ..) => Ok(VmStatus::Prepared),
            (Phase::Stopped, ..) | (_, Some(_), _) | (_, _, None) => Ok(VmStatus::Stopped(exited)),
            (Phase::Running, None, Some(qmp)) => {
                let status = qmp.query_status().await?;
                Ok(match status.status.as_str() {
                    "running" => VmStatus::Running,
                    "paused" => VmStatus::Paused,
                    _ => VmStatus::Other(status.status),
                })
            }
        }
    }

    fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        match self.config.agent.as_ref()? {
            AgentTransport::HybridVsock => Some(AgentEndpoint::HybridVsock(self.paths.agent_socket())),
            AgentTransport::Serial { .. } => Some(AgentEndpoint::Serial(self.paths.agent_serial_socket())),
        }
    }

    fn saved(&self) -> SavedVm {
        SavedVm { config: self.config.clone(), processes: self.pids() }
    }

    fn snapshot(&self) -> Option<&dyn Snapshot> {
        Some(self)
    }

    fn release(&self) {
        // QEMU serves one QMP client at a time: the next owner's attach needs this connection gone.
        self.state().qmp = None;
    }

    fn pids(&self) -> Vec<VmProcess> {
        let state = self.state();
        let adopted = state.adopted.iter().filter(|p| p.is_running()).cloned();
        let children = state.qemu.iter().chain(&state.helpers).filter(|child| child.exited().is_none());
        children.map(|child| child.info().clone()).chain(adopted).collect()
    }

    fn console(&self) -> &GuestConsole {
        &self.console
    }

    async fn size(&self) -> Result<VmSize> {
        resize::current_size(&*self.qmp("query the size of")?).await
    }

    async fn resize(&self, want: VmSize) -> Result<VmSize> {
        let _resizing = self.resizing.lock().await;
        resize::resize(&*self.qmp("resize")?, &self.config, want).await
    }

    fn can_resize(&self) -> bool {
        resize::Growth::of(&self.config).any()
    }
}

impl Drop for QemuVm {
    /// The VM outlives this handle: it is stopped explicitly, by this process or by another from [`Vm::saved`].
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.phase == Phase::Running && state.qemu.as_ref().is_some_and(|q| q.exited().is_none()) {
            tracing::debug!(vm = %self.config.name, "VM handle dropped; the VM keeps running");
        }
    }
}

/// Processes started so far by one `start` attempt.
#[derive(Debug, Default)]
struct Spawned {
    qemu: Option<Arc<ManagedChild>>,
    helpers: Vec<Arc<ManagedChild>>,
}

impl Spawned {
    /// QEMU first, then the helpers; returns once all are reaped.
    async fn kill_all(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            qemu.kill().await;
        }
        join_all(self.helpers.drain(..).map(|h| async move { h.kill().await })).await;
    }
}

/// Gives QEMU the migration stream's file as [`cmdline::MIGRATION_FD_NAME`]; QEMU closes it when the migration
/// ends, and our copy is closed on return.
async fn hand_over_migration_fd(qmp: &QmpClient, file: File) -> Result<()> {
    let arguments = serde_json::json!({ "fdname": cmdline::MIGRATION_FD_NAME });
    qmp.execute_with_fd("getfd", Some(arguments), file.as_fd()).await?;
    Ok(())
}

/// Reads QEMU's console socket into `console` until QEMU closes it, so QEMU never blocks on a full socket.
fn drain_console(socket: std::os::unix::net::UnixStream, console: GuestConsole) -> Result<()> {
    socket.set_nonblocking(true).map_err(Error::io("cannot make the console socket non-blocking"))?;
    let socket = tokio::net::UnixStream::from_std(socket).map_err(Error::io("cannot register the console socket"))?;
    console::drain(socket, console, "the guest console".into());
    Ok(())
}

/// Guest RAM is shared with the template's file, so migration skips it.
fn ignore_shared() -> serde_json::Value {
    serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// When QEMU exits on its own (guest power-off, crash), the helpers have nothing left to serve.
fn reap_helpers_after_qemu(qemu: &ManagedChild, helpers: &[Arc<ManagedChild>]) {
    if helpers.is_empty() {
        return;
    }
    let exit = qemu.exit_watch();
    let helpers = helpers.to_vec();
    tokio::spawn(async move {
        wait_exit(exit).await;
        join_all(helpers.iter().map(|h| h.terminate(HELPER_GRACE))).await;
    });
}

fn helper_plans(config: &VmConfig, paths: &VmPaths) -> Vec<HelperPlan> {
    let mut helpers = Vec::new();
    if let (Some(AgentTransport::HybridVsock), Some(daemon)) = (&config.agent, &config.qemu.vsock_daemon) {
        helpers.push(HelperPlan {
            role: ProcessRole::VsockDaemon,
            program: daemon.clone(),
            args: cmdline::vsock_daemon_args(paths),
            socket: paths.vhost_vsock_socket(),
        });
    }
    if let SharedFs::VirtioFs { daemon, extra_args, shared_dir } = &config.shared_fs {
        helpers.push(HelperPlan {
            role: ProcessRole::Virtiofsd,
            program: daemon.clone(),
            args: cmdline::virtiofsd_args(paths, shared_dir, extra_args),
            socket: paths.virtiofsd_socket(),
        });
    }
    helpers
}

async fn wait_for_socket(child: &ManagedChild, helper: &HelperPlan) -> Result<()> {
    let deadline = Instant::now() + HELPER_SOCKET_TIMEOUT;
    loop {
        if is_socket(&helper.socket) {
            return Ok(());
        }
        if let Some(status) = child.exited() {
            return Err(helper_exited(child, status).await);
        }
        if Instant::now() >= deadline {
            return Err(Error::SocketTimeout {
                role: helper.role,
                socket: helper.socket.clone(),
                timeout: HELPER_SOCKET_TIMEOUT,
                tail: child.output().tail(TAIL_LINES),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn helper_exited(child: &ManagedChild, status: VmExit) -> Error {
    // The helper is gone; let the reader take in its last words before quoting them.
    let _ = tokio::time::timeout(OUTPUT_DRAIN, child.output().closed()).await;
    Error::HelperExited { role: child.role(), status, tail: child.output().tail(TAIL_LINES) }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn remove_runtime_files(paths: &VmPaths) {
    for socket in paths.runtime_files() {
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %e, "cannot remove socket")
            }
        }
    }
}

/// The work dir holds the agent socket: root only.
fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create VM work dir {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(format!("cannot restrict permissions of {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"").expect("fake kernel");
        let mut config = VmConfig::new("t", kernel, dir.join("vm"));
        config.qemu.path = "/bin/true".into();
        config.accel = AccelChoice::Tcg;
        config
    }

    #[tokio::test]
    async fn prepare_creates_private_work_dir_and_stop_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = QemuVm::new(config(dir.path()));
        assert_eq!(vm.status().await.expect("status"), VmStatus::Created);
        vm.prepare().await.expect("prepare");
        assert_eq!(vm.accel(), Some(Accel::Tcg));
        let mode = std::fs::metadata(dir.path().join("vm")).expect("work dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(vm.status().await.expect("status"), VmStatus::Prepared);
        assert!(vm.pids().is_empty());
        assert!(matches!(vm.pause().await, Err(Error::InvalidState { .. })));
        vm.stop().await.expect("stop");
        assert!(!dir.path().join("vm").exists());
        vm.stop().await.expect("stop is idempotent");
    }

    #[tokio::test]
    async fn qemu_exiting_at_start_is_reported_and_cleaned_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        // `/bin/false` stands in for a QEMU that rejects its command line.
        let mut c = config(dir.path());
        c.qemu.path = "/bin/false".into();
        let vm = QemuVm::new(c);
        let err = vm.start().await.expect_err("start must fail");
        assert!(matches!(err, Error::VmmExited { .. }), "{err}");
        assert!(err.to_string().contains("exit code 1"), "{err}");
        assert!(vm.pids().is_empty());
        assert!(!dir.path().join("vm/qmp.sock").exists());
        vm.stop().await.expect("stop after failed start");
    }

    /// A VM whose "QEMU" is the shell script `script`.
    fn fake_qemu_vm(dir: &Path, script: &str) -> QemuVm {
        let fake = dir.join("fake-qemu");
        std::fs::write(&fake, script).expect("script");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut c = config(dir);
        c.qemu.path = fake;
        QemuVm::new(c)
    }

    #[tokio::test]
    async fn qemu_output_reaches_the_start_error_after_it_exited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = fake_qemu_vm(
            dir.path(),
            "#!/bin/sh\necho 'qemu: -sandbox on: unsupported' >&2\necho 'on stdout too'\nexit 1\n",
        );
        let err = vm.start().await.expect_err("start must fail").to_string();
        assert!(
            err.contains("QEMU exited during VM start (exit code 1); last lines of its output:\nqemu: -sandbox on: unsupported\non stdout too\n"),
            "{err}"
        );
        let files: Vec<_> =
            std::fs::read_dir(dir.path().join("vm")).expect("ls").flatten().map(|e| e.file_name()).collect();
        assert!(files.is_empty(), "the VM left files: {files:?}");
        vm.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn console_output_reaches_the_ring_and_the_start_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Stands in for a QEMU whose guest wrote to the console and died: it writes to the inherited console
        // socket (fd 3) and exits.
        let vm = fake_qemu_vm(
            dir.path(),
            "#!/bin/sh\nprintf 'Linux version 6.1\\r\\nKernel panic - not syncing' >&3\nexit 1\n",
        );
        let err = vm.start().await.expect_err("start must fail").to_string();
        assert!(err.contains("last lines of the console:\nLinux version 6.1\nKernel panic - not syncing"), "{err}");
        assert_eq!(vm.console().tail(1), "Kernel panic - not syncing");
        assert!(!dir.path().join("vm/console.log").exists());
        vm.stop().await.expect("stop");
        assert_eq!(vm.console().tail(5), "Linux version 6.1\nKernel panic - not syncing", "the tail outlives the VM");
    }

    #[tokio::test]
    async fn helper_exiting_early_is_reported_with_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let daemon = dir.path().join("fake-vsock-daemon");
        std::fs::write(&daemon, "#!/bin/sh\necho 'cannot bind: address in use' >&2\nexit 3\n").expect("script");
        std::fs::set_permissions(&daemon, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut c = config(dir.path());
        c.agent = Some(AgentTransport::HybridVsock);
        c.qemu.vsock_daemon = Some(daemon);
        let vm = QemuVm::new(c);
        let err = vm.start().await.expect_err("start must fail").to_string();
        assert!(
            err.contains("vhost-device-vsock exited during VM start (exit code 3); last lines of its output:\ncannot bind: address in use"),
            "{err}"
        );
        vm.stop().await.expect("stop");
    }
}
