//! Checks a `VmConfig` before anything is created or spawned, naming what is wrong.

use std::collections::HashSet;
use std::path::Path;

use super::cmdline::VmPaths;
use crate::config::{AgentTransport, GuestMemory, SharedFs, VmConfig};
use crate::error::{Error, Result};

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

pub(super) fn validate(config: &VmConfig) -> Result<()> {
    let invalid = |msg: String| Err(Error::InvalidConfig(msg));
    if config.vcpus == 0 {
        return invalid("vcpus must be at least 1".into());
    }
    if config.memory_mib < 64 {
        return invalid(format!("memory_mib is {}, at least 64 is needed to boot", config.memory_mib));
    }
    let must_be_file = |what: &str, path: &Path| -> Result<()> {
        if path.to_str().is_none() {
            return invalid(format!("{what} path {} is not UTF-8", path.display()));
        }
        if !path.is_file() {
            return invalid(format!("{what} {} does not exist or is not a file", path.display()));
        }
        Ok(())
    };
    must_be_file("QEMU binary", &config.qemu.path)?;
    must_be_file("guest kernel", &config.kernel)?;
    if let Some(initrd) = &config.initrd {
        must_be_file("guest initrd", initrd)?;
    }
    match (&config.agent, &config.qemu.vsock_daemon) {
        (Some(AgentTransport::HybridVsock), Some(daemon)) => must_be_file("vsock daemon", daemon)?,
        (Some(AgentTransport::HybridVsock), None) => {
            return invalid("the agent's hybrid vsock needs a vsock daemon (vhost-device-vsock) under QEMU".into())
        }
        _ => {}
    }
    match &config.shared_fs {
        SharedFs::VirtioFs { daemon, shared_dir, .. } => {
            must_be_file("virtiofsd", daemon)?;
            if !shared_dir.is_dir() {
                return invalid(format!("shared directory {} does not exist", shared_dir.display()));
            }
        }
        SharedFs::Virtio9p { shared_dir } => {
            if !shared_dir.is_dir() {
                return invalid(format!("shared directory {} does not exist", shared_dir.display()));
            }
        }
        SharedFs::None => {}
    }
    validate_net_devices(config)?;
    validate_memory(config)?;
    if let Some(sandbox) = &config.qemu.seccomp_sandbox {
        // One QEMU option string: `on`/`off` and `key=value` pairs, nothing QEMU would read as another option.
        let ok = sandbox.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ',' | '=' | '-' | '_'));
        if !ok {
            return invalid(format!(
                "seccomp sandbox {sandbox:?} must hold only letters, digits, ',', '=', '-' and '_' (e.g. \"on,spawn=deny\")"
            ));
        }
    }
    let work = &config.work_dir;
    let Some(work_str) = work.to_str() else {
        return invalid(format!("work dir {} is not UTF-8", work.display()));
    };
    if !work.is_absolute() {
        return invalid(format!("work dir {} must be an absolute path", work.display()));
    }
    // QEMU and vhost-device-vsock both split their options at commas.
    if work_str.contains(',') {
        return invalid(format!("work dir {} must not contain a comma", work.display()));
    }
    let longest = VmPaths::new(work).sockets().iter().map(|s| s.as_os_str().len()).max().unwrap_or(0);
    if longest > MAX_SOCKET_PATH {
        return invalid(format!(
            "work dir {} is too long: socket paths in it would exceed {MAX_SOCKET_PATH} bytes",
            work.display()
        ));
    }
    if let SharedFs::Virtio9p { shared_dir } | SharedFs::VirtioFs { shared_dir, .. } = &config.shared_fs {
        if !matches!(shared_dir.to_str(), Some(s) if !s.contains(',')) {
            return invalid(format!("shared directory {} must be UTF-8 without commas", shared_dir.display()));
        }
    }
    Ok(())
}

/// The template's memory file goes into a QEMU option, so it must need no quoting (the state file is opened by
/// us and handed over as an fd); a clone's memory is private, so no vhost-user daemon could see it.
fn validate_memory(config: &VmConfig) -> Result<()> {
    let plain = |what: &str, path: &Path| -> Result<()> {
        let ok = path.is_absolute()
            && path
                .to_str()
                .is_some_and(|s| s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.')));
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig(format!(
                "{what} {} must be an absolute path of letters, digits, '/', '-', '_' and '.'",
                path.display()
            )))
        }
    };
    match &config.memory {
        GuestMemory::Memfd => Ok(()),
        GuestMemory::Template { file } => plain("template memory file", file),
        GuestMemory::Clone { file, state } => {
            plain("template memory file", file)?;
            for (what, path) in [("template memory file", file), ("template state file", state)] {
                if !path.is_file() {
                    return Err(Error::InvalidConfig(format!("{what} {} does not exist", path.display())));
                }
            }
            if config.agent == Some(AgentTransport::HybridVsock)
                || matches!(config.shared_fs, SharedFs::VirtioFs { .. })
            {
                return Err(Error::InvalidConfig(
                    "a VM cloned from a template cannot use vhost-user devices (vsock daemon, virtio-fs): \
                     its memory is private to its QEMU"
                        .into(),
                ));
            }
            Ok(())
        }
    }
}

fn validate_net_devices(config: &VmConfig) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, net) in config.net_devices.iter().enumerate() {
        let id_ok = net.id.starts_with(|c: char| c.is_ascii_alphabetic())
            && net.id.len() <= 64
            && net.id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !id_ok {
            return Err(Error::InvalidConfig(format!(
                "net_devices[{i}]: id {:?} must start with a letter and hold only letters, digits, '-', '_', '.'",
                net.id
            )));
        }
        if !seen.insert(net.id.as_str()) {
            return Err(Error::InvalidConfig(format!("net_devices[{i}]: id {:?} is used twice", net.id)));
        }
        if !is_unicast_mac(&net.mac) {
            return Err(Error::InvalidConfig(format!(
                "net_devices[{i}] ({}): MAC {:?} is not a unicast address like 02:00:00:00:00:01",
                net.id, net.mac
            )));
        }
    }
    Ok(())
}

/// Six colon-separated hex pairs with the multicast bit clear.
fn is_unicast_mac(mac: &str) -> bool {
    let octets: Vec<&str> = mac.split(':').collect();
    octets.len() == 6
        && octets.iter().all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"").expect("fake kernel");
        let mut c = VmConfig::new("t", kernel, dir.join("vm"));
        c.qemu.path = "/bin/true".into();
        c
    }

    #[test]
    fn validation_names_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = config(dir.path());
        assert!(validate(&c).is_ok());

        c.kernel = dir.path().join("missing-vmlinux");
        let err = validate(&c).expect_err("missing kernel").to_string();
        assert!(err.contains("guest kernel") && err.contains("missing-vmlinux"), "{err}");

        let mut c = config(dir.path());
        c.work_dir = PathBuf::from(format!("/{}", "x".repeat(100)));
        let err = validate(&c).expect_err("long work dir").to_string();
        assert!(err.contains("too long"), "{err}");

        let mut c = config(dir.path());
        c.shared_fs = SharedFs::Virtio9p { shared_dir: dir.path().join("nope") };
        assert!(validate(&c).expect_err("missing shared dir").to_string().contains("nope"));

        let mut c = config(dir.path());
        c.qemu.seccomp_sandbox = Some("on -device evil".into());
        let err = validate(&c).expect_err("odd sandbox value").to_string();
        assert!(err.contains("seccomp sandbox"), "{err}");
        c.qemu.seccomp_sandbox = None;
        assert!(validate(&c).is_ok());
    }

    #[test]
    fn clone_needs_its_files_plain_paths_and_no_vhost_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, state) = (dir.path().join("memory"), dir.path().join("state"));
        let mut c = config(dir.path());
        c.memory = GuestMemory::Clone { file: file.clone(), state: state.clone() };
        let err = validate(&c).expect_err("missing files").to_string();
        assert!(err.contains("template memory file") && err.contains("does not exist"), "{err}");

        std::fs::write(&file, b"").expect("memory");
        std::fs::write(&state, b"").expect("state");
        assert!(validate(&c).is_ok());

        c.agent = Some(AgentTransport::HybridVsock);
        c.qemu.vsock_daemon = Some(PathBuf::from("/bin/true"));
        let err = validate(&c).expect_err("vhost-user vsock").to_string();
        assert!(err.contains("cannot use vhost-user devices"), "{err}");

        let mut c = config(dir.path());
        c.memory = GuestMemory::Template { file: dir.path().join("a b") };
        let err = validate(&c).expect_err("space in path").to_string();
        assert!(err.contains("must be an absolute path of letters"), "{err}");
    }

    #[test]
    fn net_devices_need_unique_ids_and_unicast_macs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = std::sync::Arc::new(std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").expect("open")));
        let net =
            |id: &str, mac: &str| crate::config::NetDevice { id: id.into(), mac: mac.into(), fd: Some(fd.clone()) };
        let mut c = config(dir.path());
        c.net_devices = vec![net("net0", "02:00:ca:fe:00:01"), net("net1", "AA:BB:CC:DD:EE:FF")];
        assert!(validate(&c).is_ok());
        for (devices, expected) in [
            (vec![net("net0", "02:00:00:00:00:01"), net("net0", "02:00:00:00:00:02")], "used twice"),
            (vec![net("net,0", "02:00:00:00:00:01")], "must start with a letter"),
            (vec![net("", "02:00:00:00:00:01")], "must start with a letter"),
            (vec![net("net0", "01:00:5e:00:00:01")], "not a unicast address"),
            (vec![net("net0", "02:00:00:00:00")], "not a unicast address"),
            (vec![net("net0", "02:00:00:00:00:0g")], "not a unicast address"),
        ] {
            c.net_devices = devices;
            let err = validate(&c).expect_err(expected).to_string();
            assert!(err.contains(expected) && err.contains("net_devices["), "{err}");
        }
    }
}
