//! `kata-runtime install` / `uninstall`: put kata-rs on a node (binaries, guest assets, configuration, the
//! `kata` runtime in containerd's config) and take it off again, leaving the node as it was.
//! The Kubernetes DaemonSet in `deploy/` runs these with the host's `/` mounted at `/host`; docs/kubernetes.md.

mod containerd;
mod containerd_config;
mod host;
mod manifest;
mod setup;
mod teardown;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

/// A file of the payload and where it goes on the host.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    /// Below `--payload`.
    pub from: &'static str,
    /// Host path (below `--host-root`).
    pub to: &'static str,
    pub mode: u32,
}

/// The release layout, installed where scripts/setup.sh installs it (and where the shipped configuration
/// expects it).
pub const FILES: [Item; 7] = [
    Item { from: "bin/kata-runtime", to: "/usr/local/bin/kata-runtime", mode: 0o755 },
    Item { from: "bin/containerd-shim-kata-v2", to: "/usr/local/bin/containerd-shim-kata-v2", mode: 0o755 },
    Item { from: "bin/virtiofsd", to: "/usr/local/bin/virtiofsd", mode: 0o755 },
    Item { from: "bin/vhost-device-vsock", to: "/usr/local/bin/vhost-device-vsock", mode: 0o755 },
    Item {
        from: "share/kata-containers/vmlinux.container",
        to: "/usr/share/kata-containers/vmlinux.container",
        mode: 0o644,
    },
    Item {
        from: "share/kata-containers/kata-containers-initrd.img",
        to: "/usr/share/kata-containers/kata-containers-initrd.img",
        mode: 0o644,
    },
    Item { from: "share/defaults/kata-containers/configuration-qemu.toml", to: KATA_CONFIG, mode: 0o644 },
];

/// The configuration containerd's `ConfigPath` names.
pub const KATA_CONFIG: &str = "/usr/share/defaults/kata-containers/configuration-qemu.toml";
/// `configuration.toml` -> `configuration-qemu.toml`, for `kata-runtime` and `ctr` runs without `ConfigPath`.
pub const LINK: (&str, &str) = ("/usr/share/defaults/kata-containers/configuration.toml", "configuration-qemu.toml");
/// The VMM the shipped configuration names; not part of the payload (Debian's `qemu-system-x86`).
const QEMU: &str = "/usr/bin/qemu-system-x86_64";

pub fn backup_path(containerd_config: &str) -> String {
    format!("{containerd_config}.kata-rs.bak")
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The host's root directory: every path below is written under it (`/host` in the DaemonSet).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub host_root: PathBuf,
    /// containerd's config file, as a host path.
    #[arg(long, value_name = "PATH", default_value = "/etc/containerd/config.toml")]
    pub containerd_config: String,
    /// How to restart containerd (run with /bin/sh -c).
    #[arg(long, value_name = "CMD", default_value = "systemctl restart containerd")]
    pub restart_command: String,
    /// Neither restart containerd nor check its CRI plugin afterwards.
    #[arg(long)]
    pub no_restart: bool,
    /// containerd's socket, as a host path, for the CRI check (`ctr --address SOCKET plugins ls`).
    #[arg(long, value_name = "PATH", default_value = "/run/containerd/containerd.sock")]
    pub containerd_socket: String,
    /// The ctr binary for the CRI check.
    #[arg(long, value_name = "PATH", default_value = "ctr")]
    pub ctr: String,
    /// How long to wait for the CRI plugin to be `ok` after the restart.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub cri_timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Directory holding the release layout: bin/{kata-runtime,containerd-shim-kata-v2,virtiofsd,
    /// vhost-device-vsock}, share/kata-containers/{vmlinux.container,kata-containers-initrd.img},
    /// share/defaults/kata-containers/configuration-qemu.toml.
    #[arg(long, value_name = "DIR")]
    pub payload: PathBuf,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// What setup and teardown need, without clap.
#[derive(Debug, Clone)]
pub struct Options {
    pub host_root: PathBuf,
    pub containerd_config: String,
    pub restart: bool,
    pub cri_timeout: Duration,
}

impl NodeArgs {
    fn options(&self) -> Options {
        Options {
            host_root: self.host_root.clone(),
            containerd_config: self.containerd_config.clone(),
            restart: !self.no_restart,
            cri_timeout: Duration::from_secs(self.cri_timeout),
        }
    }

    fn containerd(&self) -> Result<containerd::SystemContainerd> {
        host::relative(&self.containerd_socket)?;
        Ok(containerd::SystemContainerd {
            restart_command: self.restart_command.clone(),
            ctr: self.ctr.clone(),
            socket: self.host_root.join(self.containerd_socket.trim_start_matches('/')),
        })
    }
}

/// Prints what was done. Write errors are ignored: in the DaemonSet's preStop hook stdout goes through
/// containerd, which the command has just restarted, and the work is done by then.
fn print(notes: Vec<String>) -> ExitCode {
    let mut out = std::io::stdout().lock();
    for note in notes {
        let _ = writeln!(out, "{note}");
    }
    ExitCode::SUCCESS
}

pub fn install(args: &InstallArgs) -> Result<ExitCode> {
    let notes = setup::install(&args.payload, &args.node.options(), &args.node.containerd()?)?;
    Ok(print(notes))
}

pub fn uninstall(args: &NodeArgs) -> Result<ExitCode> {
    Ok(print(teardown::uninstall(&args.options(), &args.containerd()?)?))
}

/// Whether `dir` is a directory the installer may have created: a proper ancestor of a path it writes.
fn is_ancestor_of_a_target(dir: &str, containerd_config: &str) -> bool {
    let targets = FILES
        .iter()
        .map(|f| f.to.to_string())
        .chain([LINK.0.to_string(), manifest::PATH.to_string(), containerd_config.to_string()])
        .chain(FILES.iter().map(|f| manifest::original_path(f.to)));
    let dir = Path::new(dir);
    host::relative(&dir.to_string_lossy()).is_ok()
        && targets.into_iter().any(|t| Path::new(&t).starts_with(dir) && Path::new(&t) != dir)
}
