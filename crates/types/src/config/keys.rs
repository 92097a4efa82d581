//! Key lists kept as data, reviewed like code: Kata keys we accept but ignore, Kata's security keys
//! we do not implement and the one value of each we accept, Kata's spellings of our keys, and which
//! annotations may change which key.

/// Keys Kata's configuration files may contain that kata-rs does not implement and whose absence
/// weakens nothing. Loading one records a warning instead of failing, so a stock Kata
/// `configuration.toml` loads. An entry ending in `.*` covers a whole section. Anything neither
/// implemented nor listed (here or in [`UNIMPLEMENTED_SECURITY_KEYS`]) is an error.
///
/// Some keys here are security-related but safe to ignore, because ignoring them gives the safer
/// side: `debug_console_enabled`, `extra_monitor_socket`, `guest_memory_dump_path`,
/// `disable_new_netns`, `sandbox_bind_mounts` ask for access kata-rs never grants; `valid_jailer_paths`
/// only allows a `jailer_path` annotation kata-rs refuses; the `snp_*`/`tdx_*` keys only matter with
/// `confidential_guest = true`, which is refused.
pub(crate) const KATA_IGNORED_KEYS: &[&str] = &[
    // [hypervisor.qemu]
    "hypervisor.qemu.block_device_aio",
    "hypervisor.qemu.block_device_cache_direct",
    "hypervisor.qemu.block_device_cache_noflush",
    "hypervisor.qemu.block_device_cache_set",
    "hypervisor.qemu.block_device_driver",
    "hypervisor.qemu.cold_plug_vfio",
    "hypervisor.qemu.cpu_features",
    "hypervisor.qemu.ctlpath",
    "hypervisor.qemu.default_bridges",
    "hypervisor.qemu.disable_block_device_use",
    "hypervisor.qemu.disable_image_nvdimm",
    "hypervisor.qemu.disable_nesting_checks",
    "hypervisor.qemu.disable_vhost_net",
    "hypervisor.qemu.enable_guest_swap",
    "hypervisor.qemu.enable_hugepages",
    "hypervisor.qemu.enable_iothreads",
    "hypervisor.qemu.enable_mem_prealloc",
    "hypervisor.qemu.enable_vhost_user_store",
    "hypervisor.qemu.enable_virtio_mem",
    "hypervisor.qemu.entropy_source",
    "hypervisor.qemu.extra_monitor_socket",
    "hypervisor.qemu.file_mem_backend",
    "hypervisor.qemu.firmware",
    "hypervisor.qemu.firmware_volume",
    "hypervisor.qemu.guest_memory_dump_paging",
    "hypervisor.qemu.guest_memory_dump_path",
    "hypervisor.qemu.hot_plug_vfio",
    "hypervisor.qemu.hotplug_vfio_on_root_bus",
    "hypervisor.qemu.indep_iothreads",
    "hypervisor.qemu.machine_accelerators",
    "hypervisor.qemu.memory_offset",
    "hypervisor.qemu.memory_slots",
    "hypervisor.qemu.msize_9p",
    "hypervisor.qemu.pcie_root_port",
    "hypervisor.qemu.pcie_switch_port",
    "hypervisor.qemu.pflashes",
    "hypervisor.qemu.rootfs_type",
    "hypervisor.qemu.snp_guest_policy",
    "hypervisor.qemu.snp_id_auth",
    "hypervisor.qemu.snp_id_block",
    "hypervisor.qemu.tdx_quote_generation_service_socket_port",
    "hypervisor.qemu.use_legacy_serial",
    "hypervisor.qemu.use_vsock",
    "hypervisor.qemu.valid_ctlpaths",
    "hypervisor.qemu.valid_entropy_sources",
    "hypervisor.qemu.valid_file_mem_backends",
    "hypervisor.qemu.valid_jailer_paths",
    "hypervisor.qemu.valid_vhost_user_store_paths",
    "hypervisor.qemu.vhost_user_reconnect_timeout_sec",
    "hypervisor.qemu.vhost_user_store_path",
    "hypervisor.qemu.virtio_fs_cache",
    "hypervisor.qemu.virtio_fs_cache_size",
    "hypervisor.qemu.virtio_fs_inode_file_handles",
    "hypervisor.qemu.virtio_fs_queue_size",
    // [agent.kata]
    "agent.kata.cdh_api_timeout",
    "agent.kata.container_pipe_size",
    "agent.kata.debug_console_enabled",
    "agent.kata.enable_tracing",
    "agent.kata.kernel_modules",
    "agent.kata.trace_mode",
    "agent.kata.trace_type",
    // [runtime]
    "runtime.create_container_timeout",
    "runtime.dan_conf",
    "runtime.disable_guest_empty_dir",
    "runtime.disable_new_netns",
    "runtime.enable_cpu_memory_hotplug",
    "runtime.enable_pprof",
    "runtime.enable_tracing",
    "runtime.enable_vcpus_pinning",
    "runtime.jaeger_endpoint",
    "runtime.jaeger_password",
    "runtime.jaeger_user",
    "runtime.sandbox_bind_mounts",
    "runtime.vfio_mode",
    // Sections of Kata 1.x and 2.x that kata-rs has no counterpart for.
    "image.*",
    "netmon.*",
    "proxy.kata.*",
    "shim.kata.*",
];

/// What a Kata security key must be set to for kata-rs to load it: the value that asks for nothing
/// kata-rs lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    False,
    True,
    /// An empty string or an empty list.
    Empty,
    Zero,
}

impl Accepted {
    pub(crate) fn accepts(self, value: &toml::Value) -> bool {
        match (self, value) {
            (Accepted::False, toml::Value::Boolean(b)) => !b,
            (Accepted::True, toml::Value::Boolean(b)) => *b,
            (Accepted::Empty, toml::Value::String(s)) => s.is_empty(),
            (Accepted::Empty, toml::Value::Array(a)) => a.is_empty(),
            (Accepted::Zero, toml::Value::Integer(i)) => *i == 0,
            _ => false,
        }
    }

    pub(crate) fn as_toml(self) -> &'static str {
        match self {
            Accepted::False => "false",
            Accepted::True => "true",
            Accepted::Empty => "\"\"",
            Accepted::Zero => "0",
        }
    }
}

/// Kata keys that ask for a protection kata-rs does not implement: key -> the one accepted value
/// -> what any other value asks for. Any other value is a load error (file, line, key), never a
/// warning: an operator who asked for the protection must not silently run without it.
pub(crate) const UNIMPLEMENTED_SECURITY_KEYS: &[(&str, Accepted, &str)] = &[
    ("hypervisor.qemu.confidential_guest", Accepted::False, "confidential guests (encrypted guest memory)"),
    ("hypervisor.qemu.sev_snp_guest", Accepted::False, "AMD SEV-SNP guests"),
    ("hypervisor.qemu.rootless", Accepted::False, "running QEMU as a non-root user"),
    ("hypervisor.qemu.jailer_path", Accepted::Empty, "a jailer around the VMM"),
    // kata-rs applies no SELinux label to QEMU; Kata's default (false) asks it to.
    ("hypervisor.qemu.disable_selinux", Accepted::True, "SELinux labels on the VMM"),
    ("hypervisor.qemu.disable_guest_selinux", Accepted::True, "SELinux in the guest"),
    ("runtime.guest_selinux_label", Accepted::Empty, "SELinux labels in the guest"),
    ("hypervisor.qemu.guest_hook_path", Accepted::Empty, "OCI hooks from the guest image"),
    ("hypervisor.qemu.enable_iommu", Accepted::False, "a virtual IOMMU"),
    ("hypervisor.qemu.enable_iommu_platform", Accepted::False, "IOMMU-platform virtio devices"),
    ("hypervisor.qemu.kernel_verity_params", Accepted::Empty, "dm-verity for the guest image"),
    // Bandwidth limits keep one pod from starving the others' network.
    ("hypervisor.qemu.rx_rate_limiter_max_rate", Accepted::Zero, "network rate limits"),
    ("hypervisor.qemu.tx_rate_limiter_max_rate", Accepted::Zero, "network rate limits"),
];

/// The rule for `key` when it is one of [`UNIMPLEMENTED_SECURITY_KEYS`].
pub(crate) fn unimplemented_security_key(key: &str) -> Option<(Accepted, &'static str)> {
    UNIMPLEMENTED_SECURITY_KEYS.iter().find(|(k, _, _)| *k == key).map(|(_, accepted, what)| (*accepted, *what))
}

/// Top-level sections and whether their tables are nested one level (`[hypervisor.qemu]`).
pub(crate) const TOP_SECTIONS: &[(&str, bool)] = &[
    ("hypervisor", true),
    ("agent", true),
    ("runtime", false),
    ("factory", false),
    ("image", false),
    ("netmon", false),
    ("proxy", true),
    ("shim", true),
];

/// Kata's spelling of a key -> the kata-rs key it sets.
pub(crate) const KEY_ALIASES: &[(&str, &str)] = &[("agent.kata.enable_debug", "agent.kata.debug")];

/// Annotations kata-rs honours: name after `io.katacontainers.config.` -> dotted key.
/// Each is honoured only when an entry of `hypervisor.qemu.enable_annotations` allows it.
/// The allow-lists themselves (`enable_annotations`, `valid_*_paths`), the limits
/// (`default_maxmemory`) and `seccompsandbox` are never annotatable.
pub(crate) const ANNOTATIONS: &[(&str, &str)] = &[
    ("hypervisor.path", "hypervisor.qemu.path"),
    ("hypervisor.kernel", "hypervisor.qemu.kernel"),
    ("hypervisor.initrd", "hypervisor.qemu.initrd"),
    ("hypervisor.image", "hypervisor.qemu.image"),
    ("hypervisor.machine_type", "hypervisor.qemu.machine_type"),
    ("hypervisor.kernel_params", "hypervisor.qemu.kernel_params"),
    ("hypervisor.default_vcpus", "hypervisor.qemu.default_vcpus"),
    // Kata's annotation name differs from its configuration key here.
    ("hypervisor.default_max_vcpus", "hypervisor.qemu.default_maxvcpus"),
    ("hypervisor.default_memory", "hypervisor.qemu.default_memory"),
    ("hypervisor.shared_fs", "hypervisor.qemu.shared_fs"),
    ("hypervisor.virtio_fs_daemon", "hypervisor.qemu.virtio_fs_daemon"),
    ("hypervisor.virtio_fs_extra_args", "hypervisor.qemu.virtio_fs_extra_args"),
    ("hypervisor.vsock_daemon", "hypervisor.qemu.vsock_daemon"),
    ("agent.debug", "agent.kata.debug"),
    ("agent.dial_timeout", "agent.kata.dial_timeout"),
    ("runtime.enable_debug", "runtime.enable_debug"),
    ("runtime.experimental", "runtime.experimental"),
    ("runtime.internetworking_model", "runtime.internetworking_model"),
    ("runtime.sandbox_cgroup_only", "runtime.sandbox_cgroup_only"),
];

/// Annotatable keys that do not change the guest VM (its devices, memory, kernel command line),
/// so a pod that sets only these may still be cloned from the shared VM template. Every other
/// annotation counts as changing the VM, including any added later.
pub(crate) const ANNOTATED_OUTSIDE_THE_VM: &[&str] = &["agent.kata.dial_timeout", "runtime.sandbox_cgroup_only"];

/// Keys naming a binary the host will execute -> the glob list an annotation value must match.
pub(crate) const PATH_ALLOW_LISTS: &[(&str, &str)] = &[
    ("hypervisor.qemu.path", "hypervisor.qemu.valid_hypervisor_paths"),
    ("hypervisor.qemu.virtio_fs_daemon", "hypervisor.qemu.valid_virtio_fs_daemon_paths"),
    ("hypervisor.qemu.vsock_daemon", "hypervisor.qemu.valid_vsock_daemon_paths"),
];

/// Whether Kata knows `key` and kata-rs deliberately ignores it.
pub(crate) fn is_ignored_kata_key(key: &str) -> bool {
    KATA_IGNORED_KEYS.iter().any(|entry| match entry.strip_suffix(".*") {
        Some(section) => key.strip_prefix(section).is_some_and(|rest| rest.starts_with('.')),
        None => *entry == key,
    })
}

/// The kata-rs key for `key`, resolving Kata spellings.
pub(crate) fn canonical_key(key: &str) -> &str {
    KEY_ALIASES.iter().find(|(alias, _)| *alias == key).map_or(key, |(_, canonical)| canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::Config;

    #[test]
    fn lists_name_real_keys_and_do_not_overlap() {
        for (_, key) in ANNOTATIONS.iter().chain(KEY_ALIASES).chain(PATH_ALLOW_LISTS) {
            assert!(Config::default_value(key).is_some(), "{key} is not an implemented key");
        }
        for (_, list) in PATH_ALLOW_LISTS {
            assert!(Config::default_value(list).is_some(), "{list} is not an implemented key");
        }
        for key in KATA_IGNORED_KEYS {
            assert!(Config::default_value(key).is_none(), "{key} is implemented, not ignored");
        }
        for (key, _, _) in UNIMPLEMENTED_SECURITY_KEYS {
            assert!(Config::default_value(key).is_none(), "{key} is implemented");
            assert!(!is_ignored_kata_key(key), "{key} is also ignored");
        }
        for key in ANNOTATED_OUTSIDE_THE_VM {
            assert!(ANNOTATIONS.iter().any(|(_, k)| k == key), "{key} is not annotatable");
        }
        for (_, key) in ANNOTATIONS {
            assert!(
                !key.contains("enable_annotations")
                    && !key.contains(".valid_")
                    && !key.ends_with("maxmemory")
                    && !key.ends_with("seccompsandbox"),
                "{key}"
            );
        }
    }

    #[test]
    fn section_wildcards_match_whole_segments() {
        assert!(is_ignored_kata_key("netmon.path"));
        assert!(!is_ignored_kata_key("netmonitor.path"));
        assert!(is_ignored_kata_key("hypervisor.qemu.block_device_driver"));
        assert_eq!(canonical_key("agent.kata.enable_debug"), "agent.kata.debug");
    }

    #[test]
    fn accepted_values_match_only_themselves() {
        use toml::Value;
        assert!(Accepted::False.accepts(&Value::Boolean(false)));
        assert!(!Accepted::False.accepts(&Value::Boolean(true)));
        assert!(!Accepted::False.accepts(&Value::String("false".into())));
        assert!(Accepted::True.accepts(&Value::Boolean(true)));
        assert!(Accepted::Empty.accepts(&Value::String(String::new())));
        assert!(Accepted::Empty.accepts(&Value::Array(Vec::new())));
        assert!(!Accepted::Empty.accepts(&Value::String(" ".into())));
        assert!(Accepted::Zero.accepts(&Value::Integer(0)));
        assert!(!Accepted::Zero.accepts(&Value::Integer(1)));
    }
}
