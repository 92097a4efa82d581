//! Maps the user's configuration onto the hypervisor's own input, in exactly one place.

use std::path::PathBuf;

use hypervisor::{AccelChoice, AgentTransport, GuestMemory, MachineType, QemuConfig, SharedFs, VmConfig};
use types::config::{self, Config};

use crate::paths::SandboxPaths;

#[derive(Debug, thiserror::Error)]
pub enum VmConfigError {
    #[error("hypervisor.qemu.machine_type {0:?} is not supported; use \"microvm\" or \"q35\"")]
    MachineType(String),
}

pub fn vm_config(sandbox_id: &str, config: &Config, paths: &SandboxPaths) -> Result<VmConfig, VmConfigError> {
    let hv = &config.hypervisor;
    let machine = match hv.machine_type.as_str() {
        "microvm" => MachineType::Microvm,
        "q35" | "pc" | "" => MachineType::Q35,
        other => return Err(VmConfigError::MachineType(other.to_string())),
    };
    let shared_fs = match hv.shared_fs {
        config::SharedFs::VirtioFs => SharedFs::VirtioFs {
            daemon: PathBuf::from(&hv.virtio_fs_daemon),
            extra_args: hv.virtio_fs_extra_args.clone(),
            shared_dir: paths.shared_dir(),
        },
        config::SharedFs::Virtio9p => SharedFs::Virtio9p { shared_dir: paths.shared_dir() },
    };
    let mut kernel_params: Vec<String> = hv.kernel_params.split_whitespace().map(str::to_string).collect();
    if config.agent.debug {
        kernel_params.push("agent.debug".to_string());
    }
    // A VM made from a template has no vsock (vhost-user cannot migrate), so the agent is on virtio-serial;
    // pods that boot on their own with templating on (those with a network) use the same guest setup.
    let templated = config.factory.enable_template;
    if templated {
        kernel_params.push(protocols::AGENT_SERIAL_PARAM.to_string());
    }
    let initrd = (!hv.initrd.is_empty()).then(|| PathBuf::from(&hv.initrd));
    Ok(VmConfig {
        name: sandbox_id.to_string(),
        kernel: PathBuf::from(&hv.kernel),
        initrd,
        vcpus: hv.default_vcpus.max(1),
        memory_mib: hv.default_memory,
        max_vcpus: 0,
        max_memory_mib: 0,
        kernel_params,
        accel: match hv.accel {
            config::Accel::Auto => AccelChoice::Auto,
            config::Accel::Kvm => AccelChoice::Kvm,
            config::Accel::Tcg => AccelChoice::Tcg,
        },
        shared_fs,
        agent: Some(match templated {
            true => AgentTransport::Serial { port: protocols::AGENT_SERIAL_PORT.to_string() },
            false => AgentTransport::HybridVsock,
        }),
        memory: GuestMemory::Memfd,
        work_dir: paths.vm_dir(),
        net_devices: Vec::new(),
        debug: hv.enable_debug || config.runtime.enable_debug,
        free_page_reporting: hv.reclaim_guest_freed_memory,
        qemu: QemuConfig {
            path: PathBuf::from(&hv.path),
            machine,
            tcg_tb_size_mib: hv.tcg_tb_size,
            seccomp_sandbox: (!hv.seccompsandbox.is_empty()).then(|| hv.seccompsandbox.clone()),
            vsock_daemon: (!templated).then(|| PathBuf::from(&hv.vsock_daemon)),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(text: &str) -> Config {
        types::config::LoadedConfig::from_sources(&[(PathBuf::from("c.toml"), text.to_string())])
            .expect("config loads")
            .config
    }

    #[test]
    fn shipped_defaults_map_to_a_microvm_with_virtio_fs() {
        let c = config(types::config::DEFAULT_CONFIGURATION);
        let paths = SandboxPaths::new(Path::new("/run/kata-rs"), "sb1");
        let vm = vm_config("sb1", &c, &paths).unwrap();
        assert_eq!(vm.qemu.machine, MachineType::Microvm);
        assert_eq!(vm.memory_mib, 256);
        assert_eq!(vm.qemu.seccomp_sandbox.as_deref(), Some(hypervisor::DEFAULT_SECCOMP_SANDBOX));
        assert_eq!(vm.work_dir, Path::new("/run/kata-rs/sb1/vm"));
        match vm.shared_fs {
            SharedFs::VirtioFs { shared_dir, daemon, .. } => {
                assert_eq!(shared_dir, Path::new("/run/kata-rs/sb1/shared"));
                assert_eq!(daemon, Path::new("/usr/local/bin/virtiofsd"));
            }
            other => panic!("expected virtio-fs, got {other:?}"),
        }
    }

    #[test]
    fn nine_p_debug_and_kernel_params() {
        let c = config(
            "[hypervisor.qemu]\nshared_fs = \"virtio-9p\"\nkernel_params = \"a=1  b\"\n[agent.kata]\ndebug = true\n",
        );
        let paths = SandboxPaths::new(Path::new("/r"), "s");
        let vm = vm_config("s", &c, &paths).unwrap();
        assert!(matches!(vm.shared_fs, SharedFs::Virtio9p { .. }));
        assert_eq!(vm.kernel_params, ["a=1", "b", "agent.debug"]);
    }

    #[test]
    fn templating_puts_the_agent_on_virtio_serial() {
        let c = config("[hypervisor.qemu]\nshared_fs = \"virtio-9p\"\n[factory]\nenable_template = true\n");
        let vm = vm_config("s", &c, &SandboxPaths::new(Path::new("/r"), "s")).unwrap();
        assert_eq!(vm.qemu.vsock_daemon, None);
        assert_eq!(vm.agent, Some(AgentTransport::Serial { port: "agent.channel.0".into() }));
        assert!(vm.kernel_params.contains(&"agent.transport=serial".to_string()));
        assert_eq!(vm.memory, GuestMemory::Memfd, "the sandbox makes it a clone once the template exists");
    }

    #[test]
    fn unknown_machine_type_is_named() {
        let c = config("[hypervisor.qemu]\nmachine_type = \"virt\"\n");
        let err = vm_config("s", &c, &SandboxPaths::new(Path::new("/r"), "s")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hypervisor.qemu.machine_type \"virt\" is not supported; use \"microvm\" or \"q35\""
        );
    }
}
