//! `kata-runtime env`: the resolved configuration and where each value came from.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;
use types::config::{ConfigSearch, Setting};

#[derive(Debug, Serialize)]
struct EnvReport {
    files: Vec<PathBuf>,
    warnings: Vec<String>,
    settings: Vec<Setting>,
}

pub fn run(config_path: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let loaded = ConfigSearch::standard(config_path).load()?;
    let report =
        EnvReport { files: loaded.files.clone(), warnings: loaded.warnings.clone(), settings: loaded.settings() };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for f in &report.files {
        println!("# file: {}", f.display());
    }
    for w in &report.warnings {
        println!("# warning: {w}");
    }
    for s in &report.settings {
        println!("{} = {}    # {}", s.key, s.value, s.origin);
    }
    Ok(ExitCode::SUCCESS)
}
