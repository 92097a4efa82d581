//! The files under `config/`: every containerd snippet is valid TOML with the keys the how-to names, in
//! its own format only, and (as root) a containerd 1.6 with the snippet merged into a private config
//! loads the CRI plugin. The CNI and Kubernetes files match what the tests and docs say.

use std::path::PathBuf;
use std::process::Command;

use e2e::config_files::{cri_plugin, merge, private_cri_config};
use e2e::{Containerd, ContainerdOptions};
use toml::{Table, Value};

/// The repository's `config/` directory.
fn config_dir() -> PathBuf {
    testutil::package_dir().join("../../config")
}

/// The CRI plugin's table name in each format.
fn cri_key(version: i64) -> &'static str {
    cri_plugin(version)
}

/// Every containerd snippet: (format version, file name).
fn containerd_files() -> Vec<(i64, String)> {
    let mut files = Vec::new();
    for version in [1, 2] {
        let dir = config_dir().join(format!("containerd/v{version}"));
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        files.extend(names.into_iter().map(|n| (version, n)));
    }
    files
}

fn load(version: i64, name: &str) -> Table {
    let path = config_dir().join(format!("containerd/v{version}/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse::<Table>().unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()))
}

/// The value at a dotted path of table keys (keys given separately, so they may contain dots).
fn get<'a>(table: &'a Table, path: &[&str]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut t = table;
    for key in parents {
        t = t.get(*key)?.as_table()?;
    }
    t.get(*last)
}

fn get_str<'a>(table: &'a Table, path: &[&str]) -> &'a str {
    get(table, path).and_then(Value::as_str).unwrap_or_else(|| panic!("missing string {path:?}"))
}

#[test]
fn containerd_snippets_have_the_expected_keys_in_their_own_format() {
    let files = containerd_files();
    let names: Vec<String> = files.iter().map(|(v, n)| format!("v{v}/{n}")).collect();
    for expected in [
        "v1/runtimeclass.toml",
        "v1/untrusted.toml",
        "v1/default.toml",
        "v2/runtimeclass.toml",
        "v2/untrusted.toml",
        "v2/default.toml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing: {names:?}");
    }
    for (version, name) in files {
        let t = load(version, &name);
        let what = format!("v{version}/{name}");
        assert_eq!(get(&t, &["version"]).and_then(Value::as_integer), Some(version), "{what}: version");
        // The how-to mixes `plugins.cri` and `plugins."io.containerd.grpc.v1.cri"` in one snippet;
        // containerd reads only the one matching the file's version, so ours never mix.
        let plugins = t.get("plugins").and_then(Value::as_table).unwrap_or_else(|| panic!("{what}: no [plugins]"));
        let keys: Vec<&String> = plugins.keys().collect();
        assert_eq!(keys, [cri_key(version)], "{what}: plugin tables");
        let c: [&'static str; 3] = ["plugins", cri_key(version), "containerd"];
        let at = |rest: &[&'static str]| -> Vec<&'static str> { c.iter().chain(rest).copied().collect() };
        match name.as_str() {
            "runtimeclass.toml" | "default.toml" => {
                let default = if name == "default.toml" { "kata" } else { "runc" };
                assert_eq!(get_str(&t, &at(&["default_runtime_name"])), default, "{what}");
                assert_eq!(get_str(&t, &at(&["runtimes", "kata", "runtime_type"])), "io.containerd.kata.v2", "{what}");
                assert_eq!(
                    get(&t, &at(&["runtimes", "kata", "privileged_without_host_devices"])),
                    Some(&Value::Boolean(true)),
                    "{what}"
                );
                assert_eq!(
                    get_str(&t, &at(&["runtimes", "kata", "options", "ConfigPath"])),
                    "/etc/kata-containers/configuration.toml",
                    "{what}"
                );
            }
            "untrusted.toml" => {
                assert_eq!(
                    get_str(&t, &at(&["untrusted_workload_runtime", "runtime_type"])),
                    "io.containerd.kata.v2",
                    "{what}"
                );
                assert_eq!(get_str(&t, &at(&["default_runtime_name"])), "runc", "{what}");
            }
            "default-legacy.toml" => {
                assert_eq!(get_str(&t, &at(&["default_runtime", "runtime_type"])), "io.containerd.kata.v2", "{what}")
            }
            "katafc.toml" => assert_eq!(
                get_str(&t, &at(&["runtimes", "katafc", "runtime_type"])),
                "io.containerd.katafc.v2",
                "{what}"
            ),
            "katacli.toml" => {
                assert_eq!(
                    get_str(&t, &at(&["runtimes", "katacli", "runtime_type"])),
                    "io.containerd.runc.v1",
                    "{what}"
                );
                assert_eq!(
                    get_str(&t, &at(&["runtimes", "katacli", "options", "BinaryName"])),
                    "/usr/bin/kata-runtime",
                    "{what}"
                );
                assert_eq!(get_str(&t, &at(&["default_runtime_name"])), "runc", "{what}");
            }
            "runtime-engine.toml" => {
                assert_eq!(
                    get_str(&t, &at(&["untrusted_workload_runtime", "runtime_type"])),
                    "io.containerd.runtime.v1.linux",
                    "{what}"
                );
                assert_eq!(
                    get_str(&t, &at(&["untrusted_workload_runtime", "runtime_engine"])),
                    "/usr/bin/kata-runtime",
                    "{what}"
                );
            }
            other => panic!("{what}: no expectations for {other}; add them here"),
        }
        if let Some(runtimes) = get(&t, &at(&["runtimes"])).and_then(Value::as_table) {
            if let Some(runc) = runtimes.get("runc") {
                assert_eq!(runc.get("runtime_type").and_then(Value::as_str), Some("io.containerd.runc.v2"));
            }
        }
    }
}

#[test]
fn cni_files_are_the_ones_the_tests_use() {
    let read = |name: &str| -> serde_json::Value {
        let path = config_dir().join("cni").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    assert_eq!(read("10-mynet.conf"), e2e::cri::bridge_conf("cni0", "172.19.0.0/24", None));
    assert_eq!(read("99-loopback.conf"), e2e::cri::loopback_conf());
}

#[test]
fn runtimeclass_names_the_kata_handler_with_overhead() {
    let path = config_dir().join("kubernetes/runtimeclass.yaml");
    let text = std::fs::read_to_string(&path).expect("runtimeclass.yaml");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).map(str::trim).collect();
    for expected in [
        "apiVersion: node.k8s.io/v1",
        "kind: RuntimeClass",
        "name: kata",
        "handler: kata",
        "overhead:",
        "podFixed:",
        "memory: \"160Mi\"",
        "cpu: \"250m\"",
    ] {
        assert!(lines.contains(&expected), "{expected:?} missing in {}", path.display());
    }
}

#[test]
fn katafc_wrapper_sets_the_config_and_execs_the_shim() {
    use std::os::unix::fs::PermissionsExt;
    let path = config_dir().join("shim/containerd-shim-katafc-v2");
    let text = std::fs::read_to_string(&path).expect("wrapper");
    assert!(text.starts_with("#!/bin/sh\n"));
    assert!(text.contains("export KATA_CONF_FILE="));
    assert!(text.trim_end().ends_with("exec containerd-shim-kata-v2 \"$@\""));
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert!(mode & 0o111 != 0, "{} is not executable", path.display());
    let syntax = Command::new("sh").arg("-n").arg(&path).status().expect("sh -n");
    assert!(syntax.success());
}

/// A complete private config of format `version` (CNI config in the test directory) with `snippet` merged over it.
fn merged_config(version: i64, snippet: Table) -> String {
    let mut table = private_cri_config(version, "{dir}/cni");
    merge(&mut table, snippet);
    toml::to_string(&table).expect("config serializes")
}

/// Pieces of the CRI plugin's "Start cri plugin with config {...}" log line that show the snippet took
/// effect (a plugin table under the wrong name would be ignored and the plugin would still load).
fn effective(name: &str) -> &'static [&'static str] {
    match name {
        "runtimeclass.toml" => &[
            "DefaultRuntimeName:runc",
            "kata:{Type:io.containerd.kata.v2",
            "PrivilegedWithoutHostDevices:true",
            "ConfigPath:/etc/kata-containers/configuration.toml",
        ],
        "default.toml" => &["DefaultRuntimeName:kata", "kata:{Type:io.containerd.kata.v2"],
        "untrusted.toml" => &["DefaultRuntimeName:runc", "untrusted:{Type:io.containerd.kata.v2"],
        "default-legacy.toml" => &["DefaultRuntimeName:default", "default:{Type:io.containerd.kata.v2"],
        "katafc.toml" => &["katafc:{Type:io.containerd.katafc.v2"],
        "katacli.toml" => &["katacli:{Type:io.containerd.runc.v1", "BinaryName:/usr/bin/kata-runtime"],
        "runtime-engine.toml" => &["untrusted:{Type:io.containerd.runtime.v1.linux", "Engine:/usr/bin/kata-runtime"],
        "broken.toml" => &[],
        other => panic!("no expectations for {other}; add them here"),
    }
}

/// Loads `snippet` (format `version`) into a private containerd; returns whether the CRI plugin is ok,
/// and the errors found.
fn check_loads(version: i64, name: &str, snippet: Table) -> (bool, Vec<String>) {
    let what = format!("v{version}/{name}");
    let mut failures = Vec::new();
    let text = merged_config(version, snippet);
    let containerd =
        match Containerd::start(ContainerdOptions { config_text: Some(text), ..ContainerdOptions::default() }) {
            Ok(c) => c,
            Err(e) => return (false, vec![format!("{what}: containerd did not start: {e}")]),
        };
    let plugins = containerd.ctr_ok(["plugins", "ls"]).expect("ctr plugins ls");
    let cri = plugins.lines().find(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.first() == Some(&"io.containerd.grpc.v1") && cols.get(1) == Some(&"cri")
    });
    let log = containerd.log();
    for w in log.lines().filter(|l| l.contains("level=warning")) {
        eprintln!("{what}:   {w}");
    }
    eprintln!("{what}: {}", cri.unwrap_or("no cri plugin line").trim_end());
    let ok = cri.is_some_and(|l| l.split_whitespace().last() == Some("ok"));
    if ok {
        let started = log.lines().find(|l| l.contains("Start cri plugin with config")).unwrap_or_default();
        for piece in effective(name).iter().chain(&["RestrictOOMScoreAdj:true"]) {
            if !started.contains(piece) {
                failures.push(format!("{what}: the CRI config in effect lacks {piece}: {started}"));
            }
        }
    } else {
        failures.push(format!("{what}: CRI plugin not ok: {cri:?}; log tail:\n{}", containerd.log_tail(15)));
    }
    let report = containerd.stop();
    assert!(report.remaining.is_empty(), "{what}: left {}", report.remaining);
    (ok, failures)
}

#[test]
fn containerd_rejects_a_default_runtime_without_a_runtime_table() {
    testutil::skip_unless!(e2e::skip_reason());
    // The negative control for the test below: a CRI config error shows as a CRI plugin not "ok".
    let snippet: Table = r#"[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "kata""#
        .parse()
        .expect("toml");
    let (ok, _) = check_loads(2, "broken.toml", snippet);
    assert!(!ok, "containerd accepted default_runtime_name without runtimes.kata");
}

#[test]
fn containerd_loads_the_cri_plugin_with_each_snippet() {
    testutil::skip_unless!(e2e::skip_reason());
    let mut failures = Vec::new();
    for (version, name) in containerd_files() {
        failures.extend(check_loads(version, &name, load(version, &name)).1);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
