//! What the stand-in of a VM serves on its control socket. The VM belongs to one container: a lone container,
//! or a pod's sandbox (pause) container. A pod's other containers (CRI's `io.kubernetes.cri.container-type:
//! container` with `io.kubernetes.cri.sandbox-id`) join that VM: their own stand-ins send `Join`, and every
//! request about them names them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use oci_spec::runtime::Spec;
use runtime::io::IoPaths;
use runtime::{error_chain, LifecycleError, Rootfs, Sandbox};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::control::{Envelope, Io, Reply, Request};
use super::dir::{ContainerDir, Record};

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// How long `Remove` waits for a killed container's init to end.
const REMOVE_KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod whose VM container `id` (with these annotations) joins, when it is a pod's container; `None` for a
/// container that gets a VM of its own (a lone one, or a pod's sandbox container).
pub fn pod_of(id: &str, annotations: &BTreeMap<String, String>) -> Result<Option<String>> {
    if annotations.get(CONTAINER_TYPE).map(String::as_str) != Some("container") {
        return Ok(None);
    }
    let pod = annotations
        .get(SANDBOX_ID)
        .ok_or_else(|| anyhow!("{CONTAINER_TYPE} is container but {SANDBOX_ID} is missing"))?;
    runtime::paths::check_id("sandbox", pod).map_err(|e| anyhow!("{SANDBOX_ID}: {e}"))?;
    if pod == id {
        bail!("{SANDBOX_ID} names the container itself");
    }
    Ok(Some(pod.clone()))
}

/// The rootfs directory of a bundle's spec (relative to the bundle unless absolute).
pub fn rootfs_of(spec: &Spec, bundle: &Path) -> PathBuf {
    let rootfs = spec.root().as_ref().map(|r| r.path().clone()).unwrap_or_else(|| PathBuf::from("rootfs"));
    if rootfs.is_absolute() {
        rootfs
    } else {
        bundle.join(rootfs)
    }
}

pub fn io_paths(io: &Io) -> IoPaths {
    IoPaths { stdin: io.stdin.clone(), stdout: io.stdout.clone(), stderr: io.stderr.clone(), terminal: io.terminal }
}

/// The spec of container `id` that asks to join pod `pod`: its own annotations must name that pod (a container
/// cannot be put into another pod's VM by whoever reaches the pod's socket with a different bundle).
pub fn member_spec(pod: &str, id: &str, bundle: &Path) -> Result<Spec> {
    let spec_path = bundle.join("config.json");
    let spec = Spec::load(&spec_path).map_err(|e| anyhow!("{}: {}", spec_path.display(), error_chain(&e)))?;
    let annotations: BTreeMap<String, String> = spec.annotations().clone().unwrap_or_default().into_iter().collect();
    if pod_of(id, &annotations)?.as_deref() != Some(pod) {
        bail!("container {id} does not belong to pod {pod} (its {SANDBOX_ID})");
    }
    Ok(spec)
}

/// A VM and the containers in it.
pub struct Pod {
    /// The container the VM was started for: its init's exit ends the stand-in.
    pub id: String,
    pub sandbox: Arc<Sandbox>,
    dir: ContainerDir,
    record: Mutex<Record>,
    /// The containers that joined, with their stand-ins' pids.
    members: Mutex<HashMap<String, u32>>,
}

fn chain(e: LifecycleError) -> anyhow::Error {
    anyhow!(error_chain(&e))
}

impl Pod {
    pub fn new(sandbox: Sandbox, dir: ContainerDir, record: Record) -> Self {
        Pod {
            id: record.id.clone(),
            sandbox: Arc::new(sandbox),
            dir,
            record: Mutex::new(record),
            members: Mutex::new(HashMap::new()),
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the VM's own container's status for the commands that run after the stand-in is gone.
    pub fn set_status(&self, status: &str, exit_status: Option<u32>) {
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        record.status = status.to_string();
        record.exit_status = exit_status;
        if let Err(e) = self.dir.save(&record) {
            tracing::warn!(error = %format!("{e:#}"), "save the container's state");
        }
    }

    fn status(&self, id: &str) -> Result<&'static str> {
        let state = self.sandbox.state(id, "").map_err(chain)?;
        Ok(match state.status {
            runtime::Status::Created => "created",
            runtime::Status::Running => "running",
            runtime::Status::Paused => "paused",
            runtime::Status::Stopped => "stopped",
        })
    }

    /// Passes a signal the stand-in of container `id` received on to its init, once that started.
    pub async fn forward_signal(&self, id: &str, signal: u32) {
        if matches!(self.status(id), Ok("running" | "paused")) {
            if let Err(e) = self.sandbox.kill(id, "", signal, false).await {
                tracing::debug!(error = %error_chain(&e), "forward a signal");
            }
        }
    }

    /// The exit status of container `id`'s init, once it exits.
    pub async fn wait(&self, id: &str) -> u32 {
        match self.sandbox.wait(id, "").await {
            Ok(Some(exit)) => exit.status,
            _ => runtime::process::VM_DIED_STATUS,
        }
    }

    async fn handle(&self, env: Envelope, out: &mut OwnedWriteHalf) -> Result<Reply> {
        let own = env.container.is_none() || env.container.as_deref() == Some(self.id.as_str());
        let id = env.container.unwrap_or_else(|| self.id.clone());
        let member_pid = self.members().get(&id).copied();
        if !own && member_pid.is_none() {
            if env.request == Request::Remove {
                return Ok(Reply::default());
            }
            bail!("container {id} is not in the VM of {}", self.id);
        }
        let sandbox = &self.sandbox;
        match env.request {
            Request::Start => {
                sandbox.start_process(&id, "", |_| ()).await.map_err(chain)?;
                if own {
                    self.set_status("running", None);
                }
            }
            Request::State => return Ok(Reply { status: Some(self.status(&id)?.to_string()), ..Default::default() }),
            Request::Kill { signal, all } => match sandbox.kill(&id, "", signal, all).await {
                Err(LifecycleError::Finished) => return Err(super::not_running(&id)),
                killed => killed.map_err(chain)?,
            },
            Request::Signal { signal } => self.forward_signal(&id, signal).await,
            Request::Pause => {
                sandbox.pause(&id).await.map_err(chain)?;
                if own {
                    self.set_status("paused", None);
                }
            }
            Request::Resume => {
                sandbox.resume(&id).await.map_err(chain)?;
                if own {
                    self.set_status("running", None);
                }
            }
            Request::Update { resources } => {
                sandbox.update(&id, &serde_json::to_vec(&resources)?).await.map_err(chain)?;
            }
            Request::Ps => {
                let list = sandbox.pids(&id).await.map_err(chain)?;
                let init = member_pid.unwrap_or_else(std::process::id);
                let others = list.pids.iter().filter(|&&p| Some(p) != list.init).filter_map(|&p| u32::try_from(p).ok());
                let pids = list.init.map(|_| init).into_iter().chain(others).collect();
                return Ok(Reply { pids: Some(pids), ..Default::default() });
            }
            Request::Stats => {
                let stats = sandbox.stats(&id).await.map_err(chain)?;
                return Ok(Reply { stats: Some(super::events::runc_stats(&stats)), ..Default::default() });
            }
            Request::Exec { exec_id, process, io } => return self.exec(&id, &exec_id, process, &io, out).await,
            Request::Resize { exec_id, rows, cols } => {
                sandbox.resize_pty(&id, &exec_id, rows, cols).await.map_err(chain)?;
            }
            Request::Delete { force } => match self.status(&id)? {
                // A never-started init ends at once, as runc's created container does.
                "created" => sandbox.kill(&id, "", 9, false).await.map_err(chain)?,
                "stopped" => {}
                _ if force => sandbox.kill(&id, "", 9, true).await.map_err(chain)?,
                status => bail!("cannot delete container {id} that is not stopped: {status}"),
            },
            Request::Remove if own => bail!("container {id} owns the VM: it goes when its stand-in stops the VM"),
            Request::Remove => self.remove(&id).await?,
            Request::Join { .. } => bail!("container {id} already exists"),
        }
        Ok(Reply::default())
    }

    /// Adds and starts an exec; replies once it started, then returns its exit for the final reply.
    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: serde_json::Value,
        io: &Io,
        out: &mut OwnedWriteHalf,
    ) -> Result<Reply> {
        let sandbox = &self.sandbox;
        sandbox.exec(id, exec_id, serde_json::to_vec(&process)?, io_paths(io)).map_err(chain)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let started = sandbox
            .start_process(id, exec_id, move |e| {
                let _ = tx.send(e.status);
            })
            .await;
        if let Err(e) = started {
            let _ = sandbox.delete(id, exec_id).await;
            return Err(chain(e));
        }
        write_reply(out, &Reply::default()).await?;
        let status = rx.await.unwrap_or(runtime::process::VM_DIED_STATUS);
        if let Err(e) = sandbox.delete(id, exec_id).await {
            tracing::warn!(exec = %exec_id, error = %error_chain(&e), "delete the exec");
        }
        Ok(Reply { exit: Some(status), ..Default::default() })
    }

    /// Creates a pod's container in the VM, from its bundle, with its stand-in's IO.
    async fn create_member(&self, id: &str, bundle: &Path, io: &Io, pid: u32) -> Result<()> {
        if id == self.id || self.members().contains_key(id) {
            bail!("container {id} already exists");
        }
        let spec = member_spec(&self.id, id, bundle)?;
        let rootfs = Rootfs::Dir(rootfs_of(&spec, bundle));
        let bundle = bundle.display().to_string();
        self.sandbox.create(id, &spec, &rootfs, &bundle, io_paths(io), false).await.map_err(chain)?;
        if !io.stdin.is_empty() && !io.terminal {
            // Drop the stdin forwarding's own writer: the process sees end of file when the shim closes its end.
            let _ = self.sandbox.close_stdin(id, "").await;
        }
        self.members().insert(id.to_string(), pid);
        Ok(())
    }

    /// A pod's container joins: created, then the connection waits for its init's exit. Its stand-in going
    /// away first (killed) kills the container: nothing relays its IO any more.
    async fn join(
        &self,
        id: &str,
        bundle: &Path,
        io: &Io,
        pid: u32,
        lines: &mut Lines<BufReader<OwnedReadHalf>>,
        out: &mut OwnedWriteHalf,
    ) {
        if let Err(e) = self.create_member(id, bundle, io, pid).await {
            let _ = write_reply(out, &Reply::error(format!("create the container: {e:#}"))).await;
            return;
        }
        if write_reply(out, &Reply::default()).await.is_ok() {
            tokio::select! {
                status = self.wait(id) => {
                    let _ = write_reply(out, &Reply { exit: Some(status), ..Default::default() }).await;
                    return;
                }
                _ = lines.next_line() => {}
            }
        }
        tracing::info!(container = %id, "the container's stand-in went away: killing the container");
        if let Err(e) = self.sandbox.kill(id, "", 9, true).await {
            tracing::debug!(container = %id, error = %error_chain(&e), "kill the container");
        }
    }

    /// Takes a pod's container out of the VM (killing it first when it still runs).
    async fn remove(&self, id: &str) -> Result<()> {
        if matches!(self.status(id), Ok("created" | "running" | "paused")) {
            let _ = self.sandbox.kill(id, "", 9, true).await;
            if tokio::time::timeout(REMOVE_KILL_TIMEOUT, self.wait(id)).await.is_err() {
                bail!("container {id} did not end within {REMOVE_KILL_TIMEOUT:?} of SIGKILL");
            }
        }
        match self.sandbox.delete(id, "").await {
            Ok(_) | Err(LifecycleError::NoContainer(_)) => {}
            Err(e) => return Err(chain(e)),
        }
        self.members().remove(id);
        Ok(())
    }
}

pub async fn write_reply(out: &mut OwnedWriteHalf, reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    Ok(())
}

/// Serves one connection: requests in turn until it closes (a `Join` keeps it until the container exits).
pub async fn serve_connection(pod: Arc<Pod>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Envelope>(&line) {
            Ok(Envelope { container: Some(id), request: Request::Join { bundle, io, pid } }) => {
                return pod.join(&id, &bundle, &io, pid, &mut lines, &mut write).await;
            }
            Ok(env) => pod.handle(env, &mut write).await.unwrap_or_else(|e| Reply::error(format!("{e:#}"))),
            Err(e) => Reply::error(format!("bad request: {e}")),
        };
        if write_reply(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn only_a_pods_container_joins_another_vm() {
        assert_eq!(pod_of("c1", &annotations(&[])).unwrap(), None);
        let sandbox = annotations(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "p1")]);
        assert_eq!(pod_of("p1", &sandbox).unwrap(), None);
        let member = annotations(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p1")]);
        assert_eq!(pod_of("c1", &member).unwrap(), Some("p1".to_string()));
    }

    #[test]
    fn a_pods_container_must_name_a_plausible_pod() {
        let missing = annotations(&[(CONTAINER_TYPE, "container")]);
        assert!(pod_of("c1", &missing).unwrap_err().to_string().contains(SANDBOX_ID));
        for bad in ["../c2", "a/b", "", ".x"] {
            let escape = annotations(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, bad)]);
            assert!(pod_of("c1", &escape).is_err(), "{bad:?}");
        }
        let itself = annotations(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "c1")]);
        assert!(pod_of("c1", &itself).is_err());
    }

    #[test]
    fn a_container_joins_only_the_pod_its_spec_names() {
        let bundle = tempfile::tempdir().unwrap();
        let write = |pairs: &[(&str, &str)]| {
            let mut spec = Spec::default();
            spec.set_annotations(Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
            spec.save(bundle.path().join("config.json")).unwrap();
        };
        write(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p1")]);
        assert!(member_spec("p1", "c1", bundle.path()).is_ok());
        let err = member_spec("p2", "c1", bundle.path()).unwrap_err().to_string();
        assert!(err.contains("does not belong to pod p2"), "{err}");
        write(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "p1")]);
        assert!(member_spec("p1", "c1", bundle.path()).is_err());
        write(&[]);
        assert!(member_spec("p1", "c1", bundle.path()).is_err());
        std::fs::remove_file(bundle.path().join("config.json")).unwrap();
        assert!(member_spec("p1", "c1", bundle.path()).unwrap_err().to_string().contains("config.json"));
    }

    #[test]
    fn rootfs_is_relative_to_the_bundle() {
        let mut spec = Spec::default();
        assert_eq!(rootfs_of(&spec, Path::new("/b")), PathBuf::from("/b/rootfs"));
        let mut root = oci_spec::runtime::Root::default();
        root.set_path(PathBuf::from("/elsewhere/fs"));
        spec.set_root(Some(root));
        assert_eq!(rootfs_of(&spec, Path::new("/b")), PathBuf::from("/elsewhere/fs"));
    }
}
