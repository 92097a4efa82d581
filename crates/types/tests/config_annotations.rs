//! `io.katacontainers.config.*` annotations: anchored allow-list, path globs, typing, provenance.

use std::collections::BTreeMap;
use std::path::Path;

use types::config::{LoadedConfig, Origin, SharedFs};

const FILE: &str = "/etc/kata-containers/configuration.toml";

fn loaded(hypervisor_keys: &str) -> LoadedConfig {
    LoadedConfig::from_toml(
        Path::new(FILE),
        &format!("[hypervisor.qemu]\n{hypervisor_keys}\n"),
    )
    .expect("loads")
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn apply_err(config: &mut LoadedConfig, pairs: &[(&str, &str)]) -> String {
    config
        .apply_annotations(&annotations(pairs))
        .expect_err("refused")
        .to_string()
}

#[test]
fn allowed_annotation_overrides_and_records_origin() {
    let mut config = loaded("enable_annotations = [\"default_memory\"]\ndefault_memory = 512");
    assert_eq!(
        config.origin("hypervisor.qemu.default_memory").to_string(),
        format!("{FILE}:3")
    );
    let name = "io.katacontainers.config.hypervisor.default_memory";
    config
        .apply_annotations(&annotations(&[(name, "1024")]))
        .expect("allowed");
    assert_eq!(config.config.hypervisor.default_memory, 1024);
    assert_eq!(
        *config.origin("hypervisor.qemu.default_memory"),
        Origin::Annotation {
            name: name.to_owned()
        }
    );
    assert_eq!(
        config.origin("hypervisor.qemu.default_memory").to_string(),
        format!("annotation {name}")
    );
    assert_eq!(
        *config.origin("hypervisor.qemu.default_vcpus"),
        Origin::Default
    );
    let setting = config
        .settings()
        .into_iter()
        .find(|s| s.key == "hypervisor.qemu.default_memory")
        .expect("listed");
    assert_eq!(setting.value, serde_json::json!(1024));
}

#[test]
fn allow_list_entries_match_whole_names_only() {
    let mut config = loaded(
        "enable_annotations = [\"path\"]\nvalid_virtio_fs_daemon_paths = [\"/usr/local/bin/*\"]",
    );
    let err = apply_err(
        &mut config,
        &[(
            "io.katacontainers.config.hypervisor.virtio_fs_daemon",
            "/usr/local/bin/virtiofsd",
        )],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.virtio_fs_daemon is not allowed: \
         no entry of hypervisor.qemu.enable_annotations matches \"virtio_fs_daemon\""
    );
    let mut config = loaded("enable_annotations = [\"kernel_.*\"]\nkernel_params = \"a=1\"");
    let name = "io.katacontainers.config.hypervisor.kernel_params";
    config
        .apply_annotations(&annotations(&[(name, "b=2")]))
        .expect("kernel_.* allows it");
    assert_eq!(
        config.config.hypervisor.kernel_params, "a=1 b=2",
        "appended, as Kata does"
    );
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.hypervisor.kernel", "/k")],
    );
    assert!(
        err.contains("no entry of hypervisor.qemu.enable_annotations matches \"kernel\""),
        "{err}"
    );
}

#[test]
fn nothing_is_allowed_without_enable_annotations() {
    let mut config = loaded("");
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.hypervisor.default_vcpus", "2")],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.default_vcpus is not allowed: \
         no entry of hypervisor.qemu.enable_annotations matches \"default_vcpus\""
    );
}

#[test]
fn paths_must_match_the_valid_paths_globs() {
    let mut config = loaded(
        "enable_annotations = [\"path\", \"virtio_fs_daemon\", \"vsock_daemon\"]\n\
         valid_hypervisor_paths = [\"/opt/qemu/bin/qemu-system-*\"]",
    );
    let name = "io.katacontainers.config.hypervisor.path";
    config
        .apply_annotations(&annotations(&[(name, "/opt/qemu/bin/qemu-system-x86_64")]))
        .expect("matches the glob");
    assert_eq!(
        config.config.hypervisor.path,
        "/opt/qemu/bin/qemu-system-x86_64"
    );
    let err = apply_err(&mut config, &[(name, "/tmp/evil/qemu-system-x86_64")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.path: /tmp/evil/qemu-system-x86_64 \
         is not allowed: it matches no glob of hypervisor.qemu.valid_hypervisor_paths"
    );
    // `*` does not cross a directory separator.
    let err = apply_err(&mut config, &[(name, "/opt/qemu/bin/qemu-system-x/evil")]);
    assert!(
        err.ends_with("it matches no glob of hypervisor.qemu.valid_hypervisor_paths"),
        "{err}"
    );
    let err = apply_err(&mut config, &[(name, "/opt/qemu/bin/..")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.path: /opt/qemu/bin/.. is not allowed: \
         it must be an absolute path without . or .. components"
    );
    let err = apply_err(&mut config, &[(name, "qemu-system-x86_64")]);
    assert!(
        err.ends_with("it must be an absolute path without . or .. components"),
        "{err}"
    );
    // An empty list refuses every path.
    let err = apply_err(
        &mut config,
        &[(
            "io.katacontainers.config.hypervisor.virtio_fs_daemon",
            "/usr/local/bin/virtiofsd",
        )],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.virtio_fs_daemon: /usr/local/bin/virtiofsd \
         is not allowed: hypervisor.qemu.valid_virtio_fs_daemon_paths is empty, which refuses every path"
    );
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.hypervisor.vsock_daemon", "/x")],
    );
    assert!(
        err.contains("hypervisor.qemu.valid_vsock_daemon_paths is empty"),
        "{err}"
    );
}

#[test]
fn values_are_parsed_with_the_key_type() {
    let mut config = loaded("enable_annotations = [\".*\"]");
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.hypervisor.default_memory", "lots")],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.default_memory: \"lots\" is not an integer"
    );
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.agent.debug", "yes")],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.agent.debug: \"yes\" is not a boolean (true or false)"
    );
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.hypervisor.default_vcpus", "-1")],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.default_vcpus: \
         invalid value: integer `-1`, expected u32"
    );
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.hypervisor.shared_fs", "nfs")],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.shared_fs: \
         unknown variant `nfs`, expected `virtio-fs` or `virtio-9p`"
    );
    let err = apply_err(
        &mut config,
        &[("io.katacontainers.config.runtime.experimental", "[1]")],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.runtime.experimental: \"[1]\" is not \
         a list of strings (a JSON array or space-separated words)"
    );
    config
        .apply_annotations(&annotations(&[
            ("io.katacontainers.config.agent.debug", "true"),
            ("io.katacontainers.config.hypervisor.default_max_vcpus", "4"),
            ("io.katacontainers.config.hypervisor.shared_fs", "virtio-9p"),
            (
                "io.katacontainers.config.hypervisor.virtio_fs_extra_args",
                r#"["--a", "--b c"]"#,
            ),
            ("io.katacontainers.config.runtime.experimental", "x y"),
        ]))
        .expect("well-typed");
    let c = &config.config;
    assert!(c.agent.debug);
    assert_eq!(c.hypervisor.default_maxvcpus, 4);
    assert_eq!(c.hypervisor.shared_fs, SharedFs::Virtio9p);
    assert_eq!(c.hypervisor.virtio_fs_extra_args, ["--a", "--b c"]);
    assert_eq!(c.runtime.experimental, ["x", "y"]);
}

#[test]
fn unknown_config_annotations_are_errors_and_others_are_ignored() {
    let mut config = loaded("enable_annotations = [\".*\"]");
    let err = apply_err(
        &mut config,
        &[(
            "io.katacontainers.config.hypervisor.block_device_driver",
            "x",
        )],
    );
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.block_device_driver is not a setting \
         kata-rs supports"
    );
    // The allow-lists themselves can never be changed by a pod.
    let err = apply_err(
        &mut config,
        &[(
            "io.katacontainers.config.hypervisor.enable_annotations",
            "x",
        )],
    );
    assert!(err.ends_with("is not a setting kata-rs supports"), "{err}");
    let before = config.clone();
    config
        .apply_annotations(&annotations(&[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.katacontainers.config_path", "/x.toml"),
        ]))
        .expect("not ours");
    assert_eq!(config, before);
}

#[test]
fn a_refused_annotation_changes_nothing() {
    let mut config = loaded("enable_annotations = [\"default_memory\"]");
    let before = config.clone();
    let err = apply_err(
        &mut config,
        &[
            ("io.katacontainers.config.agent.dial_timeout", "10"),
            ("io.katacontainers.config.hypervisor.default_memory", "x"),
        ],
    );
    assert!(err.contains("is not an integer"), "{err}");
    assert_eq!(config, before);
}
