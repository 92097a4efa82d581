//! The effective configuration: Kata's `configuration.toml` sections with Kata's defaults.
//!
//! Field names are the TOML key names, so serialising a section gives the dotted keys that
//! provenance, `settings()` and annotations use. Every section is `#[serde(default)]`: a section
//! struct deserialised from a table holding a single key type-checks exactly that key.

use serde::{Deserialize, Serialize};

/// Default guest kernel (Kata's install location).
pub const DEFAULT_KERNEL: &str = "/usr/share/kata-containers/vmlinux.container";
/// Default guest initrd (Kata's install location).
pub const DEFAULT_INITRD: &str = "/usr/share/kata-containers/kata-containers-initrd.img";
/// Default QEMU binary.
pub const DEFAULT_HYPERVISOR_PATH: &str = "/usr/bin/qemu-system-x86_64";
/// Default virtiofsd binary (where `cargo install virtiofsd` puts it on our hosts).
pub const DEFAULT_VIRTIO_FS_DAEMON: &str = "/usr/local/bin/virtiofsd";
/// Default vhost-device-vsock binary.
pub const DEFAULT_VSOCK_DAEMON: &str = "/usr/local/bin/vhost-device-vsock";
/// Default agent dial timeout in seconds: Kata's `configuration-qemu.toml` ships `dial_timeout = 45`.
pub const DEFAULT_DIAL_TIMEOUT_SECS: u32 = 45;
/// TCG translation buffer (`hypervisor.qemu.tcg_tb_size`) when the configuration does not say; QEMU's own
/// default is 1 GiB. Booting and starting one container translate ~47 MiB of guest code: with 32 MiB the buffer
/// is flushed during the first container create and everything is translated again (ctr run 1.46 vs 1.34 s,
/// exec 0.117 vs 0.097 s; an idle pod costs 15 MiB less). 16 MiB makes every exec 3x slower.
pub const DEFAULT_TCG_TB_SIZE_MIB: u32 = 64;
/// Default VM template location (Kata's).
pub const DEFAULT_TEMPLATE_PATH: &str = "/run/vc/vm/template";
/// Default socket of the VM cache server (Kata's).
pub const DEFAULT_VM_CACHE_ENDPOINT: &str = "/var/run/kata-containers/cache.sock";
/// Default `hypervisor.qemu.seccompsandbox`: QEMU's `-sandbox` with no obsolete system calls, no gaining
/// privileges, no new processes and no changing scheduling or CPU affinity. Kata ships the key commented out
/// (no sandbox); kata-rs turns it on.
pub const DEFAULT_SECCOMP_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The least guest memory, MiB, an annotation may ask for: below it the guest kernel and agent do not boot.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The longest `agent.kata.dial_timeout`, seconds, a configuration file may set.
pub const MAX_DIAL_TIMEOUT_SECS: u32 = 3600;
/// The longest `agent.kata.dial_timeout`, seconds, a pod may ask for by annotation. A boot under TCG reaches
/// the agent in a few seconds and the shipped timeout is 45 s; a pod whose agent never answers holds its VM,
/// helpers and memory for this long, so a pod may not ask for more than a few times the default.
pub const MAX_ANNOTATED_DIAL_TIMEOUT_SECS: u32 = 120;

/// The whole effective configuration. Serialises with `hypervisor`/`agent` flattened (not
/// `hypervisor.qemu`), so it is not itself a TOML file: load through `ConfigSearch`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Config {
    /// `[hypervisor.qemu]`: the only hypervisor kata-rs supports.
    pub hypervisor: HypervisorConfig,
    /// `[agent.kata]`.
    pub agent: AgentConfig,
    /// `[runtime]`.
    pub runtime: RuntimeConfig,
    /// `[factory]`: VM templating.
    pub factory: FactoryConfig,
}

/// `[hypervisor.qemu]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// QEMU binary.
    pub path: String,
    /// Guest kernel (uncompressed `vmlinux`, PVH boot).
    pub kernel: String,
    /// Guest initrd holding the agent; empty when `image` is used.
    pub initrd: String,
    /// Guest root filesystem image; empty when `initrd` is used.
    pub image: String,
    /// QEMU machine type, e.g. `q35` or `microvm`.
    pub machine_type: String,
    /// Extra guest kernel parameters, appended to the ones the hypervisor code needs.
    pub kernel_params: String,
    /// vCPUs at boot.
    pub default_vcpus: u32,
    /// Maximum vCPUs; 0 means the number of host CPUs. Bounds `default_vcpus`.
    pub default_maxvcpus: u32,
    /// Guest memory at boot, MiB.
    pub default_memory: u32,
    /// Maximum guest memory, MiB; 0 means the host's memory. Bounds `default_memory` (kata-rs does not
    /// hot-plug memory, so it is only a limit).
    pub default_maxmemory: u32,
    /// How the container rootfs and volumes are shared with the guest.
    pub shared_fs: SharedFs,
    /// virtiofsd binary, used when `shared_fs` is `virtio-fs`.
    pub virtio_fs_daemon: String,
    /// Extra virtiofsd arguments.
    pub virtio_fs_extra_args: Vec<String>,
    /// Globs a `path` annotation must match. Empty: no `path` annotation is accepted.
    pub valid_hypervisor_paths: Vec<String>,
    /// Globs a `virtio_fs_daemon` annotation must match. Empty: none is accepted.
    pub valid_virtio_fs_daemon_paths: Vec<String>,
    /// Regexes naming the annotations that are honoured, each matched against a whole name (anchored,
    /// unlike Kata): the name after `io.katacontainers.config.hypervisor.` for hypervisor annotations (as in
    /// Kata), the name after `io.katacontainers.config.` for the others (`agent\.dial_timeout`,
    /// `runtime\..*`). Kata lets every pod set agent and runtime annotations; kata-rs does not.
    pub enable_annotations: Vec<String>,
    /// kata-rs extension (Kata always uses KVM): accelerator choice.
    pub accel: Accel,
    /// kata-rs extension: vhost-device-vsock binary serving the hybrid vsock.
    pub vsock_daemon: String,
    /// kata-rs extension: globs a `vsock_daemon` annotation must match. Empty: none is accepted.
    pub valid_vsock_daemon_paths: Vec<String>,
    /// Log the guest console (Kata has the same key with the same meaning).
    pub enable_debug: bool,
    /// Give the host back the memory the guest frees (virtio-balloon free page reporting). Kata has the
    /// same key but defaults it to false; kata-rs defaults to true, because an idle pod's host memory is
    /// mostly pages the guest touched once while booting.
    pub reclaim_guest_freed_memory: bool,
    /// kata-rs extension: QEMU's TCG translation buffer in MiB when there is no KVM (1-1024). Larger is faster
    /// (less retranslation) and costs host memory as the guest runs more code; see docs/performance.md.
    pub tcg_tb_size: u32,
    /// QEMU's `-sandbox` option (seccomp filter on the VMM), e.g. [`DEFAULT_SECCOMP_SANDBOX`]; empty runs QEMU
    /// without one. Kata's key and meaning; never annotatable.
    pub seccompsandbox: String,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            path: DEFAULT_HYPERVISOR_PATH.to_owned(),
            kernel: DEFAULT_KERNEL.to_owned(),
            initrd: DEFAULT_INITRD.to_owned(),
            image: String::new(),
            machine_type: "q35".to_owned(),
            kernel_params: String::new(),
            default_vcpus: 1,
            default_maxvcpus: 0,
            default_memory: 2048,
            default_maxmemory: 0,
            shared_fs: SharedFs::VirtioFs,
            virtio_fs_daemon: DEFAULT_VIRTIO_FS_DAEMON.to_owned(),
            virtio_fs_extra_args: Vec::new(),
            valid_hypervisor_paths: Vec::new(),
            valid_virtio_fs_daemon_paths: Vec::new(),
            enable_annotations: Vec::new(),
            accel: Accel::Auto,
            vsock_daemon: DEFAULT_VSOCK_DAEMON.to_owned(),
            valid_vsock_daemon_paths: Vec::new(),
            enable_debug: false,
            reclaim_guest_freed_memory: true,
            tcg_tb_size: DEFAULT_TCG_TB_SIZE_MIB,
            seccompsandbox: DEFAULT_SECCOMP_SANDBOX.to_owned(),
        }
    }
}

impl HypervisorConfig {
    /// Maximum vCPUs with Kata's "0 means all host CPUs" resolved, never below `default_vcpus`.
    pub fn max_vcpus(&self, host_cpus: u32) -> u32 {
        let max = if self.default_maxvcpus == 0 { host_cpus } else { self.default_maxvcpus };
        max.max(self.default_vcpus)
    }
}

/// Shared filesystem between host and guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SharedFs {
    /// virtio-fs served by virtiofsd.
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// QEMU's built-in 9p server.
    #[serde(rename = "virtio-9p")]
    Virtio9p,
}

/// Accelerator for QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when usable (see `kata-runtime check`), otherwise TCG.
    Auto,
    /// KVM only.
    Kvm,
    /// TCG (software emulation) only.
    Tcg,
}

/// `[agent.kata]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Debug-level agent logs. Kata spells this key `enable_debug`; both are accepted.
    pub debug: bool,
    /// Seconds to wait for the agent to answer after the VM starts (1 to [`MAX_DIAL_TIMEOUT_SECS`]; an
    /// annotation at most [`MAX_ANNOTATED_DIAL_TIMEOUT_SECS`]).
    pub dial_timeout: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self { debug: false, dial_timeout: DEFAULT_DIAL_TIMEOUT_SECS }
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// How the pod network namespace is connected to the VM.
    pub internetworking_model: InterNetworkingModel,
    /// The shim, QEMU and its helpers all in the pod's cgroup; false: the vCPUs there (v1; all of QEMU on v2),
    /// the rest in `kata_overhead/<sandbox>`.
    pub sandbox_cgroup_only: bool,
    /// Size the VM once, when it starts, and never hot-plug: containers added or grown later get no more.
    pub static_sandbox_resource_mgmt: bool,
    /// Do not apply containers' seccomp profiles in the guest (Kata's key; false applies them, as runc does).
    pub disable_guest_seccomp: bool,
    /// Debug-level runtime and shim logs.
    pub enable_debug: bool,
    /// Experimental features to enable, by name.
    pub experimental: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            internetworking_model: InterNetworkingModel::TcFilter,
            sandbox_cgroup_only: false,
            static_sandbox_resource_mgmt: false,
            disable_guest_seccomp: false,
            enable_debug: false,
            experimental: Vec::new(),
        }
    }
}

/// `runtime.internetworking_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterNetworkingModel {
    /// Redirect traffic between the pod's veth and the VM's tap with tc filters.
    #[serde(rename = "tcfilter")]
    TcFilter,
    /// No network for the VM.
    #[serde(rename = "none")]
    None,
}

/// `[factory]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FactoryConfig {
    /// Start pod VMs as clones of a template VM.
    pub enable_template: bool,
    /// Where the template VM's state is kept.
    pub template_path: String,
    /// How many started VMs the cache server (`kata-runtime factory init`) keeps ready per kind (without and
    /// with a NIC); 0: no cache, every pod starts its own VM.
    pub vm_cache_number: u32,
    /// The cache server's unix socket (root only).
    pub vm_cache_endpoint: String,
}

impl Default for FactoryConfig {
    fn default() -> Self {
        Self {
            enable_template: false,
            template_path: DEFAULT_TEMPLATE_PATH.to_owned(),
            vm_cache_number: 0,
            vm_cache_endpoint: DEFAULT_VM_CACHE_ENDPOINT.to_owned(),
        }
    }
}

/// Where each `Config` field lives in the TOML file: (field of `Config`, dotted TOML prefix).
pub(crate) const SECTIONS: &[(&str, &str)] =
    &[("hypervisor", "hypervisor.qemu"), ("agent", "agent.kata"), ("runtime", "runtime"), ("factory", "factory")];

impl Config {
    /// Every effective setting as (dotted TOML key, value), in key order.
    pub(crate) fn flatten(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(self) else {
            return out;
        };
        for (field, prefix) in SECTIONS {
            if let Some(serde_json::Value::Object(keys)) = sections.get(*field) {
                for (key, value) in keys {
                    out.push((format!("{prefix}.{key}"), value.clone()));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The default value of an implemented dotted key, `None` when kata-rs has no such key.
    pub(crate) fn default_value(key: &str) -> Option<serde_json::Value> {
        Config::default().flatten().into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets one dotted key, type-checking `value` against the field. The error is the
    /// deserializer's message (e.g. "invalid type: string \"x\", expected u32").
    pub(crate) fn assign(&mut self, key: &str, value: toml::Value) -> Result<(), String> {
        let (field, prefix) = SECTIONS
            .iter()
            .find(|(_, prefix)| key.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.')))
            .ok_or_else(|| "unknown configuration key".to_owned())?;
        let name = &key[prefix.len() + 1..];
        match *field {
            "hypervisor" => set_field(&mut self.hypervisor, name, value),
            "agent" => set_field(&mut self.agent, name, value),
            "runtime" => set_field(&mut self.runtime, name, value),
            _ => set_field(&mut self.factory, name, value),
        }
    }
}

/// Round-trips `section` through a TOML table with `name` replaced, so serde does the type check.
fn set_field<T>(section: &mut T, name: &str, value: toml::Value) -> Result<(), String>
where
    T: Serialize + for<'de> Deserialize<'de>,
{
    let mut table = match toml::Value::try_from(&*section) {
        Ok(toml::Value::Table(table)) => table,
        Ok(_) => return Err("section is not a table".to_owned()),
        Err(err) => return Err(err.to_string()),
    };
    table.insert(name.to_owned(), value);
    *section = T::deserialize(toml::Value::Table(table)).map_err(|err| err.message().to_owned())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_katas() {
        let c = Config::default();
        assert_eq!(c.hypervisor.default_vcpus, 1);
        assert_eq!(c.hypervisor.default_maxvcpus, 0);
        assert_eq!(c.hypervisor.default_memory, 2048);
        assert_eq!(c.hypervisor.machine_type, "q35");
        assert_eq!(c.hypervisor.shared_fs, SharedFs::VirtioFs);
        assert_eq!(c.hypervisor.accel, Accel::Auto);
        assert_eq!(c.runtime.internetworking_model, InterNetworkingModel::TcFilter);
        assert_eq!(c.hypervisor.max_vcpus(8), 8);
    }

    #[test]
    fn assign_type_checks_one_key() {
        let mut c = Config::default();
        c.assign("hypervisor.qemu.default_memory", toml::Value::Integer(512)).expect("valid");
        assert_eq!(c.hypervisor.default_memory, 512);
        let err =
            c.assign("hypervisor.qemu.default_memory", toml::Value::String("x".into())).expect_err("string for u32");
        assert_eq!(err, "invalid type: string \"x\", expected u32");
        let err =
            c.assign("hypervisor.qemu.shared_fs", toml::Value::String("virtio-blk".into())).expect_err("bad variant");
        assert_eq!(err, "unknown variant `virtio-blk`, expected `virtio-fs` or `virtio-9p`");
        assert_eq!(c.hypervisor.default_memory, 512, "a failed assign leaves the value alone");
    }

    #[test]
    fn flatten_uses_dotted_toml_keys() {
        let keys: Vec<String> = Config::default().flatten().into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"hypervisor.qemu.kernel".to_owned()));
        assert!(keys.contains(&"agent.kata.dial_timeout".to_owned()));
        assert!(keys.contains(&"factory.template_path".to_owned()));
        assert_eq!(keys.len(), 23 + 2 + 6 + 4);
    }
}
