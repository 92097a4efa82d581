//! Kata-compatible configuration: schema and defaults, loading precedence, drop-ins,
//! provenance of every value, annotations and validation.
//!
//! ```text
//! ConfigSearch::standard(config_path).load()   // file + config.d/*.toml, warnings collected
//!     .apply_annotations(&annotations)          // io.katacontainers.config.*, allow-listed, bounded
//!     .validate()                               // files exist, ranges (kept apart so `env` can print)
//! ```

mod annotations;
mod keys;
mod limits;
mod load;
mod origin;
mod parse;
mod schema;
mod seccomp_sandbox;

use std::path::PathBuf;

pub use limits::HostLimits;
pub use load::{ConfigSearch, LoadedConfig, DEFAULT_CONFIG_PATHS, DROP_IN_DIR};
pub use origin::{Origin, Setting};
pub use schema::{
    Accel, AgentConfig, Config, FactoryConfig, HypervisorConfig, InterNetworkingModel, RuntimeConfig, SharedFs,
    DEFAULT_DIAL_TIMEOUT_SECS, DEFAULT_HYPERVISOR_PATH, DEFAULT_INITRD, DEFAULT_KERNEL, DEFAULT_SECCOMP_SANDBOX,
    DEFAULT_TCG_TB_SIZE_MIB, DEFAULT_TEMPLATE_PATH, DEFAULT_VIRTIO_FS_DAEMON, DEFAULT_VSOCK_DAEMON,
    MAX_ANNOTATED_DIAL_TIMEOUT_SECS, MAX_DIAL_TIMEOUT_SECS, MIN_MEMORY_MIB,
};

/// The configuration file kata-rs installs as `configuration.toml`.
pub const DEFAULT_CONFIGURATION: &str = include_str!("../../configuration-qemu.toml");

/// Annotation prefix for configuration overrides.
pub const ANNOTATION_PREFIX: &str = "io.katacontainers.config.";

/// Errors loading, overriding or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file named explicitly (ConfigPath, KATA_CONF_FILE) is missing; never falls through.
    #[error("configuration file {} named by {named_by} does not exist", path.display())]
    ExplicitFileMissing { path: PathBuf, named_by: &'static str },
    /// None of the default locations holds a file.
    #[error("no configuration file found; tried {}", list_paths(tried))]
    NotFound { tried: Vec<PathBuf> },
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// Malformed TOML, or a section of the wrong shape.
    #[error("{}: {message}", location(path, *line))]
    Syntax { path: PathBuf, line: Option<usize>, message: String },
    #[error("{}:{line}: [{section}]: {reason}", path.display())]
    UnsupportedSection { path: PathBuf, line: usize, section: String, reason: &'static str },
    /// Neither implemented nor a known Kata key.
    #[error("{}:{line}: {key}: unknown configuration key", path.display())]
    UnknownKey { path: PathBuf, line: usize, key: String },
    /// A Kata security key set to a value asking for a protection kata-rs does not implement.
    #[error(
        "{}:{line}: {key} = {value}: kata-rs does not implement {what}; remove the key or set it \
         to {accepted}",
        path.display()
    )]
    UnimplementedSecurityKey {
        path: PathBuf,
        line: usize,
        key: String,
        value: String,
        what: &'static str,
        accepted: &'static str,
    },
    /// The value has the wrong type or is not one of the allowed values.
    #[error("{}:{line}: {key}: {message}", path.display())]
    Type { path: PathBuf, line: usize, key: String, message: String },
    /// An entry of `enable_annotations` or a `valid_*_paths` list does not compile.
    #[error("{origin}: {key}: invalid pattern {pattern:?}: {message}")]
    InvalidPattern { origin: Origin, key: String, pattern: String, message: String },
    #[error("annotation {annotation} is not a setting kata-rs supports")]
    UnknownAnnotation { annotation: String },
    /// `name` is what the entries are matched against: the name after `hypervisor.` for
    /// hypervisor annotations, the name after `io.katacontainers.config.` for the others.
    #[error(
        "annotation {annotation} is not allowed: no entry of hypervisor.qemu.enable_annotations \
         matches {name:?}"
    )]
    AnnotationNotAllowed { annotation: String, name: String },
    /// An annotated size or timeout beyond what the configuration and the host allow.
    #[error("annotation {annotation}={value}: {problem}")]
    AnnotationOutOfRange { annotation: String, value: u32, problem: String },
    /// The host's memory or CPU count, which bound annotations, cannot be read.
    #[error("cannot read the host's memory size and CPU count, which bound annotations")]
    HostLimits { source: std::io::Error },
    #[error("annotation {annotation}: {value} is not allowed: {list_key} is empty, which refuses every path")]
    AnnotationPathListEmpty { annotation: String, value: String, list_key: &'static str },
    #[error("annotation {annotation}: {value} is not allowed: it must be an absolute path without . or .. components")]
    AnnotationPathNotNormal { annotation: String, value: String },
    #[error("annotation {annotation}: {value} is not allowed: it matches no glob of {list_key}")]
    AnnotationPathNotAllowed { annotation: String, value: String, list_key: &'static str },
    #[error("annotation {annotation}: {value:?} is not {expected}")]
    AnnotationType { annotation: String, value: String, expected: &'static str },
    /// The value parsed but the setting refuses it (unknown variant, out of range).
    #[error("annotation {annotation}: {message}")]
    AnnotationValue { annotation: String, message: String },
    /// Files the configuration names are missing; one problem per line.
    #[error("{}", problems.join("\n"))]
    Invalid { problems: Vec<String> },
}

fn location(path: &std::path::Path, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}
