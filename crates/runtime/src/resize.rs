//! Growing a running sandbox's VM when its containers' limits need more than it has: hot-plug on the host
//! (q35), online in the guest, then the pod's host cgroup follows. The VM never shrinks below what it has; a
//! container that goes away leaves its share in the VM until the pod ends.

use hypervisor::{Vm, VmSize};

use crate::agent::{AgentClient, AgentError};
use crate::lifecycle::lock;
use crate::resources::{Limits, Size};
use crate::sandbox::Sandbox;

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error(
        "the VM has {have} and its containers' limits need {need}; runtime.static_sandbox_resource_mgmt = true \
         sizes it only when it starts"
    )]
    Static { have: Size, need: Size },
    #[error("grow the VM from {have} to {need}")]
    Vm {
        have: Size,
        need: Size,
        #[source]
        source: hypervisor::Error,
    },
    #[error("online the hot-plugged CPUs and memory in the guest")]
    Online(#[source] AgentError),
}

/// Hot-plugs CPUs and memory until the VM (now `have`) holds `want`, and has the guest online them. Returns the
/// new size.
pub(crate) async fn grow(vm: &dyn Vm, agent: &AgentClient, have: Size, want: Size) -> Result<Size, ResizeError> {
    let grown = vm
        .resize(VmSize { vcpus: want.vcpus, memory_mib: want.memory_mib })
        .await
        .map_err(|source| ResizeError::Vm { have, need: want, source })?;
    agent.online_cpu_mem(grown.vcpus).await.map_err(ResizeError::Online)?;
    Ok(Size { vcpus: grown.vcpus, memory_mib: grown.memory_mib })
}

impl Sandbox {
    /// Makes the VM big enough for its containers' limits, counting container `id` (new, or updated) at
    /// `limits`; the pod's host cgroup follows the new size. A VM that cannot grow (microvm, static sizing)
    /// still takes limits that fit in it without the guest's own share (`default_memory`, `default_vcpus`),
    /// and refuses, with the reason, limits beyond its size. A sandbox started before sizing was recorded is
    /// left as it is.
    pub(crate) async fn fit(&self, id: &str, limits: Limits) -> Result<(), ResizeError> {
        let _one_at_a_time = self.resize_lock.lock().await;
        let (sizing, have, static_resources, cgroups) = {
            let base = lock(&self.persister.base);
            (base.sizing, base.vm_size, base.static_resources, base.host_cgroups.clone())
        };
        let (Some(sizing), Some(have)) = (sizing, have) else {
            return Ok(());
        };
        let others: Vec<Limits> =
            self.containers().iter().filter(|(other, _)| other.as_str() != id).map(|(_, c)| c.limits).collect();
        let workload = sizing.workload(others.into_iter().chain([limits]));
        let need = sizing.target(workload);
        // Without room to grow, the limits still fit when the VM holds them without the guest's own share.
        let fits =
            u64::from(have.vcpus) * 1000 >= workload.milli_cpus && u64::from(have.memory_mib) >= workload.memory_mib;
        let fixed = static_resources || !self.vm().can_resize();
        let size = if have.covers(&need) {
            have
        } else if fixed && fits {
            tracing::info!(sandbox = %self.id(), %have, %need, "the VM cannot grow; the limits fit in it, leaving the guest less of its own");
            have
        } else if static_resources {
            return Err(ResizeError::Static { have, need });
        } else {
            let want = Size { vcpus: have.vcpus.max(need.vcpus), memory_mib: have.memory_mib.max(need.memory_mib) };
            let size = grow(self.vm(), self.agent(), have, want).await?;
            tracing::info!(sandbox = %self.id(), from = %have, to = %size, "VM grown");
            if let Err(e) = cgroups.move_vcpus(self.vmm_pid()) {
                tracing::warn!(sandbox = %self.id(), error = %crate::error_chain(&e), "placing new vCPU threads");
            }
            size
        };
        if let Err(e) = cgroups.limit(size, workload) {
            tracing::warn!(sandbox = %self.id(), error = %e, "setting the pod's host cgroup limits");
        }
        lock(&self.persister.base).vm_size = Some(size);
        self.persister.save();
        Ok(())
    }
}
