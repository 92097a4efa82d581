//! The benchmark's private containerds: one per kata configuration (virtio-fs, 9p), with runc beside kata
//! on the same containerd and image, plus a CRI one with a CNI bridge for the network stage. Everything
//! is torn down when a [`Stage`] is dropped (containerd's harness removes containers, shims, mounts).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use e2e::cri::CniNetwork;
use e2e::kata::{KataParts, KATA_RUNTIME};
use e2e::{Containerd, ContainerdOptions, CriOptions, OciImage, BUSYBOX_IMAGE, PAUSE_IMAGE};

/// containerd's runc runtime, for comparison.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The CRI handler name that selects kata-rs.
pub const KATA_HANDLER: &str = "kata";

/// Which shared filesystem the guest uses for rootfs and volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedFsKind {
    VirtioFs,
    NineP,
}

impl SharedFsKind {
    pub fn config_value(self) -> &'static str {
        match self {
            SharedFsKind::VirtioFs => "virtio-fs",
            SharedFsKind::NineP => "virtio-9p",
        }
    }
}

/// The runtimes a stage compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Kata,
    Runc,
}

impl Runtime {
    pub fn ctr_name(self) -> &'static str {
        match self {
            Runtime::Kata => KATA_RUNTIME,
            Runtime::Runc => RUNC_RUNTIME,
        }
    }

    pub fn cri_handler(self) -> &'static str {
        match self {
            Runtime::Kata => KATA_HANDLER,
            Runtime::Runc => "runc",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Runtime::Kata => "kata",
            Runtime::Runc => "runc",
        }
    }
}

/// A private containerd (debug log level, for the event timestamps) with the busybox image imported and
/// `KATA_CONF_FILE` pointing at a configuration for `parts`.
#[derive(Debug)]
pub struct Stage {
    // Dropped first: containers and shims go before the configuration file they read.
    pub containerd: Containerd,
    pub shared_fs: SharedFsKind,
    conf_dir: tempfile::TempDir,
    /// With VM templating: where the templates are kept (removed with the stage).
    template_dir: Option<tempfile::TempDir>,
    /// With the VM cache: its server (`kata-runtime factory init`), stopped with the stage.
    cache_server: Option<std::process::Child>,
}

impl Drop for Stage {
    /// Stops the cache server first (SIGTERM: it stops the VMs it holds; pods already handed over stay).
    fn drop(&mut self) {
        if let Some(mut server) = self.cache_server.take() {
            if let Ok(pid) = i32::try_from(server.id()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
            let _ = server.wait();
        }
    }
}

/// `ctr` calls get this long before being killed: a VM boot under TCG on a loaded machine is slow.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(180);

/// Set to put the guest console and the agent's debug log into containerd's log (kept with `KATA_E2E_KEEP=1`),
/// to see where guest time goes. Slows every kata phase down: do not compare such numbers with normal runs.
pub const DEBUG_ENV: &str = "KATA_BENCH_DEBUG";

/// Extra `[hypervisor.qemu]` lines for every kata configuration of a run, to measure one setting against
/// the defaults (e.g. `KATA_BENCH_HYPERVISOR='tcg_tb_size = 32'`).
pub const HYPERVISOR_ENV: &str = "KATA_BENCH_HYPERVISOR";

fn write_configuration(
    parts: &KataParts,
    shared_fs: SharedFsKind,
    template: Option<&Path>,
    cache: Option<(u32, &Path)>,
) -> Result<(tempfile::TempDir, PathBuf)> {
    let debug = std::env::var_os(DEBUG_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    let dir = tempfile::Builder::new().prefix("kata-bench-conf-").tempdir()?;
    let path = dir.path().join("configuration.toml");
    let mut extra = std::env::var(HYPERVISOR_ENV).unwrap_or_default();
    if debug {
        extra.push_str("\nenable_debug = true");
    }
    let mut text = parts
        .configuration(&extra)
        .replace("shared_fs = \"virtio-fs\"", &format!("shared_fs = \"{}\"", shared_fs.config_value()));
    if debug {
        // `[agent.kata]` is the configuration's last section.
        text.push_str("debug = true\n");
    }
    if let Some(dir) = template {
        text.push_str(&format!("[factory]\nenable_template = true\ntemplate_path = \"{}\"\n", dir.display()));
        if let Some((number, endpoint)) = cache {
            text.push_str(&format!("vm_cache_number = {number}\nvm_cache_endpoint = \"{}\"\n", endpoint.display()));
        }
    }
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok((dir, path))
}

impl Stage {
    pub fn start(parts: &KataParts, shared_fs: SharedFsKind) -> Result<Stage> {
        Self::start_with(parts, shared_fs, None, None)
    }

    /// Pods cloned from a VM template (`[factory] enable_template`, which needs 9p). The first kata pod makes
    /// the template.
    pub fn templated(parts: &KataParts) -> Result<Stage> {
        // Under /run, where Kata keeps templates by default.
        let dir = tempfile::Builder::new().prefix("kata-bench-template-").tempdir_in("/run")?;
        Self::start_with(parts, SharedFsKind::NineP, Some(dir), None)
    }

    /// Pods from a warm VM cache of clones (`vm_cache_number = number`), whose server this starts; see
    /// [`Stage::cache_ready`].
    pub fn cached(parts: &KataParts, number: u32) -> Result<Stage> {
        let dir = tempfile::Builder::new().prefix("kata-bench-cache-").tempdir_in("/run")?;
        let endpoint = dir.path().join("cache.sock");
        let mut stage = Self::start_with(parts, SharedFsKind::NineP, Some(dir), Some((number, &endpoint)))?;
        let log = std::fs::File::create(stage.conf_dir().join("cache-server.log"))?;
        let server = std::process::Command::new(parts.shim_dir.join("kata-runtime"))
            .arg("--config")
            .arg(stage.conf_dir().join("configuration.toml"))
            .args(["factory", "init"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("start kata-runtime factory init")?;
        stage.cache_server = Some(server);
        Ok(stage)
    }

    /// How many VMs the cache server says it holds ready (0 when it does not answer).
    pub fn cache_ready(&self, parts: &KataParts) -> usize {
        let out = std::process::Command::new(parts.shim_dir.join("kata-runtime"))
            .arg("--config")
            .arg(self.conf_dir().join("configuration.toml"))
            .args(["factory", "status"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.ends_with(" cached")).count()).unwrap_or(0)
    }

    fn start_with(
        parts: &KataParts,
        shared_fs: SharedFsKind,
        template_dir: Option<tempfile::TempDir>,
        cache: Option<(u32, &Path)>,
    ) -> Result<Stage> {
        let templates = template_dir.as_ref().map(|d| d.path().join("templates"));
        let (conf_dir, conf) = write_configuration(parts, shared_fs, templates.as_deref(), cache)?;
        let containerd = Containerd::start(ContainerdOptions {
            shim_dir: Some(parts.shim_dir.clone()),
            env: vec![("KATA_CONF_FILE".into(), conf.display().to_string())],
            ctr_timeout: CTR_TIMEOUT,
            debug: true,
            ..Default::default()
        })
        .context("start containerd")?;
        containerd.import(&OciImage::busybox(BUSYBOX_IMAGE)?).context("import busybox")?;
        Ok(Stage { containerd, shared_fs, conf_dir, template_dir, cache_server: None })
    }

    pub fn conf_dir(&self) -> &Path {
        self.conf_dir.path()
    }

    /// Where this stage's VM templates are, when it clones pods from one.
    pub fn templates(&self) -> Option<PathBuf> {
        self.template_dir.as_ref().map(|d| d.path().join("templates"))
    }
}

/// A containerd with CRI (namespace `k8s.io`), the handlers `runc` and `kata`, and a private CNI bridge.
#[derive(Debug)]
pub struct CriStage {
    pub containerd: Containerd,
    _conf_dir: tempfile::TempDir,
    // Dropped after containerd (fields drop in order): the bridge outlives the pods on it.
    pub network: CniNetwork,
}

impl CriStage {
    pub fn start(parts: &KataParts) -> Result<CriStage> {
        let network = CniNetwork::create().context("CNI network")?;
        let (conf_dir, conf) = write_configuration(parts, SharedFsKind::VirtioFs, None, None)?;
        let containerd = Containerd::start(ContainerdOptions {
            namespace: "k8s.io".to_owned(),
            shim_dir: Some(parts.shim_dir.clone()),
            env: vec![("KATA_CONF_FILE".into(), conf.display().to_string())],
            cri: Some(CriOptions::new(network.conf_dir())),
            extra_config: format!(
                "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{KATA_HANDLER}]\n  runtime_type = \"{KATA_RUNTIME}\"\n"
            ),
            ctr_timeout: CTR_TIMEOUT,
            ..Default::default()
        })
        .context("start containerd with CRI")?;
        containerd.import(&OciImage::busybox(BUSYBOX_IMAGE)?).context("import busybox")?;
        containerd.import(&OciImage::pause(PAUSE_IMAGE)?).context("import pause")?;
        Ok(CriStage { containerd, _conf_dir: conf_dir, network })
    }
}
