//! `kata-runtime`: the kata-rs host tool.

mod check;
mod env;
mod factory;
mod install;
mod oci;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kata-runtime",
    version,
    about = "kata-rs host tool, and an OCI runtime with runc's command line (each container, or each CRI pod, in a VM)",
    after_help = "The OCI commands take runc's flags (docs/containerd.md, \"katacli\"); containerd's runc shims run \
                  them with BinaryName = kata-runtime or ctr run --runc-binary."
)]
struct Cli {
    /// Configuration file to use instead of the standard search
    /// (KATA_CONF_FILE, then /etc/kata-containers, then /usr/share/defaults/kata-containers).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    global: oci::args::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that this host can run kata-rs sandboxes.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the resolved configuration and where each value came from.
    Env {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manage the VM template pods are cloned from (`[factory] enable_template`).
    Factory {
        #[command(subcommand)]
        command: factory::FactoryCommand,
    },
    /// Install kata-rs on this node (or below --host-root) and add the `kata` runtime to containerd.
    Install(install::InstallArgs),
    /// Undo `install`: remove what it installed (if unchanged) and its block in containerd's config.
    Uninstall(install::NodeArgs),
    #[command(flatten)]
    Oci(oci::args::OciCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if reports_only(&cli.command) {
        // Rust ignores SIGPIPE, so `kata-runtime env | head` would panic on its next line. A command that only
        // prints ends quietly instead, as other tools do. Not the others: an install or a cache server must not
        // stop halfway because whoever read its output went away.
        let _ = default_sigpipe();
    }
    let result = match cli.command {
        Command::Check { json } => check::run(cli.config, json),
        Command::Env { json } => env::run(cli.config, json),
        Command::Factory { command } => factory::run(cli.config, command),
        Command::Install(args) => install::install(&args),
        Command::Uninstall(args) => install::uninstall(&args),
        Command::Oci(command) => return oci::run(&cli.global, cli.config, command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kata-runtime: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `command` only reads and prints (no install, no server, no containers).
fn reports_only(command: &Command) -> bool {
    matches!(
        command,
        Command::Check { .. } | Command::Env { .. } | Command::Factory { command: factory::FactoryCommand::Status }
    )
}

fn default_sigpipe() -> nix::Result<()> {
    // SAFETY: restores the default disposition before any thread is started; no handler runs Rust code.
    unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) }
        .map(|_| ())
}
