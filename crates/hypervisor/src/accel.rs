//! Accelerator detection: is KVM really usable here, or must VMs run under TCG?
//!
//! `/dev/kvm` existing is not enough: hosts running `kvm_pvm` expose `/dev/kvm` but only run PVM-patched guest
//! kernels, so a stock guest fails under `accel=kvm`. KVM counts as usable only when `/dev/kvm` opens *and*
//! `kvm_intel` or `kvm_amd` is loaded. Used by the QEMU backend and by `kata-runtime check`.

use std::fmt;
use std::fs::OpenOptions;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The value of QEMU's `accel=` machine option.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when usable, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Whether KVM is usable, and why not when it is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmStatus {
    pub usable: bool,
    /// Human-readable explanation, suitable for `kata-runtime check`.
    pub reason: String,
}

/// Result of probing the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelReport {
    /// What `Auto` resolves to.
    pub usable: Accel,
    pub kvm: KvmStatus,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccelError {
    #[error("accelerator kvm was requested but KVM is not usable: {reason}")]
    KvmUnusable { reason: String },
}

/// Where to look; real hosts use [`HostRoots::default`], tests point these at temporary directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoots {
    /// Directory holding the `kvm` device node (normally `/dev`).
    pub dev: PathBuf,
    /// Directory holding loaded modules (normally `/sys/module`).
    pub sys_module: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        Self { dev: PathBuf::from("/dev"), sys_module: PathBuf::from("/sys/module") }
    }
}

/// Probes this host.
pub fn detect_accel() -> AccelReport {
    detect_accel_in(&HostRoots::default())
}

/// Probes the host described by `roots`.
pub fn detect_accel_in(roots: &HostRoots) -> AccelReport {
    let kvm = kvm_status(roots);
    let usable = if kvm.usable { Accel::Kvm } else { Accel::Tcg };
    AccelReport { usable, kvm }
}

fn kvm_status(roots: &HostRoots) -> KvmStatus {
    let dev_kvm = roots.dev.join("kvm");
    let module = |name: &str| roots.sys_module.join(name).exists();
    let unusable = |reason: String| KvmStatus { usable: false, reason };

    if !dev_kvm.exists() {
        return unusable(format!(
            "{} does not exist (KVM module not loaded, or no hardware virtualization)",
            dev_kvm.display()
        ));
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(&dev_kvm) {
        return unusable(format!("{} cannot be opened read-write: {e}", dev_kvm.display()));
    }
    let vendor_module = ["kvm_intel", "kvm_amd"].into_iter().find(|m| module(m));
    match vendor_module {
        Some(m) => KvmStatus { usable: true, reason: format!("{} is served by {m}", dev_kvm.display()) },
        None if module("kvm_pvm") => unusable(format!(
            "{} is provided by kvm_pvm, which runs only PVM-patched guest kernels; stock guests fail under \
             accel=kvm",
            dev_kvm.display()
        )),
        None => unusable(format!(
            "{} exists but neither kvm_intel nor kvm_amd is loaded (looked in {})",
            dev_kvm.display(),
            roots.sys_module.display()
        )),
    }
}

/// Turns the configured choice into the accelerator to use.
pub fn resolve_accel(choice: AccelChoice, report: &AccelReport) -> Result<Accel, AccelError> {
    match choice {
        AccelChoice::Auto => Ok(report.usable),
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm if report.kvm.usable => Ok(Accel::Kvm),
        AccelChoice::Kvm => Err(AccelError::KvmUnusable { reason: report.kvm.reason.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct FakeHost {
        _dir: tempfile::TempDir,
        roots: HostRoots,
    }

    fn fake_host(dev_kvm: bool, modules: &[&str]) -> FakeHost {
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = HostRoots { dev: dir.path().join("dev"), sys_module: dir.path().join("sys/module") };
        fs::create_dir_all(&roots.dev).expect("mkdir dev");
        fs::create_dir_all(&roots.sys_module).expect("mkdir sys/module");
        if dev_kvm {
            fs::write(roots.dev.join("kvm"), b"").expect("fake /dev/kvm");
        }
        for m in modules {
            fs::create_dir(roots.sys_module.join(m)).expect("fake module");
        }
        FakeHost { _dir: dir, roots }
    }

    #[test]
    fn kvm_intel_is_usable() {
        let host = fake_host(true, &["kvm", "kvm_intel"]);
        let report = detect_accel_in(&host.roots);
        assert_eq!(report.usable, Accel::Kvm);
        assert!(report.kvm.usable);
        assert!(report.kvm.reason.contains("kvm_intel"));
    }

    #[test]
    fn kvm_amd_is_usable() {
        let host = fake_host(true, &["kvm", "kvm_amd"]);
        assert_eq!(detect_accel_in(&host.roots).usable, Accel::Kvm);
    }

    #[test]
    fn kvm_pvm_alone_is_not_usable() {
        let host = fake_host(true, &["kvm", "kvm_pvm"]);
        let report = detect_accel_in(&host.roots);
        assert_eq!(report.usable, Accel::Tcg);
        assert!(!report.kvm.usable);
        assert!(
            report.kvm.reason.contains(
                "is provided by kvm_pvm, which runs only PVM-patched guest kernels; stock guests fail under accel=kvm"
            ),
            "{}",
            report.kvm.reason
        );
    }

    #[test]
    fn kvm_pvm_next_to_kvm_amd_is_usable() {
        let host = fake_host(true, &["kvm", "kvm_pvm", "kvm_amd"]);
        assert_eq!(detect_accel_in(&host.roots).usable, Accel::Kvm);
    }

    #[test]
    fn missing_dev_kvm_says_so() {
        let host = fake_host(false, &["kvm_intel"]);
        let report = detect_accel_in(&host.roots);
        assert_eq!(report.usable, Accel::Tcg);
        assert!(report.kvm.reason.contains("does not exist"), "{}", report.kvm.reason);
    }

    #[test]
    fn no_vendor_module_is_not_usable() {
        let host = fake_host(true, &["kvm"]);
        let report = detect_accel_in(&host.roots);
        assert_eq!(report.usable, Accel::Tcg);
        assert!(report.kvm.reason.contains("neither kvm_intel nor kvm_amd"), "{}", report.kvm.reason);
    }

    #[test]
    fn resolve_auto_and_forced() {
        let kvm = detect_accel_in(&fake_host(true, &["kvm_intel"]).roots);
        let pvm = detect_accel_in(&fake_host(true, &["kvm_pvm"]).roots);
        assert_eq!(resolve_accel(AccelChoice::Auto, &kvm), Ok(Accel::Kvm));
        assert_eq!(resolve_accel(AccelChoice::Auto, &pvm), Ok(Accel::Tcg));
        assert_eq!(resolve_accel(AccelChoice::Tcg, &kvm), Ok(Accel::Tcg));
        let err = resolve_accel(AccelChoice::Kvm, &pvm).expect_err("kvm must be refused");
        assert!(err.to_string().contains("kvm_pvm"), "{err}");
    }
}
