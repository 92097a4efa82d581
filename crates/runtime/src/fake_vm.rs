//! [`FakeHypervisor`]: a VMM that starts nothing, so the sandbox lifecycle can be unit-tested unprivileged in
//! milliseconds. Its VMs report a serial agent endpoint that no one listens on; tests connect the agent through
//! [`crate::Host::agent_dialer`] (a [`crate::agent::fake::FakeAgent`]). The test decides when a VM fails to start
//! ([`FakeHypervisor::fail_starts`]) and when a running one dies ([`FakeVm::die`]). Its VMs grow on `resize`
//! (recording each one) unless told to refuse ([`FakeVm::refuse_resizes`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hypervisor::{
    AgentEndpoint, GuestConsole, Hypervisor, ProcessRole, SavedVm, Vm, VmConfig, VmExit, VmProcess, VmSize, VmStatus,
};
use tokio::sync::watch;

/// A PID no process has (above the kernel's maximum), so nothing ever signals a real process for a fake VM.
const FAKE_PID: u32 = 4_194_305;

/// Makes [`FakeVm`]s and remembers them for the test.
#[derive(Debug, Default)]
pub struct FakeHypervisor {
    vms: Mutex<Vec<Arc<FakeVm>>>,
    fail_starts: Mutex<Option<String>>,
}

impl FakeHypervisor {
    /// Every VM made so far, oldest first.
    pub fn vms(&self) -> Vec<Arc<FakeVm>> {
        lock(&self.vms).clone()
    }

    /// The next VMs fail to start with `reason` (or start again after `None`).
    pub fn fail_starts(&self, reason: Option<&str>) {
        *lock(&self.fail_starts) = reason.map(str::to_string);
    }
}

#[async_trait::async_trait]
impl Hypervisor for FakeHypervisor {
    fn vm(&self, config: VmConfig) -> Arc<dyn Vm> {
        let vm = Arc::new(FakeVm::new(config, lock(&self.fail_starts).clone()));
        lock(&self.vms).push(vm.clone());
        vm
    }

    async fn attach(&self, saved: SavedVm) -> hypervisor::Result<Arc<dyn Vm>> {
        let vm = self
            .vms()
            .into_iter()
            .find(|vm| vm.config.name == saved.config.name && vm.exit.borrow().is_none() && vm.running())
            .ok_or(hypervisor::Error::InvalidState { op: "attach to", state: "not running" })?;
        Ok(vm)
    }

    fn sockets(&self, work_dir: &Path) -> Vec<PathBuf> {
        vec![work_dir.join("agent.sock")]
    }

    fn programs(&self, _config: &VmConfig) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// A VM that runs nothing: its state is what the lifecycle calls made it.
#[derive(Debug)]
pub struct FakeVm {
    config: VmConfig,
    fail_start: Option<String>,
    status: Mutex<VmStatus>,
    exit: watch::Sender<Option<VmExit>>,
    console: GuestConsole,
    size: Mutex<VmSize>,
    resizes: Mutex<Vec<VmSize>>,
    refuse_resizes: Mutex<Option<String>>,
}

impl FakeVm {
    fn new(config: VmConfig, fail_start: Option<String>) -> Self {
        FakeVm {
            fail_start,
            status: Mutex::new(VmStatus::Created),
            exit: watch::channel(None).0,
            console: GuestConsole::new(),
            size: Mutex::new(VmSize { vcpus: config.vcpus, memory_mib: config.memory_mib }),
            resizes: Mutex::default(),
            refuse_resizes: Mutex::default(),
            config,
        }
    }

    /// The size the VM has now: the config's, grown by every resize so far.
    pub fn current_size(&self) -> VmSize {
        *lock(&self.size)
    }

    /// Every `want` passed to [`Vm::resize`], oldest first, refused ones included.
    pub fn resizes(&self) -> Vec<VmSize> {
        lock(&self.resizes).clone()
    }

    /// Later resizes that would grow the VM fail with [`hypervisor::Error::Resize`] and `reason` (a no-op still
    /// succeeds, as on QEMU), and [`Vm::can_resize`] says no; `None` lets them grow it again.
    pub fn refuse_resizes(&self, reason: Option<&str>) {
        *lock(&self.refuse_resizes) = reason.map(str::to_string);
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn running(&self) -> bool {
        matches!(*lock(&self.status), VmStatus::Running | VmStatus::Paused)
    }

    pub fn stopped(&self) -> bool {
        matches!(*lock(&self.status), VmStatus::Stopped(_))
    }

    /// The VMM dies (a guest panic, QEMU killed): waiters see the exit.
    pub fn die(&self) {
        let exit = VmExit { code: None, signal: Some(9) };
        *lock(&self.status) = VmStatus::Stopped(Some(exit));
        self.exit.send_replace(Some(exit));
    }
}

#[async_trait::async_trait]
impl Vm for FakeVm {
    async fn prepare(&self) -> hypervisor::Result<()> {
        let mut status = lock(&self.status);
        if *status == VmStatus::Created {
            *status = VmStatus::Prepared;
        }
        Ok(())
    }

    async fn start(&self) -> hypervisor::Result<()> {
        if let Some(reason) = &self.fail_start {
            return Err(hypervisor::Error::InvalidConfig(reason.clone()));
        }
        *lock(&self.status) = VmStatus::Running;
        Ok(())
    }

    async fn stop(&self) -> hypervisor::Result<()> {
        let mut status = lock(&self.status);
        if !matches!(*status, VmStatus::Stopped(_)) {
            let exit = VmExit { code: Some(0), signal: None };
            *status = VmStatus::Stopped(Some(exit));
            self.exit.send_replace(Some(exit));
        }
        Ok(())
    }

    async fn wait(&self) -> hypervisor::Result<VmExit> {
        let mut exit = self.exit.subscribe();
        let exit = exit.wait_for(Option::is_some).await.ok().and_then(|exit| *exit);
        Ok(exit.unwrap_or(VmExit { code: None, signal: None }))
    }

    async fn pause(&self) -> hypervisor::Result<()> {
        *lock(&self.status) = VmStatus::Paused;
        Ok(())
    }

    async fn resume(&self) -> hypervisor::Result<()> {
        *lock(&self.status) = VmStatus::Running;
        Ok(())
    }

    async fn status(&self) -> hypervisor::Result<VmStatus> {
        Ok(lock(&self.status).clone())
    }

    fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        Some(AgentEndpoint::Serial(self.config.work_dir.join("agent.sock")))
    }

    fn pids(&self) -> Vec<VmProcess> {
        if !self.running() {
            return Vec::new();
        }
        vec![VmProcess { role: ProcessRole::Vmm, pid: FAKE_PID, argv: vec!["fake-vmm".into()], start_time: None }]
    }

    fn saved(&self) -> SavedVm {
        SavedVm { config: self.config.clone(), processes: self.pids() }
    }

    fn console(&self) -> &GuestConsole {
        &self.console
    }

    async fn size(&self) -> hypervisor::Result<VmSize> {
        if !self.running() {
            return Err(hypervisor::Error::InvalidState { op: "query the size of", state: "not running" });
        }
        Ok(self.current_size())
    }

    async fn resize(&self, want: VmSize) -> hypervisor::Result<VmSize> {
        lock(&self.resizes).push(want);
        let now = self.size().await?;
        let grown = VmSize { vcpus: now.vcpus.max(want.vcpus), memory_mib: now.memory_mib.max(want.memory_mib) };
        if grown == now {
            return Ok(now);
        }
        if let Some(reason) = lock(&self.refuse_resizes).clone() {
            return Err(hypervisor::Error::Resize { reason });
        }
        *lock(&self.size) = grown;
        Ok(grown)
    }

    fn can_resize(&self) -> bool {
        lock(&self.refuse_resizes).is_none()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fake_vm_grows_never_shrinks_and_refuses_when_told() {
        let hv = FakeHypervisor::default();
        let vm = hv.vm(VmConfig::new("vm", "/k", "/w"));
        let fake = hv.vms()[0].clone();
        assert!(vm.size().await.is_err(), "not running yet");
        vm.start().await.expect("start");
        let booted = VmSize { vcpus: 1, memory_mib: 256 };
        assert_eq!(vm.size().await.expect("size"), booted);
        let grown = vm.resize(VmSize { vcpus: 2, memory_mib: 128 }).await.expect("resize");
        assert_eq!(grown, VmSize { vcpus: 2, memory_mib: 256 });

        fake.refuse_resizes(Some("microvm cannot hot-plug"));
        assert!(!vm.can_resize());
        assert_eq!(vm.resize(booted).await.expect("a no-op still works"), grown);
        let err = vm.resize(VmSize { vcpus: 3, memory_mib: 256 }).await.expect_err("refused");
        assert_eq!(err.to_string(), "cannot grow the VM: microvm cannot hot-plug");
        assert_eq!(fake.current_size(), grown);
        assert_eq!(fake.resizes().len(), 3);
        fake.refuse_resizes(None);
        assert!(vm.can_resize());
    }
}
