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
    /// for those that exist). With `vm_cache_number` > 0, then serve the VM cache in the foreground until
    /// SIGTERM or SIGINT (or `factory destroy`).
    Init,
    /// List the templates and the memory each holds, and the VMs the cache holds ready.
    Status,
    /// Stop the VM cache server (and its VMs), and remove every template. Running pods keep theirs in memory.
    Destroy,
}

pub fn run(config_path: Option<PathBuf>, command: FactoryCommand) -> Result<ExitCode> {
    let loaded = ConfigSearch::standard(config_path).load()?;
    let root = PathBuf::from(&loaded.config.factory.template_path);
    match command {
        FactoryCommand::Init if loaded.config.factory.vm_cache_number > 0 => {
            loaded.validate()?;
            // The server runs for long: what it does (and why a VM could not be made) goes to stderr, at the
            // level RUST_LOG asks for (info by default).
            let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .try_init();
            let rt = tokio_runtime()?;
            if loaded.config.factory.enable_template {
                rt.block_on(make_templates(&loaded.config, &root))?;
            }
            let opts = runtime::vm_cache::server::ServerOptions {
                config: loaded.config.clone(),
                endpoint: PathBuf::from(&loaded.config.factory.vm_cache_endpoint),
                number: loaded.config.factory.vm_cache_number,
                dial_timeout: Duration::from_secs(u64::from(loaded.config.agent.dial_timeout.max(1))),
            };
            let hv = runtime::Host::real().hypervisor;
            rt.block_on(runtime::vm_cache::server::serve(opts, hv, termination()))?;
        }
        FactoryCommand::Init => {
            if !loaded.config.factory.enable_template {
                bail!(
                    "factory.enable_template is false in {}: pods boot their own VMs, there is no template to make",
                    files(&loaded.files)
                );
            }
            loaded.validate()?;
            tokio_runtime()?.block_on(make_templates(&loaded.config, &root))?;
        }
        FactoryCommand::Status => {
            let endpoint = PathBuf::from(&loaded.config.factory.vm_cache_endpoint);
            if endpoint.exists() {
                let request = runtime::vm_cache::Request::Status;
                match tokio_runtime()?.block_on(runtime::vm_cache::call(&endpoint, &request, Duration::from_secs(5))) {
                    Ok(runtime::vm_cache::Reply::Status { ready }) => {
                        println!("VM cache at {}: {} VM(s) ready", endpoint.display(), ready.len());
                        for vm in ready {
                            println!("{}  {} NIC(s)  cached", vm.dir.display(), vm.nics);
                        }
                    }
                    Ok(other) => println!("VM cache at {}: unexpected answer {other:?}", endpoint.display()),
                    Err(e) => println!("VM cache at {}: {}", endpoint.display(), runtime::error_chain(&e)),
                }
            }
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
            let endpoint = PathBuf::from(&loaded.config.factory.vm_cache_endpoint);
            let rt = tokio_runtime()?;
            if endpoint.exists() {
                let request = runtime::vm_cache::Request::Quit;
                match rt.block_on(runtime::vm_cache::call(&endpoint, &request, Duration::from_secs(5))) {
                    Ok(_) => println!("stopped the VM cache at {}", endpoint.display()),
                    Err(e) => eprintln!("VM cache at {}: {}", endpoint.display(), runtime::error_chain(&e)),
                }
            }
            for dir in rt.block_on(runtime::vm_cache::server::clean_unserved())? {
                println!("removed {}", dir.display());
            }
            for dir in tokio_runtime()?.block_on(runtime::factory::destroy(&root))? {
                println!("removed {}", dir.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every template a shim may clone from (see runtime::factory::template_config); prints each one's directory.
async fn make_templates(config: &types::config::Config, root: &std::path::Path) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("kata-runtime-factory-{}", std::process::id()));
    let vm = runtime::vm_config::vm_config("template", config, &SandboxPaths::new(&scratch, "template"))?;
    let timeout = Duration::from_secs(u64::from(config.agent.dial_timeout.max(1)));
    let hv = runtime::Host::real().hypervisor;
    for config in runtime::factory::template_configs(&vm) {
        let template = runtime::factory::ensure_waiting(&*hv, root, &config, timeout).await?;
        println!("{}", template.dir.display());
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
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
