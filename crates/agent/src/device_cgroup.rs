//! The container's device cgroup. On cgroup v2 it is an eBPF program (`BPF_PROG_TYPE_CGROUP_DEVICE`)
//! attached to the container's cgroup. libcgroups (feature `cgroupsv2_devices`) builds it from the spec's
//! `linux.resources.devices` followed by runc's default rules (mknod of any node; read/write of /dev/null,
//! zero, full, random, urandom, tty, console, ptmx, pts and net/tun), starting from deny-all, whenever
//! resources are applied: at create in libcontainer's intermediate process, on an update in the agent.
//!
//! Loading the program has side effects this module undoes: libcgroups raises RLIMIT_MEMLOCK to 128 MiB
//! in the process that loads it and leaves the program fds open.

use std::collections::HashSet;
use std::os::fd::RawFd;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxResources, PosixRlimitBuilder, PosixRlimitType, Process};

/// What `/proc/self/fd/N` links to for a BPF program fd.
const BPF_PROG_LINK: &str = "anon_inode:bpf-prog";

/// An update keeps the device rules the container was created with: the host may change limits but not the
/// container's device access, as with runc's `update`. It also keeps libcgroups from rebuilding the program
/// from an update that lists no devices (`ctr task update`), which would cut a privileged container down
/// to the default devices.
pub fn keep_created_rules(update: &mut LinuxResources, created: Option<&Vec<LinuxDeviceCgroup>>) {
    if update.devices().as_ref() != created {
        tracing::debug!(requested = ?update.devices(), kept = ?created, "an update does not change device rules");
    }
    update.set_devices(created.cloned());
}

/// Gives the container's init the RLIMIT_MEMLOCK it would have inherited from the agent (the kernel's
/// 8 MiB), unless the spec sets one. libcgroups raises the limit in libcontainer's intermediate process
/// before it loads the device program, and the container's init is cloned from that process; libcontainer
/// applies the spec's rlimits after that.
pub fn pin_memlock_limit(process: &mut Process) {
    let mut rlimits = process.rlimits().clone().unwrap_or_default();
    if rlimits.iter().any(|r| r.typ() == PosixRlimitType::RlimitMemlock) {
        return;
    }
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) else { return };
    let memlock = PosixRlimitBuilder::default().typ(PosixRlimitType::RlimitMemlock).soft(soft).hard(hard).build();
    let Ok(memlock) = memlock else { return };
    rlimits.push(memlock);
    process.set_rlimits(Some(rlimits));
}

/// Runs `apply`, a libcgroups apply in the agent's own process, and undoes what loading a device program
/// leaves behind there. libcgroups never closes the fd of the program it loads nor those of the programs it
/// queries and detaches, and each fd keeps its program in guest kernel memory: in the long-lived agent every
/// update would leak them. Only fds that were not open before and are BPF programs are closed; the agent
/// opens no BPF fds of its own, and container updates run on the single runtime thread. The raised
/// RLIMIT_MEMLOCK is put back, or every container and exec started after an update would inherit it.
pub fn without_leftovers<T>(apply: impl FnOnce() -> T) -> T {
    let before = bpf_prog_fds();
    let memlock = getrlimit(Resource::RLIMIT_MEMLOCK);
    let result = apply();
    let leaked: Vec<RawFd> = bpf_prog_fds().difference(&before).copied().collect();
    for fd in &leaked {
        if let Err(err) = nix::unistd::close(*fd) {
            tracing::warn!(fd, %err, "cannot close a BPF program fd left by libcgroups");
        }
    }
    tracing::debug!(?leaked, "closed the BPF program fds libcgroups left open");
    if let Ok((soft, hard)) = memlock {
        if let Err(err) = setrlimit(Resource::RLIMIT_MEMLOCK, soft, hard) {
            tracing::warn!(%err, soft, hard, "cannot restore the agent's RLIMIT_MEMLOCK");
        }
    }
    result
}

fn bpf_prog_fds() -> HashSet<RawFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return HashSet::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            (target.as_os_str() == BPF_PROG_LINK).then_some(fd)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn rules(json: &str) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_str(json).expect("device rules")
    }

    #[test]
    fn update_keeps_the_rules_of_create() {
        let privileged = rules(r#"[{"allow":true,"access":"rwm"}]"#);
        let mut update: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":1048576}}"#).expect("resources");
        keep_created_rules(&mut update, Some(&privileged));
        assert_eq!(update.devices().as_ref(), Some(&privileged));
        assert!(update.memory().is_some(), "other resources are left as they are");

        let mut widening: LinuxResources =
            serde_json::from_str(r#"{"devices":[{"allow":true,"access":"rwm"}]}"#).expect("resources");
        let default = rules(r#"[{"allow":false,"access":"rwm"}]"#);
        keep_created_rules(&mut widening, Some(&default));
        assert_eq!(widening.devices().as_ref(), Some(&default));

        keep_created_rules(&mut widening, None);
        assert_eq!(widening.devices(), &None);
    }

    #[test]
    fn memlock_is_pinned_to_the_agents_unless_the_spec_sets_it() {
        let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).expect("getrlimit");
        let process_with = |rlimit: &str| -> Process {
            let json = format!(
                r#"{{"cwd":"/","user":{{"uid":0,"gid":0}},"rlimits":[{{"type":"{rlimit}","hard":7,"soft":7}}]}}"#
            );
            serde_json::from_str(&json).expect("process")
        };
        let mut process = process_with("RLIMIT_NOFILE");
        pin_memlock_limit(&mut process);
        let rlimits = process.rlimits().clone().unwrap_or_default();
        assert_eq!(rlimits.len(), 2, "{rlimits:?}");
        let memlock = rlimits.iter().find(|r| r.typ() == PosixRlimitType::RlimitMemlock);
        assert_eq!(memlock.map(|r| (r.soft(), r.hard())), Some((soft, hard)), "{rlimits:?}");

        let mut own = process_with("RLIMIT_MEMLOCK");
        pin_memlock_limit(&mut own);
        let rlimits = own.rlimits().clone().unwrap_or_default();
        assert_eq!((rlimits.len(), rlimits[0].soft()), (1, 7), "the spec's own limit stays");
    }

    #[test]
    fn other_fds_opened_during_apply_stay_open() {
        let file = without_leftovers(|| std::fs::File::open("/proc/self/stat").expect("open"));
        let fd = file.as_raw_fd();
        assert!(std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok(), "fd {fd} was closed");
    }
}
