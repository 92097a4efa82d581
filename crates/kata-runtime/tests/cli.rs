//! Runs the real `kata-runtime` binary against configuration files made in a temp dir.

use std::path::Path;
use std::process::{Command, Output};

fn kata_runtime(args: &[&str], conf: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kata-runtime"))
        .args(args)
        .env("KATA_CONF_FILE", conf)
        .output()
        .expect("run kata-runtime")
}

fn write_config(dir: &Path, kernel: &Path) -> std::path::PathBuf {
    let conf = dir.join("configuration.toml");
    let text = format!(
        "[hypervisor.qemu]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
        kernel.display(),
        dir.join("initrd.img").display()
    );
    std::fs::write(&conf, text).expect("write config");
    conf
}

#[test]
fn check_fails_and_names_a_missing_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_config(dir.path(), &dir.path().join("no-such-vmlinux"));
    let out = kata_runtime(&["check", "--json"], &conf);
    assert_eq!(out.status.code(), Some(1), "a host without a kernel cannot run a sandbox");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["can_run_sandbox"], false);
    let checks = report["checks"].as_array().unwrap();
    let kernel = checks.iter().find(|c| c["name"] == "guest kernel").unwrap();
    assert_eq!(kernel["passed"], false);
    let detail = kernel["detail"].as_str().unwrap();
    assert!(detail.contains("no-such-vmlinux"), "{detail}");
    let config = checks.iter().find(|c| c["name"] == "configuration").unwrap();
    let detail = config["detail"].as_str().unwrap();
    assert!(detail.contains("configuration.toml:2: hypervisor.qemu.kernel:"), "{detail}");
}

#[test]
fn check_reports_an_accelerator_and_why_kvm_is_or_is_not_usable() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_config(dir.path(), &dir.path().join("vmlinux"));
    let out = kata_runtime(&["check", "--json"], &conf);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let accel = report["accelerator"].as_str().unwrap();
    assert!(accel == "kvm" || accel == "tcg", "{accel}");
    if accel == "tcg" {
        assert_eq!(report["kvm_usable"], false);
        assert!(!report["kvm_reason"].as_str().unwrap().is_empty());
    }
}

#[test]
fn env_shows_where_values_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_config(dir.path(), Path::new("/boot/vmlinux"));
    let out = kata_runtime(&["env", "--json"], &conf);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let settings = report["settings"].as_array().unwrap();
    let kernel = settings.iter().find(|s| s["key"] == "hypervisor.qemu.kernel").unwrap();
    assert_eq!(kernel["value"], "/boot/vmlinux");
    assert_eq!(kernel["origin"]["line"], 2);
    let memory = settings.iter().find(|s| s["key"] == "hypervisor.qemu.default_memory").unwrap();
    assert_eq!(memory["value"], 2048);
    assert_eq!(memory["origin"]["source"], "default");
    let sizing = &report["sizing"];
    assert_eq!(sizing["base"]["memory_mib"], 2048, "{sizing}");
    assert_eq!(sizing["base"]["vcpus"], 1, "{sizing}");
    assert_eq!(sizing["grows"], true, "q35 hot-plugs: {sizing}");
    assert!(sizing["host_cgroups"].as_str().unwrap().contains("kata_overhead"), "{sizing}");
}

#[test]
fn env_says_a_static_or_microvm_pod_does_not_grow() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_config(dir.path(), Path::new("/boot/vmlinux"));
    for (extra, why) in [
        ("machine_type = \"microvm\"\n", "microvm"),
        ("[runtime]\nstatic_sandbox_resource_mgmt = true\n", "static_sandbox_resource_mgmt"),
    ] {
        let text = std::fs::read_to_string(&conf).unwrap() + extra;
        let other = dir.path().join("other.toml");
        std::fs::write(&other, text).unwrap();
        let out = kata_runtime(&["env"], &other);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let growing = stdout.lines().find(|l| l.starts_with("# growing:")).unwrap_or_default();
        assert!(growing.contains(why) && growing.contains("sized at start only"), "{stdout}");
    }
}

#[test]
fn env_rejects_an_unknown_key_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("configuration.toml");
    std::fs::write(&conf, "[hypervisor.qemu]\ndefault_memroy = 512\n").unwrap();
    let out = kata_runtime(&["env"], &conf);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("configuration.toml:2: hypervisor.qemu.default_memroy: unknown configuration key"), "{err}");
}

#[test]
fn version_is_printed() {
    let out = Command::new(env!("CARGO_BIN_EXE_kata-runtime")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("kata-runtime "));
}

#[test]
fn a_report_piped_into_a_reader_that_left_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let conf = write_config(dir.path(), Path::new("/boot/vmlinux"));
    for args in [&["env"][..], &["factory", "status"]] {
        // As `kata-runtime env | head -0`: the reader is gone before the first line is written.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_kata-runtime"))
            .args(args)
            .env("KATA_CONF_FILE", &conf)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.signal(), Some(nix::libc::SIGPIPE), "{args:?}: {:?} {err}", out.status);
    }
}
