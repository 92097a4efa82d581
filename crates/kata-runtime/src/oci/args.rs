//! runc's command line, as containerd's runc shims (go-runc) and people type it: global flags first, then the
//! command, its flags and the container id.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// Where container state lives unless `--root` says otherwise (runc's is /run/runc).
pub const DEFAULT_ROOT: &str = "/run/kata-runtime-oci";

/// runc's global flags. `--systemd-cgroup`, `--rootless` and `--criu` are accepted and have no effect: the
/// container's cgroups are in the guest, and the VM's host cgroup follows `cgroupsPath` as for the shim.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Directory of the OCI containers' state (one directory per container id, root only).
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Log file for errors (containerd's runc shim reads the last error from it).
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Log format.
    #[arg(long = "log-format", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More detail in the log.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, hide = true, value_name = "BOOL")]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, hide = true, value_name = "PATH")]
    pub criu: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The OCI commands (runc's).
#[derive(Debug, Subcommand)]
pub enum OciCommand {
    /// Create a container in its own VM (runc create): the VM runs, the container's init waits for `start`.
    Create(CreateArgs),
    /// Create and start a container (runc run); without --detach, wait for it and exit with its status.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Return once the container started.
        #[arg(short, long)]
        detach: bool,
    },
    /// Start a created container's init.
    Start { id: String },
    /// Print a container's state as runc's JSON.
    State { id: String },
    /// Send a signal (name or number, default SIGTERM) to the container's init, or with --all to all its
    /// processes.
    Kill {
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a stopped container, its VM and its state; --force kills a running one first.
    Delete {
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// List a container's processes (guest pids; the init under the stand-in's pid).
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        /// Accepted for runc compatibility; ps options are not supported.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ps_args: Vec<String>,
    },
    /// Freeze every process of the container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Change a container's resources: OCI LinuxResources JSON from a file or `-` for stdin, or (without a
    /// file, as runc) from the resource flags.
    Update(Box<UpdateArgs>),
    /// Run a process in a container: from --process FILE (an OCI Process JSON) or inline `exec ID CMD...`.
    Exec(ExecArgs),
    /// The container's stats as runc's events: one with --stats, else one every --interval until it stops.
    Events {
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    /// List the containers under --root.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print what this runtime supports (runc features JSON).
    Features,
    /// Write a default config.json into the bundle.
    Spec {
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
    },
    /// The container's stand-in (internal: `create` starts it).
    #[command(name = "__standin", hide = true)]
    Standin {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        ready_fd: i32,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        id: String,
    },
    /// An exec's stand-in (internal: `exec` starts it).
    #[command(name = "__exec-standin", hide = true)]
    ExecStandin {
        #[arg(long)]
        process: PathBuf,
        #[arg(long)]
        ready_fd: i32,
        #[arg(long)]
        console_socket: Option<PathBuf>,
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The bundle directory (config.json and the rootfs).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Where to write the stand-in's pid.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// A unix socket that receives the master of the container's terminal.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility (the container is pivoted in the guest).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra file descriptors cannot cross into a VM: only 0 is accepted.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// An OCI Process JSON.
    #[arg(short, long, value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// Return once the process started; its stand-in's pid goes to --pid-file.
    #[arg(short, long)]
    pub detach: bool,
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Allocate a terminal (inline form).
    #[arg(short, long)]
    pub tty: bool,
    /// Working directory (inline form).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variable NAME=VALUE (inline form).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// uid[:gid] (inline form).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
    /// The command of the inline form.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `update`'s flags: runc's, less the block IO, huge page and kernel memory ones.
#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    /// OCI LinuxResources JSON; `-` reads stdin. The flags below are ignored with it, as in runc.
    #[arg(short, long, value_name = "FILE")]
    pub resources: Option<PathBuf>,
    /// Memory limit: bytes, or a number with k, m, g or t; -1 for none.
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long = "memory-reservation")]
    pub memory_reservation: Option<String>,
    /// Memory plus swap limit.
    #[arg(long = "memory-swap")]
    pub memory_swap: Option<String>,
    #[arg(long = "cpu-shares")]
    pub cpu_shares: Option<u64>,
    #[arg(long = "cpu-period")]
    pub cpu_period: Option<u64>,
    #[arg(long = "cpu-quota", allow_negative_numbers = true)]
    pub cpu_quota: Option<i64>,
    #[arg(long = "cpuset-cpus")]
    pub cpuset_cpus: Option<String>,
    #[arg(long = "cpuset-mems")]
    pub cpuset_mems: Option<String>,
    #[arg(long = "pids-limit", allow_negative_numbers = true)]
    pub pids_limit: Option<i64>,
    pub id: String,
}
