//! Install and uninstall against temporary host roots: round trips must give back every byte, refusals and
//! attacks must leave everything as it was.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::containerd::fake::FakeContainerd;
use super::*;

const DEBIAN_DEFAULT: &str = include_str!("testdata/debian-containerd-1.6-default.toml");
const V1: &str = include_str!("testdata/containerd-v1.toml");
const THIS_MACHINE: &str = include_str!("testdata/this-machine.toml");
const CONFIG: &str = "etc/containerd/config.toml";

fn payload() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for item in FILES {
        let path = dir.path().join(item.from);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("new {}\n", item.from)).unwrap();
    }
    dir
}

fn opts(root: &Path) -> Options {
    Options {
        host_root: root.into(),
        containerd_config: "/etc/containerd/config.toml".into(),
        restart: true,
        cri_timeout: Duration::from_millis(100),
    }
}

/// Every entry below `dir`: its kind, contents or target, and mode.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(base).unwrap().to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_symlink() {
                out.insert(rel, format!("link {}", std::fs::read_link(&path).unwrap().display()));
            } else if meta.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(base, &path, out);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(rel, format!("file {mode:o} {}", String::from_utf8_lossy(&bytes)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A host root holding containerd's config (when given) and an older kata-rs installed by scripts/setup.sh.
fn host(config: Option<&str>, with_old_install: bool) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("usr/local/bin")).unwrap();
    if let Some(config) = config {
        std::fs::create_dir_all(root.path().join("etc/containerd")).unwrap();
        std::fs::write(root.path().join(CONFIG), config).unwrap();
    }
    if with_old_install {
        std::fs::write(root.path().join("usr/local/bin/kata-runtime"), "old kata-runtime\n").unwrap();
        let defaults = root.path().join("usr/share/defaults/kata-containers");
        std::fs::create_dir_all(&defaults).unwrap();
        std::fs::write(defaults.join("configuration-qemu.toml"), "old config\n").unwrap();
        symlink("configuration-qemu.toml", defaults.join("configuration.toml")).unwrap();
    }
    root
}

fn install(root: &Path, payload: &Path) -> anyhow::Result<Vec<String>> {
    setup::install(payload, &opts(root), &FakeContainerd::up())
}

fn uninstall(root: &Path) -> anyhow::Result<Vec<String>> {
    teardown::uninstall(&opts(root), &FakeContainerd::up())
}

#[test]
fn install_and_uninstall_give_back_every_byte() {
    let payload = payload();
    let cases: [(&str, Option<&str>, bool); 7] = [
        ("debian containerd 1.6 default (v2)", Some(DEBIAN_DEFAULT), false),
        ("version 1", Some(V1), false),
        ("this machine's, over an older kata-rs", Some(THIS_MACHINE), true),
        ("empty", Some(""), false),
        ("no trailing newline", Some("version = 2\n[plugins]"), true),
        ("missing", None, false),
        ("missing, with no /etc/containerd", None, true),
    ];
    for (name, config, old) in cases {
        let root = host(config, old);
        if name.contains("no /etc/containerd") {
            std::fs::remove_dir_all(root.path().join("usr")).unwrap();
        }
        let before = snapshot(root.path());
        install(root.path(), payload.path()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let installed = snapshot(root.path());
        for item in FILES {
            let got = std::fs::read_to_string(root.path().join(item.to.trim_start_matches('/'))).unwrap();
            assert_eq!(got, format!("new {}\n", item.from), "{name}");
        }
        let merged = std::fs::read_to_string(root.path().join(CONFIG)).unwrap();
        assert!(merged.contains(containerd_config::BEGIN), "{name}");
        let backup = root.path().join("etc/containerd/config.toml.kata-rs.bak");
        match config {
            Some(original) => {
                assert!(merged.starts_with(original), "{name}: only appended to");
                assert_eq!(std::fs::read_to_string(&backup).unwrap(), original, "{name}: backup");
            }
            None => assert!(!backup.exists(), "{name}: nothing to back up"),
        }

        let notes = install(root.path(), payload.path()).unwrap();
        assert_eq!(snapshot(root.path()), installed, "{name}: a second install changes nothing");
        assert!(notes.iter().any(|n| n.contains("already has the kata runtime")), "{name}: {notes:?}");

        uninstall(root.path()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(snapshot(root.path()), before, "{name}: uninstall gives back the node as it was");
    }
}

#[test]
fn the_merged_config_uses_the_files_format() {
    let payload = payload();
    for (config, table) in [
        (DEBIAN_DEFAULT, "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]"),
        (THIS_MACHINE, "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]"),
        (V1, "[plugins.cri.containerd.runtimes.kata]"),
        ("", "[plugins.cri.containerd.runtimes.kata]"),
    ] {
        let root = host(Some(config), false);
        install(root.path(), payload.path()).unwrap();
        let merged = std::fs::read_to_string(root.path().join(CONFIG)).unwrap();
        assert!(merged.contains(table), "{merged}");
        assert!(merged.contains(&format!("ConfigPath = \"{KATA_CONFIG}\"")));
    }
}

/// containerd itself reads the merged files (`containerd config dump` parses a config without starting):
/// the kata runtime must be in what it loaded, whatever the file's format, next to the default runtime.
#[test]
fn containerd_finds_the_kata_runtime_in_merged_configs() {
    let Ok(containerd) = which("containerd") else {
        eprintln!("skipped: no containerd in PATH");
        return;
    };
    let payload = payload();
    for config in [Some(DEBIAN_DEFAULT), Some(V1), Some(THIS_MACHINE), Some(""), None] {
        let root = host(config, false);
        install(root.path(), payload.path()).unwrap();
        let out = std::process::Command::new(&containerd)
            .arg("--config")
            .arg(root.path().join(CONFIG))
            .args(["config", "dump"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let dump: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
        let kata = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["kata"];
        assert_eq!(kata["runtime_type"].as_str(), Some("io.containerd.kata.v2"), "{config:?}");
        assert_eq!(kata["privileged_without_host_devices"].as_bool(), Some(true));
        assert_eq!(kata["options"]["ConfigPath"].as_str(), Some(KATA_CONFIG));
        // The CRI plugin loads only if its default runtime is still there (runc, which a config without
        // runtimes gets from containerd's defaults until a runtime is named), unless the legacy
        // default_runtime table is set, which containerd registers as the default itself.
        let cri = &dump["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        let legacy = cri.get("default_runtime").and_then(|d| d.get("runtime_type")).and_then(|t| t.as_str());
        let default = cri["default_runtime_name"].as_str().unwrap();
        assert!(
            legacy.is_some_and(|t| !t.is_empty()) || cri["runtimes"].get(default).is_some(),
            "{config:?}: no runtime {default:?} for CRI"
        );
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Installs and expects `what` in the error, with the host root untouched.
fn refused(root: &Path, payload: &Path, what: &str) {
    let before = snapshot(root);
    let err = format!("{:#}", install(root, payload).unwrap_err());
    assert!(err.contains(what), "expected {what:?} in: {err}");
    assert_eq!(snapshot(root), before, "a refused install writes nothing");
}

#[test]
fn malformed_toml_is_refused_with_file_and_line() {
    let root = host(Some("version = 2\n[plugins\n"), false);
    let path = root.path().join(CONFIG);
    refused(root.path(), payload().path(), &format!("{}:2: not valid TOML", path.display()));
}

#[test]
fn a_foreign_kata_runtime_is_refused() {
    let config = format!("{THIS_MACHINE}\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]\n  runtime_type = \"io.containerd.kata.v2\"\n");
    let root = host(Some(&config), false);
    refused(root.path(), payload().path(), "a runtime called \"kata\" is already defined");
}

#[test]
fn a_disabled_cri_plugin_is_refused() {
    let config = DEBIAN_DEFAULT.replace("disabled_plugins = []", "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]");
    let root = host(Some(&config), false);
    refused(root.path(), payload().path(), "CRI plugin is off");
}

#[test]
fn an_incomplete_payload_is_refused() {
    let payload = payload();
    std::fs::remove_file(payload.path().join("bin/virtiofsd")).unwrap();
    let root = host(Some(THIS_MACHINE), false);
    refused(root.path(), payload.path(), "has no bin/virtiofsd");
}

#[test]
fn a_symlink_planted_at_a_binary_path_is_not_written_through() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), "keep").unwrap();
    let root = host(Some(THIS_MACHINE), false);
    symlink(outside.path().join("victim"), root.path().join("usr/local/bin/containerd-shim-kata-v2")).unwrap();
    refused(root.path(), payload().path(), "is a symlink");
    assert_eq!(std::fs::read_to_string(outside.path().join("victim")).unwrap(), "keep");
}

#[test]
fn a_symlink_planted_at_the_config_path_is_not_followed() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim.toml"), "version = 2\n").unwrap();
    let root = host(None, false);
    std::fs::create_dir_all(root.path().join("etc/containerd")).unwrap();
    symlink(outside.path().join("victim.toml"), root.path().join(CONFIG)).unwrap();
    refused(root.path(), payload().path(), "is a symlink");
    assert_eq!(std::fs::read_to_string(outside.path().join("victim.toml")).unwrap(), "version = 2\n");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1, "no backup written beside the target");
}

#[test]
fn a_symlinked_directory_component_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let root = host(Some(THIS_MACHINE), false);
    std::fs::remove_dir_all(root.path().join("usr/local")).unwrap();
    symlink(outside.path(), root.path().join("usr/local")).unwrap();
    refused(root.path(), payload().path(), "is a symlink");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

    // The same for the directory of the manifest.
    let root = host(Some(THIS_MACHINE), false);
    std::fs::create_dir_all(root.path().join("var")).unwrap();
    symlink(outside.path(), root.path().join("var/lib")).unwrap();
    refused(root.path(), payload().path(), "is a symlink");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

/// Rewrites the manifest of an install with `edit`, then expects uninstall to refuse and remove nothing.
fn tampered(edit: impl FnOnce(&mut serde_json::Value), outside_victim: Option<&Path>) {
    let root = host(Some(THIS_MACHINE), false);
    install(root.path(), payload().path()).unwrap();
    let path = root.path().join(manifest::PATH.trim_start_matches('/'));
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let before = snapshot(root.path());
    let err = format!("{:#}", uninstall(root.path()).unwrap_err());
    assert!(err.contains("nothing was removed"), "{err}");
    assert_eq!(snapshot(root.path()), before);
    if let Some(victim) = outside_victim {
        assert!(victim.exists());
    }
}

#[test]
fn a_tampered_manifest_cannot_make_uninstall_remove_other_files() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let escape = format!("/..{}", victim.display());
    tampered(|m| m["files"][0]["path"] = escape.clone().into(), Some(&victim));
    tampered(|m| m["files"][0]["path"] = "/etc/shadow".into(), None);
    tampered(|m| m["links"][0]["path"] = "/etc/passwd".into(), None);
    tampered(|m| m["dirs"] = serde_json::json!(["/srv"]), None);
    tampered(|m| m["dirs"] = serde_json::json!(["/.."]), None);
    tampered(|m| m["containerd_config"]["path"] = "/etc/fstab".into(), None);
    tampered(|m| m["containerd_config"]["backup"] = "/etc/fstab".into(), None);
}

#[test]
fn files_changed_since_install_are_left_and_named() {
    let root = host(Some(THIS_MACHINE), true);
    install(root.path(), payload().path()).unwrap();
    let changed = root.path().join("usr/local/bin/kata-runtime");
    std::fs::write(&changed, "edited by the admin\n").unwrap();
    let notes = uninstall(root.path()).unwrap();
    assert!(notes.iter().any(|n| n.contains("kata-runtime: it changed since install")), "{notes:?}");
    assert_eq!(std::fs::read_to_string(&changed).unwrap(), "edited by the admin\n");
    // The file it had replaced is kept where the note says.
    assert_eq!(
        std::fs::read_to_string(root.path().join("var/lib/kata-rs/originals/kata-runtime")).unwrap(),
        "old kata-runtime\n"
    );
    assert!(!root.path().join("usr/local/bin/virtiofsd").exists());
    assert_eq!(std::fs::read_to_string(root.path().join(CONFIG)).unwrap(), THIS_MACHINE);
}

#[test]
fn config_edits_made_after_install_are_kept() {
    let root = host(Some(THIS_MACHINE), false);
    install(root.path(), payload().path()).unwrap();
    let path = root.path().join(CONFIG);
    let edited = std::fs::read_to_string(&path).unwrap().replacen("[plugins]", "[plugins]\n  # admin", 1);
    std::fs::write(&path, &edited).unwrap();
    let notes = uninstall(root.path()).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), THIS_MACHINE.replacen("[plugins]", "[plugins]\n  # admin", 1));
    assert!(notes.iter().any(|n| n.contains("config.toml.kata-rs.bak")), "{notes:?}");
}

#[test]
fn an_upgrade_replaces_the_files_and_keeps_the_originals() {
    let root = host(Some(THIS_MACHINE), true);
    let before = snapshot(root.path());
    install(root.path(), payload().path()).unwrap();
    let newer = payload();
    std::fs::write(newer.path().join("bin/kata-runtime"), "newer\n").unwrap();
    install(root.path(), newer.path()).unwrap();
    assert_eq!(std::fs::read_to_string(root.path().join("usr/local/bin/kata-runtime")).unwrap(), "newer\n");
    uninstall(root.path()).unwrap();
    assert_eq!(snapshot(root.path()), before);
}

#[test]
fn uninstall_without_an_install_does_nothing() {
    let root = host(Some(THIS_MACHINE), true);
    let before = snapshot(root.path());
    let containerd = FakeContainerd::up();
    let notes = teardown::uninstall(&opts(root.path()), &containerd).unwrap();
    assert!(notes[0].contains("nothing to uninstall"), "{notes:?}");
    assert_eq!(snapshot(root.path()), before);
    assert_eq!(*containerd.restarts.borrow(), 0);
}

#[test]
fn containerd_is_restarted_only_when_its_config_changes_and_cri_must_come_up() {
    let root = host(Some(THIS_MACHINE), false);
    let payload = payload();
    let containerd = FakeContainerd::up();
    setup::install(payload.path(), &opts(root.path()), &containerd).unwrap();
    setup::install(payload.path(), &opts(root.path()), &containerd).unwrap();
    assert_eq!(*containerd.restarts.borrow(), 1);
    teardown::uninstall(&opts(root.path()), &containerd).unwrap();
    assert_eq!(*containerd.restarts.borrow(), 2);

    let broken = FakeContainerd::up();
    *broken.answers.borrow_mut() = vec!["io.containerd.grpc.v1  cri  linux/amd64  error\n".into()];
    let err = format!("{:#}", setup::install(payload.path(), &opts(root.path()), &broken).unwrap_err());
    assert!(err.contains("CRI plugin is not up") && err.contains("`error`"), "{err}");
    assert!(err.contains("kata-runtime uninstall"), "{err}");
}
