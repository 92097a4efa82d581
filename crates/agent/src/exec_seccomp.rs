//! The container's seccomp profile for exec'd processes.
//!
//! libcontainer applies a spec's seccomp filter to a container's init only: for a process joining a running
//! container (a tenant) it builds a new `linux` section without it, so `kubectl exec` would run unfiltered
//! (runc filters it). [`SeccompExecutor`] closes that gap: it is libcontainer's last step in the new process,
//! after namespaces, user and capabilities are set, and loads the container's filter right before the exec.
//!
//! At that point the process may have dropped CAP_SYS_ADMIN; the kernel then accepts a filter only with
//! `no_new_privs` set. runc loads the filter earlier to avoid that; libcontainer offers no earlier hook, so a
//! process that could not load its filter otherwise gets `no_new_privs` (a setuid binary run by such an exec
//! does not gain privileges): the filter is never skipped.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{LinuxSeccomp, Spec};

#[derive(Clone)]
pub struct SeccompExecutor {
    pub seccomp: Option<LinuxSeccomp>,
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = &self.seccomp {
            load(seccomp)
                .map_err(|e| ExecutorError::Other(format!("cannot load the container's seccomp filter: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

fn load(seccomp: &LinuxSeccomp) -> Result<(), String> {
    let first = match libcontainer::seccomp::initialize_seccomp(seccomp) {
        Ok(notify) => return close_notify(notify),
        Err(e) => e,
    };
    // Without CAP_SYS_ADMIN the kernel wants no_new_privs before a filter; anything else is a real failure.
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("{first}; and no_new_privs cannot be set: {}", std::io::Error::last_os_error()));
    }
    let notify = libcontainer::seccomp::initialize_seccomp(seccomp).map_err(|e| e.to_string())?;
    close_notify(notify)
}

/// A profile with SCMP_ACT_NOTIFY gives a listener fd; an exec has no agent-side listener (the container's
/// init has none either here), so the fd is closed and such calls fail instead of hanging.
fn close_notify(fd: Option<std::os::fd::RawFd>) -> Result<(), String> {
    if let Some(fd) = fd {
        // SAFETY: the fd was just returned to us by libseccomp and nothing else holds it.
        unsafe { libc::close(fd) };
    }
    Ok(())
}
