//! Duties of PID 1 in the guest, done before anything else runs.

use std::os::fd::AsRawFd;

use crate::mount;

/// Mounts the basic filesystems, points stdio at the console and enables cgroup controllers.
pub fn setup() {
    mount::mount_init_filesystems();
    attach_console();
    mount::enable_cgroup_controllers();
    for dir in ["/run/kata-containers", crate::container::STATE_ROOT, crate::container::BUNDLE_ROOT, "/etc"] {
        let _ = std::fs::create_dir_all(dir);
    }
}

/// The kernel gives init a /dev/console only if the initrd has the node; after devtmpfs is
/// mounted it always exists, so reopen stdio on it.
fn attach_console() {
    let Ok(console) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/console") else { return };
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; `console` stays open for the call.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// Kernel command line flags for the agent: `agent.debug` or `agent.log=<level>`.
pub fn log_level_from_cmdline(cmdline: &str) -> Option<String> {
    let mut level = None;
    for word in cmdline.split_whitespace() {
        if word == "agent.debug" || word == "agent.debug=1" {
            level = Some("debug".to_string());
        } else if let Some(l) = word.strip_prefix("agent.log=") {
            level = Some(l.to_string());
        }
    }
    level
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_flags() {
        assert_eq!(log_level_from_cmdline("console=ttyS0 agent.debug quiet").as_deref(), Some("debug"));
        assert_eq!(log_level_from_cmdline("agent.log=trace").as_deref(), Some("trace"));
        assert_eq!(log_level_from_cmdline("quiet"), None);
    }
}
