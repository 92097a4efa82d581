//! Finding the configuration file, applying drop-ins, recording provenance, validating.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::keys::{canonical_key, is_ignored_kata_key, unimplemented_security_key};
use super::origin::{Origin, Setting};
use super::parse::parse_file;
use super::schema::{Config, SharedFs};
use super::{seccomp_sandbox, ConfigError};

/// The standard locations, in the order they are tried after ConfigPath and KATA_CONF_FILE.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] =
    ["/etc/kata-containers/configuration.toml", "/usr/share/defaults/kata-containers/configuration.toml"];

/// Drop-in directory beside the chosen file: its `*.toml` files are applied in file-name order.
pub const DROP_IN_DIR: &str = "config.d";

/// Where to look for the configuration file. The candidates are data so tests need not touch
/// `/etc` or the process environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSearch {
    /// containerd's `ConfigPath` runtime option; wins over everything.
    pub config_path: Option<PathBuf>,
    /// The `KATA_CONF_FILE` environment variable.
    pub env_conf_file: Option<PathBuf>,
    /// Tried in order when neither of the above is given; missing ones are skipped.
    pub defaults: Vec<PathBuf>,
}

impl ConfigSearch {
    /// ConfigPath from the caller, `KATA_CONF_FILE` from the environment, standard defaults.
    /// Empty values count as unset.
    pub fn standard(config_path: Option<PathBuf>) -> Self {
        Self {
            config_path: config_path.filter(|p| !p.as_os_str().is_empty()),
            env_conf_file: std::env::var_os("KATA_CONF_FILE").filter(|v| !v.is_empty()).map(PathBuf::from),
            defaults: DEFAULT_CONFIG_PATHS.iter().map(PathBuf::from).collect(),
        }
    }

    /// The main configuration file: an explicitly named file must exist (it never falls
    /// through to the defaults); the defaults are tried in order.
    pub fn find(&self) -> Result<PathBuf, ConfigError> {
        let explicit = [
            (&self.config_path, "containerd's ConfigPath runtime option"),
            (&self.env_conf_file, "the KATA_CONF_FILE environment variable"),
        ];
        for (path, named_by) in explicit {
            if let Some(path) = path {
                if !path.exists() {
                    return Err(ConfigError::ExplicitFileMissing { path: path.clone(), named_by });
                }
                return Ok(path.clone());
            }
        }
        self.defaults
            .iter()
            .find(|path| path.exists())
            .cloned()
            .ok_or_else(|| ConfigError::NotFound { tried: self.defaults.clone() })
    }

    /// Finds the file, then loads it and its drop-ins.
    pub fn load(&self) -> Result<LoadedConfig, ConfigError> {
        let main = self.find()?;
        let mut files = vec![main.clone()];
        files.extend(drop_ins(&main)?);
        let sources = files
            .into_iter()
            .map(|path| match fs::read_to_string(&path) {
                Ok(text) => Ok((path, text)),
                Err(source) => Err(ConfigError::Read { path, source }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        LoadedConfig::from_sources(&sources)
    }
}

/// `config.d/*.toml` beside `main`, sorted by file name. Like a shell glob, dot-files
/// (editor leftovers) are skipped.
fn drop_ins(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = main.parent().unwrap_or(Path::new("")).join(DROP_IN_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| ConfigError::Read { path: dir.clone(), source })?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".toml") && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The effective configuration with where each value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadedConfig {
    pub config: Config,
    /// The main file then its drop-ins, in the order applied.
    pub files: Vec<PathBuf>,
    /// Dotted key -> origin, for every implemented key.
    pub origins: BTreeMap<String, Origin>,
    /// Kata settings present in the files that kata-rs ignores, as `file:line: key: ...`.
    pub warnings: Vec<String>,
}

static DEFAULT_ORIGIN: Origin = Origin::Default;

impl Default for LoadedConfig {
    /// Built-in defaults only, no files.
    fn default() -> Self {
        let config = Config::default();
        let origins = config.flatten().into_iter().map(|(key, _)| (key, Origin::Default)).collect();
        Self { config, files: Vec::new(), origins, warnings: Vec::new() }
    }
}

impl LoadedConfig {
    /// Loads one configuration text as if read from `path` (no drop-ins).
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::from_sources(&[(path.to_owned(), text.to_owned())])
    }

    /// Loads (path, contents) pairs in order; later values override earlier ones key by key.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Self, ConfigError> {
        let mut loaded = Self::default();
        let implemented: BTreeSet<String> = loaded.origins.keys().cloned().collect();
        for (path, text) in sources {
            loaded.files.push(path.clone());
            for entry in parse_file(path, text)? {
                let key = canonical_key(&entry.key);
                let type_error = |message| ConfigError::Type {
                    path: path.clone(),
                    line: entry.line,
                    key: entry.key.clone(),
                    message,
                };
                if implemented.contains(key) {
                    if key == "hypervisor.qemu.seccompsandbox" {
                        if let toml::Value::String(value) = &entry.value {
                            seccomp_sandbox::check(value).map_err(type_error)?;
                        }
                    }
                    loaded.config.assign(key, entry.value).map_err(type_error)?;
                    let origin = Origin::File { path: path.clone(), line: entry.line };
                    loaded.origins.insert(key.to_owned(), origin);
                } else if let Some((accepted, what)) = unimplemented_security_key(key) {
                    // The accepted value is what kata-rs does anyway: nothing to warn about.
                    if !accepted.accepts(&entry.value) {
                        return Err(ConfigError::UnimplementedSecurityKey {
                            path: path.clone(),
                            line: entry.line,
                            key: entry.key,
                            value: entry.value.to_string(),
                            what,
                            accepted: accepted.as_toml(),
                        });
                    }
                } else if is_ignored_kata_key(key) {
                    loaded.warnings.push(format!(
                        "{}:{}: {}: Kata setting not implemented by kata-rs; ignored",
                        path.display(),
                        entry.line,
                        entry.key
                    ));
                } else {
                    return Err(ConfigError::UnknownKey { path: path.clone(), line: entry.line, key: entry.key });
                }
            }
        }
        loaded.check_patterns()?;
        loaded.normalize_boot_image();
        Ok(loaded)
    }

    /// Where the effective value of dotted `key` came from.
    pub fn origin(&self, key: &str) -> &Origin {
        self.origins.get(key).unwrap_or(&DEFAULT_ORIGIN)
    }

    /// Every effective setting with its origin, in key order (for `kata-runtime env`).
    pub fn settings(&self) -> Vec<Setting> {
        self.config
            .flatten()
            .into_iter()
            .map(|(key, value)| Setting { origin: self.origin(&key).clone(), key, value })
            .collect()
    }

    /// The default initrd applies only when no image is configured: a Kata file that sets
    /// `image` must not end up with both.
    pub(crate) fn normalize_boot_image(&mut self) {
        let initrd_is_default = *self.origin("hypervisor.qemu.initrd") == Origin::Default;
        let hv = &mut self.config.hypervisor;
        if !hv.image.is_empty() && initrd_is_default {
            hv.initrd.clear();
        }
    }

    /// Every allow-list entry compiles, so a typo is reported with its file and line at load
    /// time rather than when the first annotated pod arrives.
    fn check_patterns(&self) -> Result<(), ConfigError> {
        let hv = &self.config.hypervisor;
        let invalid = |key: &str, pattern: &str, message: String| ConfigError::InvalidPattern {
            origin: self.origin(key).clone(),
            key: key.to_owned(),
            pattern: pattern.to_owned(),
            message,
        };
        for pattern in &hv.enable_annotations {
            anchored_regex(pattern).map_err(|err| invalid("hypervisor.qemu.enable_annotations", pattern, err))?;
        }
        let globs = [
            ("hypervisor.qemu.valid_hypervisor_paths", &hv.valid_hypervisor_paths),
            ("hypervisor.qemu.valid_virtio_fs_daemon_paths", &hv.valid_virtio_fs_daemon_paths),
            ("hypervisor.qemu.valid_vsock_daemon_paths", &hv.valid_vsock_daemon_paths),
        ];
        for (key, patterns) in globs {
            for pattern in patterns {
                glob::Pattern::new(pattern).map_err(|err| invalid(key, pattern, err.to_string()))?;
            }
        }
        Ok(())
    }

    /// Checks that the files the hypervisor needs exist and that sizes and timeouts are in range.
    /// Kept out of loading so `kata-runtime env` can still show a configuration whose kernel is
    /// missing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let hv = &self.config.hypervisor;
        let mut problems = Vec::new();
        let required = [
            ("hypervisor.qemu.path", &hv.path, true),
            ("hypervisor.qemu.kernel", &hv.kernel, true),
            ("hypervisor.qemu.initrd", &hv.initrd, false),
            ("hypervisor.qemu.image", &hv.image, false),
        ];
        for (key, value, needed) in required {
            let origin = self.origin(key);
            if value.is_empty() {
                if needed {
                    problems.push(format!("{origin}: {key}: is not set"));
                }
            } else if !Path::new(value).exists() {
                problems.push(format!("{origin}: {key}: {value} does not exist"));
            }
        }
        match (hv.initrd.is_empty(), hv.image.is_empty()) {
            (true, true) => problems.push(format!(
                "{}: hypervisor.qemu.initrd: is not set and neither is hypervisor.qemu.image",
                self.origin("hypervisor.qemu.initrd")
            )),
            (false, false) => problems.push(format!(
                "{}: hypervisor.qemu.image: cannot be used together with hypervisor.qemu.initrd \
                 ({})",
                self.origin("hypervisor.qemu.image"),
                self.origin("hypervisor.qemu.initrd")
            )),
            _ => {}
        }
        if !(1..=1024).contains(&hv.tcg_tb_size) {
            problems.push(format!(
                "{}: hypervisor.qemu.tcg_tb_size: {} MiB is outside 1-1024",
                self.origin("hypervisor.qemu.tcg_tb_size"),
                hv.tcg_tb_size
            ));
        }
        self.validate_limits(&mut problems);
        if self.config.factory.enable_template {
            self.validate_template(&mut problems);
        }
        self.validate_vm_cache(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }
}

impl LoadedConfig {
    /// VM templating as Kata has it: the template holds the guest's kernel and initrd in memory, so it needs an
    /// initrd (not an image), and clones have private memory, which rules out virtio-fs (vhost-user).
    fn validate_template(&self, problems: &mut Vec<String>) {
        let hv = &self.config.hypervisor;
        let origin = self.origin("factory.enable_template");
        if hv.initrd.is_empty() {
            problems.push(format!(
                "{origin}: factory.enable_template: needs hypervisor.qemu.initrd (a template cannot hold an image)"
            ));
        }
        if hv.shared_fs != SharedFs::Virtio9p {
            problems.push(format!(
                "{origin}: factory.enable_template: needs hypervisor.qemu.shared_fs = \"virtio-9p\" ({}): \
                 virtio-fs cannot serve a VM cloned from a template",
                self.origin("hypervisor.qemu.shared_fs")
            ));
        }
        let path = &self.config.factory.template_path;
        let plain = path.starts_with('/')
            && path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
        if !plain {
            problems.push(format!(
                "{}: factory.template_path: {path:?} must be an absolute path of letters, digits, '/', '-', '_' and '.'",
                self.origin("factory.template_path")
            ));
        }
    }
}

impl LoadedConfig {
    /// The VM cache: a bounded number of VMs, served on a plain absolute socket path that fits a unix socket
    /// address.
    fn validate_vm_cache(&self, problems: &mut Vec<String>) {
        let factory = &self.config.factory;
        if factory.vm_cache_number > MAX_VM_CACHE_NUMBER {
            problems.push(format!(
                "{}: factory.vm_cache_number: {} is more than {MAX_VM_CACHE_NUMBER}",
                self.origin("factory.vm_cache_number"),
                factory.vm_cache_number
            ));
        }
        let path = &factory.vm_cache_endpoint;
        let plain = path.starts_with('/')
            && path.len() < 108
            && path.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
        if !plain {
            problems.push(format!(
                "{}: factory.vm_cache_endpoint: {path:?} must be an absolute path under 108 bytes of letters, \
                 digits, '/', '-', '_' and '.'",
                self.origin("factory.vm_cache_endpoint")
            ));
        }
    }
}

/// Most VMs the cache keeps ready per kind: each holds its guest memory.
pub const MAX_VM_CACHE_NUMBER: u32 = 64;

/// `pattern` matched against a whole name: `^(?:pattern)$`.
pub(crate) fn anchored_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|err| err.to_string())
}
