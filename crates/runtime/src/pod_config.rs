//! A pod's effective configuration: the file containerd or `KATA_CONF_FILE` names (or the standard places),
//! its drop-ins, then the pod's annotations where the configuration allows them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use types::config::{Config, ConfigError, ConfigSearch};

/// Loads, annotates and validates the configuration of the pod with `annotations`. Warnings are logged.
pub fn resolve(
    sandbox_id: &str,
    config_path: Option<PathBuf>,
    annotations: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let mut loaded = ConfigSearch::standard(config_path).load()?;
    loaded.apply_annotations(annotations)?;
    loaded.validate()?;
    for warning in &loaded.warnings {
        tracing::warn!(sandbox = sandbox_id, "configuration: {warning}");
    }
    if loaded.vm_annotated() && loaded.config.factory.enable_template {
        // A pod spec must never make the node create (or pick) a template of its own choosing.
        tracing::info!(
            sandbox = sandbox_id,
            "its annotations change the VM, so it boots on its own, not from the VM template"
        );
        loaded.config.factory.enable_template = false;
    }
    Ok(loaded.config)
}
