//! `kata-runtime factory init|status|destroy`: the VM template that pod VMs are cloned from when
//! `[factory] enable_template = true`. A shim makes the template itself when it first needs one; `init` makes
//! it ahead of time, so no pod pays for the template's boot.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use runtime::paths::SandboxPaths;
use types::config::ConfigSearch;

#[derive(Debug, Subcommand)]
pub enum FactoryCommand {
    /// Make the VM templates for the current configuration, for pods without and with a network (a no-op
    /// for those that exist).
    Init,
    /// List the templates and the memory each holds.
    Status,
    /// Remove every template. Running pods keep theirs in memory.
    Destroy,
}

pub fn run(config_path: Option<PathBuf>, command: FactoryCommand) -> Result<ExitCode> {
    let loaded = ConfigSearch::standard(config_path).load()?;
    let root = PathBuf::from(&loaded.config.factory.template_path);
    match command {
        FactoryCommand::Init => {
            if !loaded.config.factory.enable_template {
                bail!(
                    "factory.enable_template is false in {}: pods boot their own VMs, there is no template to make",
                    files(&loaded.files)
                );
            }
            loaded.validate()?;
            let scratch = std::env::temp_dir().join(format!("kata-runtime-factory-{}", std::process::id()));
            let vm =
                runtime::vm_config::vm_config("template", &loaded.config, &SandboxPaths::new(&scratch, "template"))?;
            let timeout = Duration::from_secs(u64::from(loaded.config.agent.dial_timeout.max(1)));
            let rt = tokio_runtime()?;
            let hv = runtime::Host::real().hypervisor;
            // Every template a shim may clone from (see runtime::factory::template_config).
            for config in runtime::factory::template_configs(&vm) {
                let template = rt.block_on(runtime::factory::ensure_waiting(&*hv, &root, &config, timeout))?;
                println!("{}", template.dir.display());
            }
        }
        FactoryCommand::Status => {
            let templates = runtime::factory::list(&root);
            if templates.is_empty() {
                println!("no VM template in {}", root.display());
            }
            for t in templates {
                let state = if t.complete { "ready" } else { "incomplete" };
                println!("{}  {state}  {:.1} MiB of memory", t.dir.display(), t.memory_bytes as f64 / 1048576.0);
            }
        }
        FactoryCommand::Destroy => {
            for dir in tokio_runtime()?.block_on(runtime::factory::destroy(&root))? {
                println!("removed {}", dir.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the tokio runtime")
}

fn files(files: &[PathBuf]) -> String {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    if names.is_empty() {
        "the built-in defaults".to_string()
    } else {
        names.join(", ")
    }
}
