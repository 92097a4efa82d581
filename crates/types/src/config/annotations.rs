//! `io.katacontainers.config.<section>.<key>` annotations overriding configuration values:
//! allow-listed, typed, bounded.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use glob::{MatchOptions, Pattern};

use super::keys::{ANNOTATED_OUTSIDE_THE_VM, ANNOTATIONS, PATH_ALLOW_LISTS};
use super::limits::HostLimits;
use super::load::{anchored_regex, LoadedConfig};
use super::origin::Origin;
use super::schema::Config;
use super::{ConfigError, ANNOTATION_PREFIX};

/// `*` must not cross `/`: `/usr/bin/*` allows `/usr/bin/qemu`, not `/usr/bin/x/qemu`.
const PATH_MATCH: MatchOptions =
    MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: false };

impl LoadedConfig {
    /// Applies configuration annotations; all or nothing. Annotations outside
    /// `io.katacontainers.config.` are ignored; an unknown one under it is an error.
    ///
    /// - Every annotation is honoured only when an entry of `hypervisor.qemu.enable_annotations`
    ///   matches its name as a whole (`^(?:entry)$`): for `hypervisor.*` annotations the name after
    ///   `hypervisor.` (Kata's meaning: `"default_memory"`), for the others the name after
    ///   `io.katacontainers.config.` (`"agent\\.dial_timeout"`, `"runtime\\..*"`). Kata matches
    ///   unanchored, so its `"path"` also allows `virtio_fs_daemon_path`-like names; ours does not.
    ///   Kata honours agent and runtime annotations from every pod; kata-rs does not.
    /// - Binaries (`path`, `virtio_fs_daemon`, `vsock_daemon`) must also match a glob of the
    ///   corresponding `valid_*_paths`. An empty list refuses every value: the safe reading,
    ///   since an operator who never wrote a list cannot have meant "any binary".
    /// - Sizes and timeouts are bounded by the configuration and this host (see
    ///   [`apply_annotations_with`](Self::apply_annotations_with)).
    /// - `kernel_params` is appended to the configured parameters, as Kata does.
    /// - Values are typed like the key: booleans `true`/`false`, integers in decimal, string
    ///   lists as a JSON array or space-separated words.
    ///
    /// Reads this host's limits ([`HostLimits::detect`]) when there is a configuration annotation.
    pub fn apply_annotations(&mut self, annotations: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        if !annotations.keys().any(|name| name.starts_with(ANNOTATION_PREFIX)) {
            return Ok(());
        }
        let host = HostLimits::detect().map_err(|source| ConfigError::HostLimits { source })?;
        self.apply_annotations_with(annotations, &host)
    }

    /// [`apply_annotations`](Self::apply_annotations) with the host's limits given. The annotated
    /// `default_memory` must be at least [`MIN_MEMORY_MIB`](super::MIN_MEMORY_MIB) MiB and at
    /// most `default_maxmemory` (0: `host.memory_mib`) and `host.memory_mib`; `default_vcpus` at
    /// least 1 and at most `default_maxvcpus` (0: `host.cpus`) and `host.cpus`;
    /// `default_max_vcpus` at most `host.cpus`; `dial_timeout` 1 to
    /// [`MAX_ANNOTATED_DIAL_TIMEOUT_SECS`](super::MAX_ANNOTATED_DIAL_TIMEOUT_SECS) s.
    pub fn apply_annotations_with(
        &mut self,
        annotations: &BTreeMap<String, String>,
        host: &HostLimits,
    ) -> Result<(), ConfigError> {
        let allowed = self
            .config
            .hypervisor
            .enable_annotations
            .iter()
            .map(|pattern| {
                anchored_regex(pattern).map_err(|message| ConfigError::InvalidPattern {
                    origin: self.origin("hypervisor.qemu.enable_annotations").clone(),
                    key: "hypervisor.qemu.enable_annotations".to_owned(),
                    pattern: pattern.clone(),
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut next = self.clone();
        for (annotation, raw) in annotations {
            let Some(name) = annotation.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let Some((_, key)) = ANNOTATIONS.iter().find(|(known, _)| *known == name) else {
                return Err(ConfigError::UnknownAnnotation { annotation: annotation.clone() });
            };
            let gated = name.strip_prefix("hypervisor.").unwrap_or(name);
            if !allowed.iter().any(|re| re.is_match(gated)) {
                return Err(ConfigError::AnnotationNotAllowed {
                    annotation: annotation.clone(),
                    name: gated.to_owned(),
                });
            }
            if let Some((_, list_key)) = PATH_ALLOW_LISTS.iter().find(|(k, _)| k == key) {
                check_path(annotation, raw, list_key, &string_list(&self.config, list_key))?;
            }
            let mut value = typed_value(annotation, key, raw)?;
            if *key == "hypervisor.qemu.kernel_params" {
                let configured = next.config.hypervisor.kernel_params.trim();
                if !configured.is_empty() {
                    value = toml::Value::String(format!("{configured} {}", raw.trim()));
                }
            }
            next.config
                .assign(key, value)
                .map_err(|message| ConfigError::AnnotationValue { annotation: annotation.clone(), message })?;
            next.origins.insert((*key).to_owned(), Origin::Annotation { name: annotation.clone() });
        }
        next.normalize_boot_image();
        next.check_annotated_limits(host)?;
        *self = next;
        Ok(())
    }

    /// Whether an annotation set a key that shapes the guest VM: any `hypervisor.*` key, and
    /// `agent.debug` and `runtime.enable_debug` (they reach the kernel command line and QEMU's
    /// options); only `agent.dial_timeout` and `runtime.sandbox_cgroup_only` do not. Counts a key
    /// set to the value it already had.
    ///
    /// The runtime boots such a pod on its own instead of cloning it from the shared VM template,
    /// and never makes a template from it: templates are kept per VM configuration, so otherwise
    /// every distinct annotated size would leave a new template on the host's disk and in its
    /// memory, and a pod spec could grow both without bound.
    pub fn vm_annotated(&self) -> bool {
        self.origins.iter().any(|(key, origin)| {
            matches!(origin, Origin::Annotation { .. }) && !ANNOTATED_OUTSIDE_THE_VM.contains(&key.as_str())
        })
    }
}

fn string_list(config: &Config, key: &str) -> Vec<String> {
    config
        .flatten()
        .into_iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, value)| serde_json::from_value(value).ok())
        .unwrap_or_default()
}

fn check_path(annotation: &str, value: &str, list_key: &'static str, globs: &[String]) -> Result<(), ConfigError> {
    let path = Path::new(value);
    let normal =
        path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal {
        // `*` matches `..`, so `/opt/qemu/*` would otherwise admit `/opt/qemu/..`.
        return Err(ConfigError::AnnotationPathNotNormal {
            annotation: annotation.to_owned(),
            value: value.to_owned(),
        });
    }
    if globs.is_empty() {
        return Err(ConfigError::AnnotationPathListEmpty {
            annotation: annotation.to_owned(),
            value: value.to_owned(),
            list_key,
        });
    }
    let allowed = globs.iter().any(|glob| Pattern::new(glob).is_ok_and(|p| p.matches_path_with(path, PATH_MATCH)));
    if allowed {
        Ok(())
    } else {
        Err(ConfigError::AnnotationPathNotAllowed {
            annotation: annotation.to_owned(),
            value: value.to_owned(),
            list_key,
        })
    }
}

/// Parses the annotation string with the type of `key`'s default value.
fn typed_value(annotation: &str, key: &str, raw: &str) -> Result<toml::Value, ConfigError> {
    let mismatch =
        |expected| ConfigError::AnnotationType { annotation: annotation.to_owned(), value: raw.to_owned(), expected };
    let trimmed = raw.trim();
    match Config::default_value(key) {
        Some(serde_json::Value::Bool(_)) => match trimmed {
            "true" => Ok(toml::Value::Boolean(true)),
            "false" => Ok(toml::Value::Boolean(false)),
            _ => Err(mismatch("a boolean (true or false)")),
        },
        Some(serde_json::Value::Number(_)) => {
            trimmed.parse().map(toml::Value::Integer).map_err(|_| mismatch("an integer"))
        }
        Some(serde_json::Value::Array(_)) => {
            const EXPECTED: &str = "a list of strings (a JSON array or space-separated words)";
            let items: Vec<String> = if trimmed.starts_with('[') {
                serde_json::from_str(trimmed).map_err(|_| mismatch(EXPECTED))?
            } else {
                trimmed.split_whitespace().map(str::to_owned).collect()
            };
            Ok(toml::Value::Array(items.into_iter().map(toml::Value::String).collect()))
        }
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}
