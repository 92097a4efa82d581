//! Loading: precedence, drop-ins, provenance, unknown/ignored keys, type and syntax errors,
//! validation.

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use types::config::{
    Accel, ConfigError, ConfigSearch, LoadedConfig, Origin, SharedFs, DEFAULT_CONFIGURATION, DEFAULT_SECCOMP_SANDBOX,
};

fn write(path: &Path, text: &str) -> PathBuf {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).expect("mkdir");
    }
    fs::write(path, text).expect("write");
    path.to_owned()
}

fn memory_file(dir: &Path, name: &str, mib: u32) -> PathBuf {
    write(&dir.join(name), &format!("[hypervisor.qemu]\ndefault_memory = {mib}\n"))
}

fn load_text(text: &str) -> Result<LoadedConfig, ConfigError> {
    LoadedConfig::from_toml(Path::new("/etc/kata-containers/configuration.toml"), text)
}

fn file_origin(path: &Path, line: usize) -> Origin {
    Origin::File { path: path.to_owned(), line }
}

#[test]
fn precedence_config_path_then_env_then_etc_then_usr_share() {
    let dir = TempDir::new().expect("tempdir");
    let config_path = memory_file(&dir.path().join("cp"), "c.toml", 1);
    let env = memory_file(&dir.path().join("env"), "c.toml", 2);
    let etc = memory_file(&dir.path().join("etc"), "configuration.toml", 3);
    let usr = memory_file(&dir.path().join("usr"), "configuration.toml", 4);
    let mut search = ConfigSearch {
        config_path: Some(config_path.clone()),
        env_conf_file: Some(env.clone()),
        defaults: vec![etc.clone(), usr.clone()],
    };
    let memory = |search: &ConfigSearch| {
        let loaded = search.load().expect("loads");
        (loaded.config.hypervisor.default_memory, loaded.files[0].clone())
    };
    assert_eq!(memory(&search), (1, config_path));
    search.config_path = None;
    assert_eq!(memory(&search), (2, env));
    search.env_conf_file = None;
    assert_eq!(memory(&search), (3, etc.clone()));
    fs::remove_file(&etc).expect("rm");
    assert_eq!(memory(&search), (4, usr));
}

#[test]
fn missing_explicit_files_do_not_fall_through() {
    let dir = TempDir::new().expect("tempdir");
    let etc = memory_file(dir.path(), "configuration.toml", 3);
    let missing = dir.path().join("nope.toml");
    let search = ConfigSearch { config_path: Some(missing.clone()), env_conf_file: None, defaults: vec![etc.clone()] };
    let err = search.load().expect_err("missing ConfigPath");
    assert_eq!(
        err.to_string(),
        format!(
            "configuration file {} named by containerd's ConfigPath runtime option does not exist",
            missing.display()
        )
    );
    let search = ConfigSearch { config_path: None, env_conf_file: Some(missing.clone()), ..search };
    let err = search.load().expect_err("missing KATA_CONF_FILE");
    assert_eq!(
        err.to_string(),
        format!(
            "configuration file {} named by the KATA_CONF_FILE environment variable does not exist",
            missing.display()
        )
    );
}

#[test]
fn no_file_found_lists_what_was_tried() {
    let search = ConfigSearch {
        config_path: None,
        env_conf_file: None,
        defaults: vec!["/nonexistent/a.toml".into(), "/nonexistent/b.toml".into()],
    };
    let err = search.load().expect_err("nothing there");
    assert_eq!(err.to_string(), "no configuration file found; tried /nonexistent/a.toml, /nonexistent/b.toml");
}

#[test]
fn standard_search_uses_the_documented_defaults() {
    let search = ConfigSearch::standard(Some(PathBuf::from("/x.toml")));
    assert_eq!(search.config_path, Some(PathBuf::from("/x.toml")));
    assert_eq!(
        search.defaults,
        [
            PathBuf::from("/etc/kata-containers/configuration.toml"),
            PathBuf::from("/usr/share/defaults/kata-containers/configuration.toml"),
        ]
    );
    assert_eq!(ConfigSearch::standard(Some(PathBuf::new())).config_path, None);
}

#[test]
fn drop_ins_apply_in_file_name_order_key_by_key() {
    let dir = TempDir::new().expect("tempdir");
    let main = write(
        &dir.path().join("configuration.toml"),
        "[hypervisor.qemu]\ndefault_memory = 512\nkernel_params = \"a=1\"\n",
    );
    let d = dir.path().join("config.d");
    let later = write(&d.join("20-later.toml"), "[hypervisor.qemu]\ndefault_memory = 2000\n");
    let earlier =
        write(&d.join("10-earlier.toml"), "[hypervisor.qemu]\ndefault_memory = 1000\nmachine_type = \"microvm\"\n");
    write(&d.join("30-ignored.toml.bak"), "garbage = = =");
    write(&d.join(".hidden.toml"), "garbage = = =");
    let search = ConfigSearch { config_path: Some(main.clone()), ..ConfigSearch::default() };
    let loaded = search.load().expect("loads");
    assert_eq!(loaded.files, [main.clone(), earlier.clone(), later.clone()]);
    let hv = &loaded.config.hypervisor;
    assert_eq!(hv.default_memory, 2000);
    assert_eq!(hv.machine_type, "microvm");
    assert_eq!(hv.kernel_params, "a=1");
    assert_eq!(*loaded.origin("hypervisor.qemu.default_memory"), file_origin(&later, 2));
    assert_eq!(*loaded.origin("hypervisor.qemu.machine_type"), file_origin(&earlier, 3));
    assert_eq!(*loaded.origin("hypervisor.qemu.kernel_params"), file_origin(&main, 3));
}

#[test]
fn errors_in_drop_ins_name_the_drop_in() {
    let dir = TempDir::new().expect("tempdir");
    let main = write(&dir.path().join("configuration.toml"), "[runtime]\n");
    let bad = write(&dir.path().join("config.d/50-bad.toml"), "\n[runtime]\nenable_debug = 1\n");
    let search = ConfigSearch { config_path: Some(main), ..ConfigSearch::default() };
    let err = search.load().expect_err("type error");
    assert_eq!(
        err.to_string(),
        format!("{}:3: runtime.enable_debug: invalid type: integer `1`, expected a boolean", bad.display())
    );
}

#[test]
fn provenance_default_file_and_settings() {
    let loaded = load_text("[hypervisor.qemu]\n\nkernel = \"/k\"\n").expect("loads");
    assert_eq!(loaded.origin("hypervisor.qemu.kernel").to_string(), "/etc/kata-containers/configuration.toml:3");
    assert_eq!(*loaded.origin("hypervisor.qemu.initrd"), Origin::Default);
    let settings = loaded.settings();
    let kernel = settings.iter().find(|s| s.key == "hypervisor.qemu.kernel").expect("kernel");
    assert_eq!(kernel.value, serde_json::json!("/k"));
    let memory = settings.iter().find(|s| s.key == "hypervisor.qemu.default_memory").expect("mem");
    assert_eq!(memory.value, serde_json::json!(2048));
    assert_eq!(memory.origin, Origin::Default);
    assert_eq!(settings.len(), loaded.origins.len());
    let json = serde_json::to_value(kernel).expect("serializable");
    assert_eq!(
        json,
        serde_json::json!({"key": "hypervisor.qemu.kernel", "value": "/k", "origin":
            {"source": "file", "path": "/etc/kata-containers/configuration.toml", "line": 3}})
    );
    serde_json::to_string(&loaded).expect("LoadedConfig serializes");
}

#[test]
fn kata_defaults_fill_absent_keys() {
    let c = load_text("").expect("loads").config;
    assert_eq!(c.hypervisor.path, "/usr/bin/qemu-system-x86_64");
    assert_eq!(c.hypervisor.kernel, "/usr/share/kata-containers/vmlinux.container");
    assert_eq!(c.hypervisor.initrd, "/usr/share/kata-containers/kata-containers-initrd.img");
    assert_eq!(c.hypervisor.virtio_fs_daemon, "/usr/local/bin/virtiofsd");
    assert_eq!(c.hypervisor.vsock_daemon, "/usr/local/bin/vhost-device-vsock");
    assert_eq!((c.hypervisor.default_vcpus, c.hypervisor.default_maxvcpus), (1, 0));
    assert_eq!(c.hypervisor.default_memory, 2048);
    assert_eq!(c.hypervisor.machine_type, "q35");
    assert_eq!(c.hypervisor.shared_fs, SharedFs::VirtioFs);
    assert_eq!(c.hypervisor.accel, Accel::Auto);
    assert_eq!(c.agent.dial_timeout, 45);
}

#[test]
fn unknown_key_is_an_error_with_file_line_and_key() {
    let err = load_text("[hypervisor.qemu]\npath = \"/q\"\nkernal = \"/k\"\n").expect_err("typo");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:3: hypervisor.qemu.kernal: unknown configuration key"
    );
    let err = load_text("\n[hypervisors]\nx = 1\n").expect_err("unknown section");
    assert_eq!(err.to_string(), "/etc/kata-containers/configuration.toml:2: hypervisors: unknown configuration key");
}

#[test]
fn other_hypervisors_and_agents_are_refused() {
    let err = load_text("[hypervisor.clh]\npath = \"/c\"\n").expect_err("clh");
    assert_eq!(err.to_string(), "/etc/kata-containers/configuration.toml:1: [hypervisor.clh]: only qemu is supported");
    let err = load_text("[agent.other]\n").expect_err("agent");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:1: [agent.other]: only the kata agent is supported"
    );
}

#[test]
fn known_kata_keys_we_ignore_are_warnings() {
    let text = "[hypervisor.qemu]\nblock_device_driver = \"virtio-scsi\"\nenable_iothreads = false\n\
                [agent.kata]\nenable_debug = true\n[netmon]\nenable_netmon = false\n";
    let loaded = load_text(text).expect("loads");
    assert_eq!(
        loaded.warnings,
        [
            "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.block_device_driver: \
             Kata setting not implemented by kata-rs; ignored",
            "/etc/kata-containers/configuration.toml:3: hypervisor.qemu.enable_iothreads: \
             Kata setting not implemented by kata-rs; ignored",
            "/etc/kata-containers/configuration.toml:7: netmon.enable_netmon: \
             Kata setting not implemented by kata-rs; ignored",
        ]
    );
    // Kata's spelling of agent.kata.debug is accepted.
    assert!(loaded.config.agent.debug);
    assert_eq!(loaded.origin("agent.kata.debug").to_string(), "/etc/kata-containers/configuration.toml:5");
}

#[test]
fn wrong_type_is_an_error_with_file_line_and_key() {
    let err = load_text("[hypervisor.qemu]\n\ndefault_memory = \"2048\"\n").expect_err("string");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:3: hypervisor.qemu.default_memory: \
         invalid type: string \"2048\", expected u32"
    );
    let err = load_text("[hypervisor.qemu]\nshared_fs = \"virtio-blk\"\n").expect_err("variant");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.shared_fs: \
         unknown variant `virtio-blk`, expected `virtio-fs` or `virtio-9p`"
    );
    let err = load_text("[runtime]\ninternetworking_model = \"macvtap\"\n").expect_err("model");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:2: runtime.internetworking_model: \
         unknown variant `macvtap`, expected `tcfilter` or `none`"
    );
}

#[test]
fn malformed_toml_is_an_error_with_file_and_line() {
    let err = load_text("[hypervisor.qemu]\npath = \"/q\"\nkernel = = \"/k\"\n").expect_err("syntax");
    let message = err.to_string();
    assert!(message.starts_with("/etc/kata-containers/configuration.toml:3: "), "unexpected message: {message}");
    assert!(matches!(err, ConfigError::Syntax { line: Some(3), .. }));
}

#[test]
fn invalid_allow_list_patterns_are_load_errors() {
    let err = load_text("[hypervisor.qemu]\nenable_annotations = [\"(\"]\n").expect_err("regex");
    assert!(
        err.to_string().starts_with(
            "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.enable_annotations: \
             invalid pattern \"(\": "
        ),
        "{err}"
    );
    let err = load_text("[hypervisor.qemu]\nvalid_hypervisor_paths = [\"/a/[\"]\n").expect_err("glob");
    assert!(
        err.to_string().starts_with(
            "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.valid_hypervisor_paths: \
             invalid pattern \"/a/[\": "
        ),
        "{err}"
    );
}

#[test]
fn validate_names_file_line_and_key_of_missing_files() {
    let dir = TempDir::new().expect("tempdir");
    let qemu = write(&dir.path().join("qemu"), "");
    let initrd = write(&dir.path().join("initrd"), "");
    let text = format!(
        "[hypervisor.qemu]\npath = \"{}\"\ninitrd = \"{}\"\nkernel = \"/nope/vmlinux\"\n",
        qemu.display(),
        initrd.display()
    );
    let loaded = load_text(&text).expect("loading does not check files");
    let err = loaded.validate().expect_err("kernel missing");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:4: hypervisor.qemu.kernel: /nope/vmlinux does not exist"
    );
    let kernel = write(&dir.path().join("vmlinux"), "");
    let text = format!("[hypervisor.qemu]\npath = \"{}\"\nkernel = \"{}\"\n", qemu.display(), kernel.display());
    let mut loaded = load_text(&text).expect("loads");
    // The default initrd may well exist on this host (the set-up installs it): point the default-origin value
    // at a path that cannot, to check how a default is named.
    let missing = dir.path().join("no-initrd.img");
    loaded.config.hypervisor.initrd = missing.display().to_string();
    let err = loaded.validate().expect_err("default initrd missing");
    assert_eq!(err.to_string(), format!("(default): hypervisor.qemu.initrd: {} does not exist", missing.display()));
    let text = format!("{text}initrd = \"{}\"\n", initrd.display());
    load_text(&text).expect("loads").validate().expect("all files exist");
}

#[test]
fn tcg_tb_size_out_of_range_is_refused() {
    for bad in [0, 2048] {
        let loaded = load_text(&format!("[hypervisor.qemu]\ntcg_tb_size = {bad}\n")).expect("loads");
        let err = loaded.validate().expect_err("out of range").to_string();
        assert!(
            err.contains(&format!(
                "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.tcg_tb_size: {bad} MiB is outside 1-1024"
            )),
            "{err}"
        );
    }
}

#[test]
fn templating_needs_an_initrd_and_9p() {
    let loaded = load_text("[factory]\nenable_template = true\n").expect("loads");
    let err = loaded.validate().expect_err("templating with virtio-fs").to_string();
    assert!(
        err.contains(
            "/etc/kata-containers/configuration.toml:2: factory.enable_template: needs hypervisor.qemu.shared_fs = \"virtio-9p\""
        ),
        "{err}"
    );
    let loaded = load_text(
        "[hypervisor.qemu]\nshared_fs = \"virtio-9p\"\nimage = \"/i.img\"\n[factory]\nenable_template = true\ntemplate_path = \"run/t\"\n",
    )
    .expect("loads");
    let err = loaded.validate().expect_err("templating with an image").to_string();
    assert!(err.contains("factory.enable_template: needs hypervisor.qemu.initrd"), "{err}");
    assert!(err.contains("factory.template_path: \"run/t\" must be an absolute path"), "{err}");

    let loaded =
        load_text("[hypervisor.qemu]\nshared_fs = \"virtio-9p\"\n[factory]\nenable_template = true\n").expect("loads");
    if let Err(err) = loaded.validate() {
        assert!(!err.to_string().contains("factory."), "{err}");
    }
}

#[test]
fn the_vm_cache_is_bounded_and_its_endpoint_plain() {
    let loaded = load_text("[factory]\nvm_cache_number = 65\nvm_cache_endpoint = \"run/cache.sock\"\n").expect("loads");
    let err = loaded.validate().expect_err("too many, relative").to_string();
    assert!(err.contains("configuration.toml:2: factory.vm_cache_number: 65 is more than 64"), "{err}");
    assert!(err.contains("factory.vm_cache_endpoint: \"run/cache.sock\" must be an absolute path"), "{err}");
    let long = format!("/{}", "a".repeat(120));
    let loaded = load_text(&format!("[factory]\nvm_cache_endpoint = \"{long}\"\n")).expect("loads");
    let err = loaded.validate().expect_err("too long for a socket").to_string();
    assert!(err.contains("under 108 bytes"), "{err}");
    let loaded = load_text("[factory]\nvm_cache_number = 2\n").expect("loads");
    if let Err(err) = loaded.validate() {
        assert!(!err.to_string().contains("factory."), "{err}");
    }
}

#[test]
fn an_image_replaces_the_default_initrd() {
    let loaded = load_text("[hypervisor.qemu]\nimage = \"/i.img\"\n").expect("loads");
    assert_eq!(loaded.config.hypervisor.initrd, "");
    let loaded = load_text("[hypervisor.qemu]\nimage = \"/i.img\"\ninitrd = \"/i\"\n").expect("loads");
    let err = loaded.validate().expect_err("both");
    assert!(
        err.to_string().ends_with(
            "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.image: cannot be used \
             together with hypervisor.qemu.initrd (/etc/kata-containers/configuration.toml:3)"
        ),
        "{err}"
    );
}

#[test]
fn shipped_configuration_loads_without_warnings() {
    let loaded = LoadedConfig::from_toml(Path::new("configuration-qemu.toml"), DEFAULT_CONFIGURATION)
        .expect("shipped configuration loads");
    assert_eq!(loaded.warnings, Vec::<String>::new());
    let hv = &loaded.config.hypervisor;
    assert_eq!(hv.machine_type, "microvm");
    assert_eq!(hv.default_memory, 256);
    assert_eq!(hv.default_vcpus, 1);
    assert_eq!(hv.kernel_params, "");
    assert_eq!(hv.enable_annotations, ["kernel_params", "default_memory", "default_vcpus"]);
    assert_eq!(hv.valid_hypervisor_paths, ["/usr/bin/qemu-system-x86_64"]);
    assert_eq!(hv.valid_virtio_fs_daemon_paths, ["/usr/local/bin/virtiofsd"]);
    assert_eq!(hv.default_maxmemory, 0);
    assert_eq!(hv.seccompsandbox, DEFAULT_SECCOMP_SANDBOX);
    assert_eq!(DEFAULT_SECCOMP_SANDBOX, "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
    assert_eq!(loaded.config.agent.dial_timeout, 45);
    // Every implemented key is spelled out in the shipped file.
    let defaults: Vec<_> =
        loaded.settings().into_iter().filter(|s| s.origin == Origin::Default).map(|s| s.key).collect();
    assert_eq!(defaults, ["hypervisor.qemu.image"]);
}

/// The uncommented keys of Kata's `configuration-qemu.toml.in` with typical values.
const STOCK_KATA: &str = r#"
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/usr/share/kata-containers/vmlinux.container"
image = "/usr/share/kata-containers/kata-containers.img"
machine_type = "q35"
rootfs_type = "ext4"
enable_annotations = ["enable_iommu", "virtio_fs_extra_args", "kernel_params"]
valid_hypervisor_paths = ["/usr/bin/qemu-system-x86_64"]
kernel_params = ""
firmware = ""
firmware_volume = ""
machine_accelerators = ""
cpu_features = "pmu=off"
default_vcpus = 1
default_maxvcpus = 0
default_bridges = 1
default_memory = 2048
default_maxmemory = 0
disable_block_device_use = false
shared_fs = "virtio-fs"
virtio_fs_daemon = "/usr/libexec/virtiofsd"
valid_virtio_fs_daemon_paths = ["/usr/libexec/virtiofsd"]
virtio_fs_cache_size = 0
virtio_fs_queue_size = 1024
virtio_fs_extra_args = ["--thread-pool-size=1", "--announce-submounts"]
virtio_fs_cache = "auto"
block_device_driver = "virtio-scsi"
block_device_aio = "io_uring"
enable_iothreads = false
enable_vhost_user_store = false
vhost_user_store_path = "/var/run/kata-containers/vhost-user"
valid_vhost_user_store_paths = ["/var/run/kata-containers/vhost-user"]
vhost_user_reconnect_timeout_sec = 0
valid_file_mem_backends = [""]
pflashes = []
disable_image_nvdimm = false
valid_entropy_sources = ["/dev/urandom", "/dev/random", ""]
disable_selinux = false
disable_guest_selinux = true

[factory]

[agent.kata]
kernel_modules = []
dial_timeout = 45

[runtime]
internetworking_model = "tcfilter"
disable_guest_seccomp = true
sandbox_cgroup_only = false
static_sandbox_resource_mgmt = false
sandbox_bind_mounts = []
vfio_mode = "guest-kernel"
disable_guest_empty_dir = false
experimental = []
create_container_timeout = 60
dan_conf = "/run/kata-containers/dans"
"#;

#[test]
fn a_stock_kata_configuration_asks_for_selinux_on_the_vmm() {
    let err = load_text(STOCK_KATA).expect_err("kata-rs labels nothing");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:39: hypervisor.qemu.disable_selinux = false: \
         kata-rs does not implement SELinux labels on the VMM; remove the key or set it to true"
    );
}

#[test]
fn a_stock_kata_configuration_without_selinux_loads_with_warnings_only() {
    let text = STOCK_KATA.replace("disable_selinux = false", "disable_selinux = true");
    let loaded = load_text(&text).expect("stock Kata file loads");
    assert_eq!(loaded.warnings.len(), 21 + 6, "{:#?}", loaded.warnings);
    assert!(loaded.warnings.iter().all(|w| w.ends_with("Kata setting not implemented by kata-rs; ignored")));
    let hv = &loaded.config.hypervisor;
    assert_eq!(hv.virtio_fs_daemon, "/usr/libexec/virtiofsd");
    assert_eq!(hv.image, "/usr/share/kata-containers/kata-containers.img");
    assert_eq!(hv.initrd, "", "the default initrd gives way to a configured image");
    assert_eq!(
        loaded.origin("hypervisor.qemu.default_maxmemory").to_string(),
        "/etc/kata-containers/configuration.toml:19"
    );
    assert_eq!(hv.seccompsandbox, DEFAULT_SECCOMP_SANDBOX, "Kata leaves it unset");
}

#[test]
fn unimplemented_security_keys_accept_only_what_kata_rs_does() {
    let refused = [
        (
            "[hypervisor.qemu]\nconfidential_guest = true",
            "hypervisor.qemu.confidential_guest = true: kata-rs does not implement confidential \
             guests (encrypted guest memory); remove the key or set it to false",
        ),
        (
            "[hypervisor.qemu]\nsev_snp_guest = true",
            "hypervisor.qemu.sev_snp_guest = true: kata-rs does not implement AMD SEV-SNP guests; \
             remove the key or set it to false",
        ),
        (
            "[hypervisor.qemu]\nrootless = true",
            "hypervisor.qemu.rootless = true: kata-rs does not implement running QEMU as a \
             non-root user; remove the key or set it to false",
        ),
        (
            "[hypervisor.qemu]\njailer_path = \"/usr/bin/jailer\"",
            "hypervisor.qemu.jailer_path = \"/usr/bin/jailer\": kata-rs does not implement a \
             jailer around the VMM; remove the key or set it to \"\"",
        ),
        (
            "[hypervisor.qemu]\ndisable_guest_selinux = false",
            "hypervisor.qemu.disable_guest_selinux = false: kata-rs does not implement SELinux \
             in the guest; remove the key or set it to true",
        ),
        (
            "[runtime]\nguest_selinux_label = \"system_u:system_r:container_t\"",
            "runtime.guest_selinux_label = \"system_u:system_r:container_t\": kata-rs does not \
             implement SELinux labels in the guest; remove the key or set it to \"\"",
        ),
        (
            "[hypervisor.qemu]\nguest_hook_path = \"/usr/share/oci/hooks\"",
            "hypervisor.qemu.guest_hook_path = \"/usr/share/oci/hooks\": kata-rs does not \
             implement OCI hooks from the guest image; remove the key or set it to \"\"",
        ),
        (
            "[hypervisor.qemu]\nenable_iommu = true",
            "hypervisor.qemu.enable_iommu = true: kata-rs does not implement a virtual IOMMU; \
             remove the key or set it to false",
        ),
        (
            "[hypervisor.qemu]\nenable_iommu_platform = true",
            "hypervisor.qemu.enable_iommu_platform = true: kata-rs does not implement \
             IOMMU-platform virtio devices; remove the key or set it to false",
        ),
        (
            "[hypervisor.qemu]\nkernel_verity_params = \"root_hash=ab\"",
            "hypervisor.qemu.kernel_verity_params = \"root_hash=ab\": kata-rs does not implement \
             dm-verity for the guest image; remove the key or set it to \"\"",
        ),
        (
            "[hypervisor.qemu]\nrx_rate_limiter_max_rate = 1000000",
            "hypervisor.qemu.rx_rate_limiter_max_rate = 1000000: kata-rs does not implement \
             network rate limits; remove the key or set it to 0",
        ),
        (
            "[hypervisor.qemu]\ntx_rate_limiter_max_rate = 1",
            "hypervisor.qemu.tx_rate_limiter_max_rate = 1: kata-rs does not implement network \
             rate limits; remove the key or set it to 0",
        ),
        // A value of the wrong type asks for nothing we can vouch for either.
        (
            "[hypervisor.qemu]\nrootless = \"false\"",
            "hypervisor.qemu.rootless = \"false\": kata-rs does not implement running QEMU as a \
             non-root user; remove the key or set it to false",
        ),
    ];
    for (text, message) in refused {
        let err = load_text(text).expect_err(text);
        assert_eq!(err.to_string(), format!("/etc/kata-containers/configuration.toml:2: {message}"));
    }
    let accepted = "[hypervisor.qemu]\nconfidential_guest = false\nsev_snp_guest = false\n\
                    rootless = false\njailer_path = \"\"\ndisable_selinux = true\n\
                    disable_guest_selinux = true\nguest_hook_path = \"\"\nenable_iommu = false\n\
                    enable_iommu_platform = false\nkernel_verity_params = \"\"\n\
                    rx_rate_limiter_max_rate = 0\ntx_rate_limiter_max_rate = 0\n\
                    [runtime]\nguest_selinux_label = \"\"\n\
                    disable_guest_seccomp = true\n";
    let loaded = load_text(accepted).expect("asks for nothing kata-rs lacks");
    assert!(loaded.warnings.is_empty(), "what kata-rs does anyway is not worth a warning: {:?}", loaded.warnings);
    assert!(loaded.config.runtime.disable_guest_seccomp, "implemented: the guest drops containers' profiles");
}

#[test]
fn seccompsandbox_is_checked_with_file_and_line() {
    let loaded = load_text("[hypervisor.qemu]\nseccompsandbox = \"\"\n").expect("no sandbox");
    assert_eq!(loaded.config.hypervisor.seccompsandbox, "");
    let loaded = load_text("[hypervisor.qemu]\nseccompsandbox = \"on,elevateprivileges=children\"\n").expect("valid");
    assert_eq!(loaded.config.hypervisor.seccompsandbox, "on,elevateprivileges=children");
    let err = load_text("[hypervisor.qemu]\n\nseccompsandbox = \"on,spawn=maybe\"\n").expect_err("bad value");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:3: hypervisor.qemu.seccompsandbox: \
         \"on,spawn=maybe\": spawn must be allow or deny"
    );
    let err = load_text("[hypervisor.qemu]\nseccompsandbox = \"yes\"\n").expect_err("bad value");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.seccompsandbox: \
         \"yes\" must start with on or off"
    );
    let err = load_text("[hypervisor.qemu]\nseccompsandbox = true\n").expect_err("bad type");
    assert_eq!(
        err.to_string(),
        "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.seccompsandbox: \
         invalid type: boolean `true`, expected a string"
    );
}

#[test]
fn sizes_and_timeouts_out_of_range_are_refused() {
    for bad in [0, 3601] {
        let loaded = load_text(&format!("[agent.kata]\ndial_timeout = {bad}\n")).expect("loads");
        let err = loaded.validate().expect_err("out of range").to_string();
        assert!(
            err.contains(&format!(
                "/etc/kata-containers/configuration.toml:2: agent.kata.dial_timeout: {bad} s is \
                 outside 1-3600"
            )),
            "{err}"
        );
    }
    let loaded = load_text(
        "[hypervisor.qemu]\ndefault_memory = 4097\ndefault_maxmemory = 4096\n\
         default_vcpus = 3\ndefault_maxvcpus = 2\n",
    )
    .expect("loads");
    let err = loaded.validate().expect_err("over the maxima").to_string();
    assert!(
        err.contains(
            "/etc/kata-containers/configuration.toml:2: hypervisor.qemu.default_memory: 4097 MiB \
             is more than hypervisor.qemu.default_maxmemory = 4096 \
             (/etc/kata-containers/configuration.toml:3)"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "/etc/kata-containers/configuration.toml:4: hypervisor.qemu.default_vcpus: 3 is more \
             than hypervisor.qemu.default_maxvcpus = 2 (/etc/kata-containers/configuration.toml:5)"
        ),
        "{err}"
    );
    // 0 means the host's: a file cannot know it, so the host bounds only annotations.
    let loaded = load_text(
        "[hypervisor.qemu]\ndefault_memory = 1048576\ndefault_vcpus = 512\n\
         [agent.kata]\ndial_timeout = 3600\n",
    )
    .expect("loads");
    if let Err(err) = loaded.validate() {
        let err = err.to_string();
        assert!(!err.contains("default_") && !err.contains("dial_timeout"), "{err}");
    }
}
