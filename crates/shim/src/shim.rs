//! The shim's lifecycle with containerd: `start` (one shim per pod), `delete` (cleanup after a dead shim), and
//! serving the task service.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;
use runtime::error_chain;
use runtime::mounts::Syscalls;
use runtime::paths::{SandboxPaths, DEFAULT_ROOT};

use crate::events::{timestamp, Events};
use crate::options;
use crate::service::{KataTask, Setup};

pub struct KataShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for KataShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KataShim").field("id", &self.id).field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

/// Annotations of the bundle in the current directory (containerd runs `start` and `delete` there).
fn bundle_annotations() -> Option<HashMap<String, String>> {
    let spec = oci_spec::runtime::Spec::load("config.json").ok()?;
    spec.annotations().clone()
}

/// Starts (or finds) the shim server of this container's pod and returns its ttrpc address.
pub async fn start_server(opts: StartOpts) -> containerd_shim::Result<String> {
    let grouping = options::grouping(&opts.id, bundle_annotations().as_ref());
    if let Some(cgroup) = opts.extensions.iter().find_map(options::shim_cgroup) {
        // The server spawned next is born in it, as runc's shim places its server.
        crate::shim_cgroup::join(std::process::id(), &cgroup).map_err(|e| containerd_shim::Error::IoError {
            context: format!("place the shim in cgroup {cgroup} (ShimCgroup option)"),
            err: e,
        })?;
    }
    let config_path = opts.extensions.iter().find_map(options::config_path);
    let config_path = config_path.map(|p| p.display().to_string());
    let mut vars = Vec::new();
    if let Some(p) = config_path.as_deref() {
        vars.push((options::CONFIG_PATH_ENV, p));
    }
    let address = spawn(opts, &grouping, vars).await?;
    containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
    Ok(address)
}

/// `start` as containerd 1.6 speaks it: stdin may carry the runtime options as one `Any`, and stdout must be
/// the bare address (the JSON reply of newer containerd versions is dialled as an address by 1.6).
pub async fn start_for_containerd_1_6(flags: &Flags) -> containerd_shim::Result<String> {
    use std::io::{IsTerminal, Read};

    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::Message;

    let mut input = Vec::new();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        stdin
            .lock()
            .take(1 << 20)
            .read_to_end(&mut input)
            .map_err(|e| containerd_shim::Error::IoError { context: "read start options from stdin".into(), err: e })?;
    }
    let extensions = Any::parse_from_bytes(&input).ok().filter(|a| !a.type_url.is_empty()).into_iter().collect();
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        extensions,
        ..Default::default()
    };
    start_server(opts).await
}

/// Removes the shim socket named in the bundle's `address` file when no server answers on it any more (the
/// shim was killed); a live pod shim keeps its socket.
async fn remove_dead_socket() {
    let Ok(address) = std::fs::read_to_string("address") else { return };
    let path = address.trim().trim_start_matches("unix://").to_string();
    if std::os::unix::net::UnixStream::connect(&path).is_err() && Path::new(&path).exists() {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path, "removed a dead shim's socket"),
            Err(e) => tracing::warn!(path, error = %e, "cannot remove a dead shim's socket"),
        }
    }
}

#[async_trait]
impl Shim for KataShim {
    type T = KataTask;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        KataShim { id: args.id.clone(), namespace: args.namespace.clone(), exit: Arc::new(ExitSignal::default()) }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        start_server(opts).await
    }

    /// Called by containerd when the shim is gone (killed, crashed) or the task must be forgotten: kill the VM
    /// and helpers recorded in the sandbox state, unmount and remove everything of this id.
    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let annotations = bundle_annotations();
        if options::starts_sandbox(annotations.as_ref()) {
            let paths = SandboxPaths::new(Path::new(DEFAULT_ROOT), &self.id);
            match runtime::state::cleanup(&Syscalls, &paths).await {
                Ok(summary) => tracing::info!(sandbox = %self.id, ?summary, "cleaned up the sandbox"),
                Err(e) => tracing::warn!(sandbox = %self.id, error = %error_chain(&e), "cannot clean up the sandbox"),
            }
        } else {
            let sandbox = options::grouping(&self.id, annotations.as_ref());
            let paths = SandboxPaths::new(Path::new(DEFAULT_ROOT), &sandbox);
            runtime::sandbox::release_container_dir(&Syscalls, &paths, &self.id);
        }
        remove_dead_socket().await;
        Ok(DeleteResponse {
            exit_status: 128 + 9,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> KataTask {
        let setup = Setup { host: runtime::Host::real(), root: PathBuf::from(DEFAULT_ROOT) };
        KataTask::new(Events::new(publisher, self.namespace.clone()), self.exit.clone(), setup)
    }
}
