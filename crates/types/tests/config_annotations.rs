//! `io.katacontainers.config.*` annotations: anchored allow-list, path globs, typing, provenance,
//! bounds.

use std::collections::BTreeMap;
use std::path::Path;

use types::config::{HostLimits, LoadedConfig, Origin, SharedFs, DEFAULT_CONFIGURATION};

const FILE: &str = "/etc/kata-containers/configuration.toml";

/// A host for the bounds, so no test depends on the machine it runs on.
const HOST: HostLimits = HostLimits { memory_mib: 24000, cpus: 8 };

fn loaded(hypervisor_keys: &str) -> LoadedConfig {
    LoadedConfig::from_toml(Path::new(FILE), &format!("[hypervisor.qemu]\n{hypervisor_keys}\n")).expect("loads")
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn apply(config: &mut LoadedConfig, pairs: &[(&str, &str)]) {
    config.apply_annotations_with(&annotations(pairs), &HOST).expect("allowed");
}

fn apply_err(config: &mut LoadedConfig, pairs: &[(&str, &str)]) -> String {
    let before = config.clone();
    let err = config.apply_annotations_with(&annotations(pairs), &HOST).expect_err("refused").to_string();
    assert_eq!(*config, before, "a refused annotation changed the configuration");
    err
}

#[test]
fn allowed_annotation_overrides_and_records_origin() {
    let mut config = loaded("enable_annotations = [\"default_memory\"]\ndefault_memory = 512");
    assert_eq!(config.origin("hypervisor.qemu.default_memory").to_string(), format!("{FILE}:3"));
    let name = "io.katacontainers.config.hypervisor.default_memory";
    apply(&mut config, &[(name, "1024")]);
    assert_eq!(config.config.hypervisor.default_memory, 1024);
    assert_eq!(*config.origin("hypervisor.qemu.default_memory"), Origin::Annotation { name: name.to_owned() });
    assert_eq!(config.origin("hypervisor.qemu.default_memory").to_string(), format!("annotation {name}"));
    assert_eq!(*config.origin("hypervisor.qemu.default_vcpus"), Origin::Default);
    let setting = config.settings().into_iter().find(|s| s.key == "hypervisor.qemu.default_memory").expect("listed");
    assert_eq!(setting.value, serde_json::json!(1024));
}

#[test]
fn allow_list_entries_match_whole_names_only() {
    let mut config = loaded("enable_annotations = [\"path\"]\nvalid_virtio_fs_daemon_paths = [\"/usr/local/bin/*\"]");
    let err =
        apply_err(&mut config, &[("io.katacontainers.config.hypervisor.virtio_fs_daemon", "/usr/local/bin/virtiofsd")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.virtio_fs_daemon is not allowed: \
         no entry of hypervisor.qemu.enable_annotations matches \"virtio_fs_daemon\""
    );
    let mut config = loaded("enable_annotations = [\"kernel_.*\"]\nkernel_params = \"a=1\"");
    let name = "io.katacontainers.config.hypervisor.kernel_params";
    apply(&mut config, &[(name, "b=2")]);
    assert_eq!(config.config.hypervisor.kernel_params, "a=1 b=2", "appended, as Kata does");
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.kernel", "/k")]);
    assert!(err.contains("no entry of hypervisor.qemu.enable_annotations matches \"kernel\""), "{err}");
}

#[test]
fn nothing_is_allowed_without_enable_annotations() {
    let mut config = loaded("");
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.default_vcpus", "2")]);
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
    apply(&mut config, &[(name, "/opt/qemu/bin/qemu-system-x86_64")]);
    assert_eq!(config.config.hypervisor.path, "/opt/qemu/bin/qemu-system-x86_64");
    let err = apply_err(&mut config, &[(name, "/tmp/evil/qemu-system-x86_64")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.path: /tmp/evil/qemu-system-x86_64 \
         is not allowed: it matches no glob of hypervisor.qemu.valid_hypervisor_paths"
    );
    // `*` does not cross a directory separator.
    let err = apply_err(&mut config, &[(name, "/opt/qemu/bin/qemu-system-x/evil")]);
    assert!(err.ends_with("it matches no glob of hypervisor.qemu.valid_hypervisor_paths"), "{err}");
    let err = apply_err(&mut config, &[(name, "/opt/qemu/bin/..")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.path: /opt/qemu/bin/.. is not allowed: \
         it must be an absolute path without . or .. components"
    );
    let err = apply_err(&mut config, &[(name, "qemu-system-x86_64")]);
    assert!(err.ends_with("it must be an absolute path without . or .. components"), "{err}");
    // An empty list refuses every path.
    let err =
        apply_err(&mut config, &[("io.katacontainers.config.hypervisor.virtio_fs_daemon", "/usr/local/bin/virtiofsd")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.virtio_fs_daemon: /usr/local/bin/virtiofsd \
         is not allowed: hypervisor.qemu.valid_virtio_fs_daemon_paths is empty, which refuses every path"
    );
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.vsock_daemon", "/x")]);
    assert!(err.contains("hypervisor.qemu.valid_vsock_daemon_paths is empty"), "{err}");
}

#[test]
fn values_are_parsed_with_the_key_type() {
    let mut config = loaded("enable_annotations = [\".*\"]");
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.default_memory", "lots")]);
    assert_eq!(err, "annotation io.katacontainers.config.hypervisor.default_memory: \"lots\" is not an integer");
    let err = apply_err(&mut config, &[("io.katacontainers.config.agent.debug", "yes")]);
    assert_eq!(err, "annotation io.katacontainers.config.agent.debug: \"yes\" is not a boolean (true or false)");
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.default_vcpus", "-1")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.default_vcpus: \
         invalid value: integer `-1`, expected u32"
    );
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.shared_fs", "nfs")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.shared_fs: \
         unknown variant `nfs`, expected `virtio-fs` or `virtio-9p`"
    );
    let err = apply_err(&mut config, &[("io.katacontainers.config.runtime.experimental", "[1]")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.runtime.experimental: \"[1]\" is not \
         a list of strings (a JSON array or space-separated words)"
    );
    apply(
        &mut config,
        &[
            ("io.katacontainers.config.agent.debug", "true"),
            ("io.katacontainers.config.hypervisor.default_max_vcpus", "4"),
            ("io.katacontainers.config.hypervisor.shared_fs", "virtio-9p"),
            ("io.katacontainers.config.hypervisor.virtio_fs_extra_args", r#"["--a", "--b c"]"#),
            ("io.katacontainers.config.runtime.experimental", "x y"),
        ],
    );
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
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.block_device_driver", "x")]);
    assert_eq!(
        err,
        "annotation io.katacontainers.config.hypervisor.block_device_driver is not a setting \
         kata-rs supports"
    );
    // The allow-lists themselves can never be changed by a pod.
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.enable_annotations", "x")]);
    assert!(err.ends_with("is not a setting kata-rs supports"), "{err}");
    let before = config.clone();
    // Not configuration annotations: nothing is read, not even the host's limits.
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
    let mut config = loaded("enable_annotations = [\"default_memory\", 'agent\\.dial_timeout']");
    let err = apply_err(
        &mut config,
        &[
            ("io.katacontainers.config.agent.dial_timeout", "10"),
            ("io.katacontainers.config.hypervisor.default_memory", "x"),
        ],
    );
    assert_eq!(err, "annotation io.katacontainers.config.hypervisor.default_memory: \"x\" is not an integer");
    let err = apply_err(
        &mut config,
        &[
            ("io.katacontainers.config.agent.dial_timeout", "10"),
            ("io.katacontainers.config.hypervisor.default_memory", "100000"),
        ],
    );
    assert!(err.contains("more than the limit of 24000 MiB"), "{err}");
}

fn shipped() -> LoadedConfig {
    LoadedConfig::from_toml(Path::new("configuration-qemu.toml"), DEFAULT_CONFIGURATION)
        .expect("shipped configuration loads")
}

#[test]
fn agent_and_runtime_annotations_need_an_entry_too() {
    let mut config = shipped();
    let refused = [
        ("io.katacontainers.config.agent.debug", "true", "agent.debug"),
        ("io.katacontainers.config.agent.dial_timeout", "100", "agent.dial_timeout"),
        ("io.katacontainers.config.runtime.enable_debug", "true", "runtime.enable_debug"),
        ("io.katacontainers.config.runtime.sandbox_cgroup_only", "true", "runtime.sandbox_cgroup_only"),
    ];
    for (annotation, value, name) in refused {
        assert_eq!(
            apply_err(&mut config, &[(annotation, value)]),
            format!(
                "annotation {annotation} is not allowed: no entry of \
                 hypervisor.qemu.enable_annotations matches \"{name}\""
            )
        );
    }
    // What the shipped list does allow still works.
    apply(&mut config, &[("io.katacontainers.config.hypervisor.default_memory", "512")]);
    assert_eq!(config.config.hypervisor.default_memory, 512);
}

#[test]
fn non_hypervisor_entries_match_the_full_name() {
    let mut config = loaded(r"enable_annotations = ['runtime\..*', 'agent\.dial_timeout', 'debug']");
    apply(
        &mut config,
        &[
            ("io.katacontainers.config.runtime.enable_debug", "true"),
            ("io.katacontainers.config.agent.dial_timeout", "60"),
        ],
    );
    assert!(config.config.runtime.enable_debug);
    assert_eq!(config.config.agent.dial_timeout, 60);
    // "debug" is a hypervisor name; it does not allow agent.debug.
    let err = apply_err(&mut config, &[("io.katacontainers.config.agent.debug", "true")]);
    assert!(err.ends_with("matches \"agent.debug\""), "{err}");
    // Hypervisor names keep Kata's meaning: the entry is matched against the short name only.
    let mut config = loaded(r"enable_annotations = ['hypervisor\.default_memory']");
    let err = apply_err(&mut config, &[("io.katacontainers.config.hypervisor.default_memory", "512")]);
    assert!(err.ends_with("matches \"default_memory\""), "{err}");
}

#[test]
fn annotated_memory_is_bounded_by_maxmemory_and_the_host() {
    let name = "io.katacontainers.config.hypervisor.default_memory";
    let mut config = shipped();
    assert_eq!(
        apply_err(&mut config, &[(name, "1048576")]),
        "annotation io.katacontainers.config.hypervisor.default_memory=1048576: more than the \
         limit of 24000 MiB (hypervisor.qemu.default_maxmemory = 0: the host's memory)"
    );
    assert_eq!(
        apply_err(&mut config, &[(name, "63")]),
        "annotation io.katacontainers.config.hypervisor.default_memory=63: less than the minimum \
         of 64 MiB"
    );
    apply(&mut config, &[(name, "24000")]);
    apply(&mut config, &[(name, "64")]);

    let mut config = loaded("enable_annotations = [\"default_memory\"]\ndefault_maxmemory = 4096");
    assert_eq!(
        apply_err(&mut config, &[(name, "4097")]),
        format!(
            "annotation io.katacontainers.config.hypervisor.default_memory=4097: more than the \
             limit of 4096 MiB (hypervisor.qemu.default_maxmemory = 4096 from {FILE}:3)"
        )
    );
    apply(&mut config, &[(name, "4096")]);

    let mut config = loaded("enable_annotations = [\"default_memory\"]\ndefault_maxmemory = 100000");
    assert_eq!(
        apply_err(&mut config, &[(name, "24001")]),
        format!(
            "annotation io.katacontainers.config.hypervisor.default_memory=24001: more than the \
             limit of 24000 MiB (the host's memory: hypervisor.qemu.default_maxmemory = 100000 \
             from {FILE}:3 is more)"
        )
    );
}

#[test]
fn annotated_vcpus_are_bounded_by_maxvcpus_and_the_host() {
    let vcpus = "io.katacontainers.config.hypervisor.default_vcpus";
    let max = "io.katacontainers.config.hypervisor.default_max_vcpus";
    let mut config = loaded("enable_annotations = [\"default_vcpus\", \"default_max_vcpus\"]");
    assert_eq!(
        apply_err(&mut config, &[(vcpus, "9")]),
        "annotation io.katacontainers.config.hypervisor.default_vcpus=9: more than the limit of \
         8 vCPUs (hypervisor.qemu.default_maxvcpus = 0: the host's CPUs)"
    );
    assert_eq!(
        apply_err(&mut config, &[(vcpus, "0")]),
        "annotation io.katacontainers.config.hypervisor.default_vcpus=0: less than the minimum \
         of 1 vCPU"
    );
    assert_eq!(
        apply_err(&mut config, &[(max, "9")]),
        "annotation io.katacontainers.config.hypervisor.default_max_vcpus=9: more than the limit \
         of 8 vCPUs (the host's CPUs)"
    );
    // The annotated maximum bounds the annotated count.
    assert_eq!(
        apply_err(&mut config, &[(max, "2"), (vcpus, "3")]),
        "annotation io.katacontainers.config.hypervisor.default_vcpus=3: more than the limit of \
         2 vCPUs (hypervisor.qemu.default_maxvcpus = 2 from annotation \
         io.katacontainers.config.hypervisor.default_max_vcpus)"
    );
    apply(&mut config, &[(max, "2"), (vcpus, "2")]);
    assert_eq!(config.config.hypervisor.default_vcpus, 2);

    let mut config = loaded(
        "enable_annotations = [\"default_vcpus\", \"default_max_vcpus\"]\ndefault_maxvcpus = 4\n\
         default_vcpus = 3",
    );
    assert_eq!(
        apply_err(&mut config, &[(vcpus, "5")]),
        format!(
            "annotation io.katacontainers.config.hypervisor.default_vcpus=5: more than the limit \
             of 4 vCPUs (hypervisor.qemu.default_maxvcpus = 4 from {FILE}:3)"
        )
    );
    assert_eq!(
        apply_err(&mut config, &[(max, "2")]),
        format!(
            "annotation io.katacontainers.config.hypervisor.default_max_vcpus=2: less than \
             hypervisor.qemu.default_vcpus = 3 from {FILE}:4"
        )
    );
    let mut config = loaded("enable_annotations = [\"default_vcpus\"]\ndefault_maxvcpus = 16");
    assert_eq!(
        apply_err(&mut config, &[(vcpus, "9")]),
        format!(
            "annotation io.katacontainers.config.hypervisor.default_vcpus=9: more than the limit \
             of 8 vCPUs (the host's CPUs: hypervisor.qemu.default_maxvcpus = 16 from {FILE}:3 is \
             more)"
        )
    );
}

#[test]
fn annotated_dial_timeout_is_capped() {
    let name = "io.katacontainers.config.agent.dial_timeout";
    let mut config = loaded(r"enable_annotations = ['agent\.dial_timeout']");
    assert_eq!(
        apply_err(&mut config, &[(name, "121")]),
        "annotation io.katacontainers.config.agent.dial_timeout=121: more than the limit of \
         120 s (the most a pod may ask for)"
    );
    assert_eq!(
        apply_err(&mut config, &[(name, "0")]),
        "annotation io.katacontainers.config.agent.dial_timeout=0: less than the minimum of 1 s"
    );
    apply(&mut config, &[(name, "120")]);
    assert_eq!(config.config.agent.dial_timeout, 120);
}

#[test]
fn apply_annotations_reads_this_hosts_limits() {
    let mut config = shipped();
    let name = "io.katacontainers.config.hypervisor.default_memory";
    config.apply_annotations(&annotations(&[(name, "128")])).expect("128 MiB fits on any host that builds this");
    let err =
        config.apply_annotations(&annotations(&[(name, "4294967295")])).expect_err("no host has 4 PiB").to_string();
    assert!(err.starts_with(&format!("annotation {name}=4294967295: more than the limit of ")), "{err}");
    assert!(err.ends_with(" MiB (hypervisor.qemu.default_maxmemory = 0: the host's memory)"), "{err}");
}

#[test]
fn vm_annotated_says_whether_an_annotation_shapes_the_vm() {
    let mut config = loaded(r"enable_annotations = ['.*']");
    assert!(!config.vm_annotated());
    apply(
        &mut config,
        &[
            ("io.katacontainers.config.agent.dial_timeout", "60"),
            ("io.katacontainers.config.runtime.sandbox_cgroup_only", "true"),
            ("io.kubernetes.cri.container-type", "sandbox"),
        ],
    );
    assert!(!config.vm_annotated(), "neither changes the VM");
    for (name, value) in [
        ("io.katacontainers.config.hypervisor.default_memory", "2048"),
        ("io.katacontainers.config.hypervisor.kernel_params", "a=1"),
        ("io.katacontainers.config.agent.debug", "true"),
        ("io.katacontainers.config.runtime.enable_debug", "false"),
    ] {
        let mut config = loaded(r"enable_annotations = ['.*']");
        apply(&mut config, &[(name, value)]);
        assert!(config.vm_annotated(), "{name}");
    }
}
