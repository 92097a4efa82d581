//! `kata-runtime check`: can this host run a sandbox, and with which accelerator?

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Result;
use runtime::accel::{detect_accel, AccelReport};
use serde::Serialize;
use types::config::{ConfigSearch, HypervisorConfig, SharedFs};

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    /// A failed required check means the host cannot run a sandbox.
    pub required: bool,
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, required: bool, outcome: Result<String, String>) -> Self {
        let (passed, detail) = match outcome {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Check { name, passed, required, detail }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// True when every required check passed.
    pub can_run_sandbox: bool,
    /// The accelerator a sandbox would use ("kvm" or "tcg"), when one is usable.
    pub accelerator: Option<String>,
    pub kvm_usable: bool,
    pub kvm_reason: String,
    pub config_files: Vec<PathBuf>,
    pub checks: Vec<Check>,
}

pub fn run(config_path: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let report = build_report(config_path);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(if report.can_run_sandbox { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn build_report(config_path: Option<PathBuf>) -> Report {
    let mut checks = Vec::new();
    let loaded = ConfigSearch::standard(config_path).load();
    let accel = detect_accel();
    let mut config_files = Vec::new();
    match &loaded {
        Ok(l) => {
            config_files = l.files.clone();
            let detail = match l.validate() {
                Ok(()) => Ok(format!("loaded {}", describe_files(&l.files))),
                Err(e) => Err(runtime::error_chain(&e)),
            };
            checks.push(Check::new("configuration", true, detail));
            for w in &l.warnings {
                checks.push(Check::new("configuration warning", false, Err(w.clone())));
            }
        }
        Err(e) => checks.push(Check::new("configuration", true, Err(runtime::error_chain(e)))),
    }
    let hv = loaded.as_ref().map(|l| l.config.hypervisor.clone()).unwrap_or_default();
    checks.push(Check::new("qemu", true, check_qemu(Path::new(&hv.path))));
    checks.push(Check::new("accelerator", true, check_accel(&hv, &accel)));
    checks.push(Check::new("guest kernel", true, check_file(Path::new(&hv.kernel))));
    if hv.image.is_empty() {
        checks.push(Check::new("guest initrd", true, check_file(Path::new(&hv.initrd))));
    } else {
        checks.push(Check::new("guest image", true, check_file(Path::new(&hv.image))));
    }
    let needs_virtiofsd = hv.shared_fs == SharedFs::VirtioFs;
    let virtiofsd = check_binary(Path::new(&hv.virtio_fs_daemon), "--version");
    checks.push(Check::new("virtiofsd", needs_virtiofsd, virtiofsd));
    checks.push(Check::new("vhost-device-vsock", true, check_binary(Path::new(&hv.vsock_daemon), "--version")));
    checks.push(Check::new("hybrid vsock", true, check_hybrid_vsock()));
    checks.push(Check::new("containerd", false, check_binary(Path::new("containerd"), "--version")));
    checks.push(Check::new("cgroups", true, check_cgroups(Path::new(types::mountinfo::SELF_MOUNTINFO))));
    checks.push(Check::new("tun", true, check_tun()));
    checks.push(Check::new("overlay", false, check_filesystem("overlay")));
    let can_run_sandbox = checks.iter().all(|c| c.passed || !c.required);
    let usable = check_accel(&hv, &accel).ok().map(|_| resolved_accel_name(&hv, &accel));
    Report {
        can_run_sandbox,
        accelerator: usable,
        kvm_usable: accel.kvm.usable,
        kvm_reason: accel.kvm.reason.clone(),
        config_files,
        checks,
    }
}

fn describe_files(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn print_human(report: &Report) {
    for c in &report.checks {
        let mark = match (c.passed, c.required) {
            (true, _) => "PASS",
            (false, true) => "FAIL",
            (false, false) => "WARN",
        };
        println!("[{mark}] {:<20} {}", c.name, c.detail);
    }
    match (&report.accelerator, report.can_run_sandbox) {
        (Some(a), true) => println!("System is capable of running kata-rs sandboxes (accelerator: {a})"),
        _ => println!("System is NOT capable of running kata-rs sandboxes: see FAIL lines above"),
    }
}

fn resolved_accel_name(hv: &HypervisorConfig, report: &AccelReport) -> String {
    match hv.accel {
        types::config::Accel::Kvm => "kvm".to_string(),
        types::config::Accel::Tcg => "tcg".to_string(),
        types::config::Accel::Auto => report.usable.to_string(),
    }
}

fn check_accel(hv: &HypervisorConfig, report: &AccelReport) -> Result<String, String> {
    let kvm =
        if report.kvm.usable { "KVM usable".to_string() } else { format!("KVM not usable: {}", report.kvm.reason) };
    match hv.accel {
        types::config::Accel::Kvm if !report.kvm.usable => Err(format!("accel = \"kvm\" is configured but {kvm}")),
        types::config::Accel::Kvm => Ok(format!("kvm (configured); {kvm}")),
        types::config::Accel::Tcg => Ok(format!("tcg (configured); {kvm}")),
        types::config::Accel::Auto => Ok(format!("{} (auto); {kvm}", report.usable)),
    }
}

fn check_file(path: &Path) -> Result<String, String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(format!("{} ({} KiB)", path.display(), m.len() / 1024)),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Runs `binary arg` and returns the first line it prints.
fn check_binary(binary: &Path, arg: &str) -> Result<String, String> {
    let out = Command::new(binary).arg(arg).output().map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).to_string();
    let first = text.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() {
        return Err(format!("{} {arg} failed ({}): {first}", binary.display(), out.status));
    }
    Ok(format!("{}: {first}", binary.display()))
}

fn check_qemu(path: &Path) -> Result<String, String> {
    let line = check_binary(path, "--version")?;
    let version = parse_qemu_version(&line).ok_or_else(|| format!("cannot read QEMU version from {line:?}"))?;
    if version < (7, 0) {
        return Err(format!("{line}: QEMU 7.0 or newer is needed for vhost-user-vsock"));
    }
    Ok(line)
}

/// "QEMU emulator version 7.2.19 (Debian ...)" -> (7, 2)
fn parse_qemu_version(line: &str) -> Option<(u32, u32)> {
    let rest = &line[line.find("version ")? + "version ".len()..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Hybrid vsock needs no /dev/vhost-vsock: QEMU talks vhost-user to vhost-device-vsock, which needs
/// memfd-backed shared guest memory.
fn check_hybrid_vsock() -> Result<String, String> {
    let vhost = Path::new("/dev/vhost-vsock").exists();
    let detail = if vhost { "present, not needed" } else { "absent, not needed" };
    Ok(format!("vhost-user-vsock via vhost-device-vsock with memfd guest memory (/dev/vhost-vsock {detail})"))
}

fn check_cgroups(mountinfo: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(mountinfo).map_err(|e| format!("{}: {e}", mountinfo.display()))?;
    describe_cgroups(&text)
}

fn describe_cgroups(mountinfo: &str) -> Result<String, String> {
    let mut v1 = 0;
    let mut v2 = None;
    for mount in types::mountinfo::parse(mountinfo) {
        match mount.fs_type.as_str() {
            "cgroup2" => v2 = Some(mount.mount_point.display().to_string()),
            "cgroup" => v1 += 1,
            _ => {}
        }
    }
    match (v1, v2) {
        (0, Some(p)) => Ok(format!("cgroup v2 (unified) at {p}")),
        (n, Some(p)) if n > 0 => Ok(format!("hybrid: {n} cgroup v1 hierarchies, cgroup v2 at {p}")),
        (n, None) if n > 0 => Ok(format!("cgroup v1: {n} hierarchies")),
        _ => Err("no cgroup filesystem is mounted".to_string()),
    }
}

fn check_tun() -> Result<String, String> {
    if Path::new("/dev/net/tun").exists() {
        Ok("/dev/net/tun present (tap devices for pod networking)".to_string())
    } else {
        Err("/dev/net/tun is missing: load the tun module (modprobe tun)".to_string())
    }
}

fn check_filesystem(name: &str) -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/filesystems").map_err(|e| format!("/proc/filesystems: {e}"))?;
    if text.lines().any(|l| l.split_whitespace().last() == Some(name)) {
        Ok(format!("{name} filesystem available"))
    } else if Path::new("/sys/module").join(name).exists() {
        Ok(format!("{name} module loaded"))
    } else {
        Err(format!(
            "{name} is not in /proc/filesystems (modprobe {name}); containerd's overlayfs snapshotter needs it"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_version_is_parsed() {
        let line = "/usr/bin/qemu-system-x86_64: QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)";
        assert_eq!(parse_qemu_version(line), Some((7, 2)));
        assert_eq!(parse_qemu_version("QEMU emulator version 10.0.2"), Some((10, 0)));
        assert_eq!(parse_qemu_version("no version here"), None);
    }

    #[test]
    fn cgroup_layouts_are_described() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      31 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            describe_cgroups(hybrid).unwrap(),
            "hybrid: 1 cgroup v1 hierarchies, cgroup v2 at /sys/fs/cgroup/unified"
        );
        let unified = "31 25 0:27 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(describe_cgroups(unified).unwrap(), "cgroup v2 (unified) at /sys/fs/cgroup");
        assert_eq!(
            describe_cgroups("1 0 0:1 / / rw - ext4 /dev/vda rw\n").unwrap_err(),
            "no cgroup filesystem is mounted"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = check_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.starts_with("/nonexistent/vmlinux: "), "{err}");
    }

    #[test]
    fn missing_binary_is_named() {
        let err = check_binary(Path::new("/nonexistent/virtiofsd"), "--version").unwrap_err();
        assert!(err.starts_with("cannot run /nonexistent/virtiofsd: "), "{err}");
    }
}
