//! Which host cgroup each process of a sandbox lives in (`runtime.sandbox_cgroup_only`), and the limits the
//! pod's cgroup gets from the VM's size.
//!
//! - `true`: the shim joins the pod's cgroup (the sandbox container's `cgroupsPath`) before the VM starts, so
//!   QEMU, virtiofsd and the vsock helper are born there.
//! - `false` (Kata's default): the shim joins `kata_overhead/<sandbox>`, where the helpers are born; the
//!   vCPU threads then move to the pod's cgroup. cgroup v2 keeps a process's threads in one (domain) cgroup, so
//!   there all of QEMU moves; the helpers and the shim stay in `kata_overhead`.
//!
//! Everything created is recorded in the sandbox state before anything joins it, and [`HostCgroups::release`]
//! (run by [`crate::state::cleanup`] on every path) puts the shim back where it was and removes it all.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host_cgroup::{self, CgroupLimits, HostCgroup, CGROUP_ROOT, OVERHEAD_PARENT};
use crate::resources::{Limits, Size};

/// What the VMM, its helpers and the shim use besides guest memory, in the pod's cgroup's memory limit: the
/// TCG translation buffer (64 MiB by default), QEMU's own heap, virtiofsd, the vsock helper and the shim.
/// The benchmark's idle pod stays well below it (docs/resources.md).
pub const HOST_OVERHEAD_MIB: u64 = 256;

/// The CFS period the pod's CPU quota is expressed in, microseconds.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("the sandbox container's cgroupsPath")]
    Path(#[source] io::Error),
    #[error("create host cgroup {0}")]
    Create(PathBuf, #[source] io::Error),
    #[error("move {what} into host cgroup {cgroup}")]
    Join {
        what: String,
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The sandbox's host cgroups, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroups {
    /// The pod's cgroup: the sandbox container's `cgroupsPath`.
    pub sandbox: Option<HostCgroup>,
    /// `kata_overhead/<sandbox>`, when `sandbox_cgroup_only` is false.
    pub overhead: Option<HostCgroup>,
    /// The shim process that joined them, and where it was before (per hierarchy), to return it there.
    pub shim: Option<(u32, Vec<(PathBuf, PathBuf)>)>,
}

impl HostCgroups {
    /// Creates the cgroups for sandbox `id` and moves this process (the shim) into the one its helpers belong
    /// in. `record` is called with what exists before anything joins it, so a crash leaves a trail to clean.
    pub fn place(
        id: &str,
        cgroups_path: Option<&str>,
        sandbox_cgroup_only: bool,
        mut record: impl FnMut(&HostCgroups),
    ) -> Result<HostCgroups, PlacementError> {
        let root = Path::new(CGROUP_ROOT);
        let mut placed = HostCgroups::default();
        if let Some(path) = cgroups_path.filter(|p| !p.is_empty()) {
            let rel = host_cgroup::parse_cgroups_path(path).map_err(PlacementError::Path)?;
            let cgroup = HostCgroup::create(root, &rel).map_err(|e| PlacementError::Create(rel.clone(), e))?;
            placed.sandbox = Some(cgroup);
            record(&placed);
        }
        if !sandbox_cgroup_only {
            let rel = Path::new(OVERHEAD_PARENT).join(id);
            let cgroup = HostCgroup::create(root, &rel).map_err(|e| PlacementError::Create(rel.clone(), e))?;
            placed.overhead = Some(cgroup);
            record(&placed);
        }
        let home = match (&placed.overhead, &placed.sandbox) {
            (Some(overhead), _) => overhead,
            (None, Some(sandbox)) => sandbox,
            (None, None) => return Ok(placed),
        };
        let pid = std::process::id();
        let origin = host_cgroup::current(root, pid).unwrap_or_default();
        placed.shim = Some((pid, origin));
        record(&placed);
        home.add_process(pid).map_err(|source| PlacementError::Join {
            what: format!("the shim (pid {pid})"),
            cgroup: home.rel.clone(),
            source,
        })?;
        Ok(placed)
    }

    /// Moves processes started elsewhere (a VM from the cache) where they would have been born: the cgroup the
    /// shim joined.
    pub fn adopt(&self, pids: &[u32]) -> Result<(), PlacementError> {
        let Some(home) = self.overhead.as_ref().or(self.sandbox.as_ref()) else {
            return Ok(());
        };
        for &pid in pids {
            home.add_process(pid).map_err(|source| PlacementError::Join {
                what: format!("VM process {pid}"),
                cgroup: home.rel.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// With `sandbox_cgroup_only` false: moves the VMM's vCPU threads (v1) or the whole VMM (v2) into the pod's
    /// cgroup. Called after boot and after vCPUs were hot-plugged.
    pub fn move_vcpus(&self, vmm_pid: u32) -> Result<(), PlacementError> {
        let (Some(sandbox), Some(_)) = (&self.sandbox, &self.overhead) else {
            return Ok(());
        };
        let join_err = |what: String| {
            let cgroup = sandbox.rel.clone();
            move |source| PlacementError::Join { what, cgroup, source }
        };
        if host_cgroup::is_v2(&sandbox.root) {
            return sandbox.add_process(vmm_pid).map_err(join_err(format!("the VMM (pid {vmm_pid})")));
        }
        for tid in vcpu_threads(vmm_pid) {
            sandbox.add_thread(tid).map_err(join_err(format!("vCPU thread {tid} of the VMM")))?;
        }
        Ok(())
    }

    /// Sets the pod cgroup's limits from the VM's size: memory to the guest's plus [`HOST_OVERHEAD_MIB`] when the
    /// workload has a memory limit, CPU to the VM's vCPUs when it has a CPU limit. Without limits, none (as runc
    /// leaves a container without limits unlimited).
    pub fn limit(&self, size: Size, workload: Limits) -> io::Result<()> {
        let Some(sandbox) = &self.sandbox else {
            return Ok(());
        };
        let limits = CgroupLimits {
            memory_bytes: (workload.memory_mib > 0)
                .then(|| (u64::from(size.memory_mib) + HOST_OVERHEAD_MIB).saturating_mul(1024 * 1024)),
            cpu: (workload.milli_cpus > 0).then(|| (u64::from(size.vcpus) * CPU_PERIOD_US, CPU_PERIOD_US)),
        };
        sandbox.set_limits(limits)
    }

    /// Returns the shim (when it is this process) to where it was and removes every cgroup created for the
    /// sandbox. Only directories under the host's cgroup root are touched, whatever the state file says.
    pub fn release(&self) {
        if let Some((pid, origin)) = &self.shim {
            if *pid == std::process::id() {
                if let Err(e) = host_cgroup::restore(*pid, origin) {
                    tracing::warn!(error = %e, "returning the shim to its own cgroup");
                }
            }
        }
        for cgroup in [&self.overhead, &self.sandbox].into_iter().flatten() {
            if cgroup.root != Path::new(CGROUP_ROOT) {
                tracing::warn!(root = %cgroup.root.display(), "a sandbox cgroup outside the cgroup root on record; left alone");
                continue;
            }
            cgroup.remove();
        }
    }
}

/// The VMM's vCPU threads: QEMU names them `CPU <n>/TCG` or `CPU <n>/KVM` (with `-name ...,debug-threads=on`).
pub fn vcpu_threads(vmm_pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{vmm_pid}/task")) else {
        return Vec::new();
    };
    let mut tids: Vec<u32> = tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            (comm.starts_with("CPU ") && comm.contains('/')).then_some(tid)
        })
        .collect();
    tids.sort_unstable();
    tids
}
