//! OCI image layout tars built locally from Debian's `busybox-static`, because no container registry is
//! reachable from the test machines. The output is byte-for-byte deterministic (fixed mtimes, owners and
//! entry order), so an image can be cached by its manifest digest.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

/// The name tests use for the busybox image, as in Kata's how-to.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:latest";
/// The name of the pause image the CRI plugin is configured with.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.6";
/// Where Debian's `busybox-static` installs the binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Every file in the image carries this mtime (2000-01-01T00:00:00Z) so the output is reproducible.
const FIXED_MTIME: u64 = 946_684_800;
const FIXED_CREATED: &str = "2000-01-01T00:00:00Z";
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Errors while building or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("could not read the busybox binary {path}")]
    ReadBusybox {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not run `{path} --list` to enumerate the applets")]
    ListApplets {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{path} --list` failed or printed no applets")]
    NoApplets { path: PathBuf },
    #[error("image name {name:?} has no tag (expected e.g. `docker.io/library/busybox:latest`)")]
    NoTag { name: String },
    #[error("could not assemble the tar entry {entry}")]
    Tar {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("could not encode the image {what} as JSON")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not write the image tar {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What goes into the image config besides the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// Full reference, e.g. `docker.io/library/busybox:latest`; becomes `io.containerd.image.name`.
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
}

impl ImageConfig {
    /// busybox with `Cmd ["sh"]`, like the registry image.
    pub fn busybox(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            entrypoint: Vec::new(),
            cmd: vec!["sh".to_owned()],
            env: vec![DEFAULT_PATH.to_owned()],
            working_dir: "/".to_owned(),
        }
    }

    /// A pause image: busybox's `sleep infinity` stands in for the pause binary.
    pub fn pause(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            entrypoint: vec!["/bin/sleep".to_owned(), "infinity".to_owned()],
            cmd: Vec::new(),
            env: vec![DEFAULT_PATH.to_owned()],
            working_dir: "/".to_owned(),
        }
    }
}

/// A complete OCI image layout, held as the tar that `ctr image import` takes.
#[derive(Debug, Clone)]
pub struct OciImage {
    name: String,
    manifest_digest: String,
    tar: Vec<u8>,
}

impl OciImage {
    /// The busybox image built from [`DEFAULT_BUSYBOX`].
    pub fn busybox(name: &str) -> Result<Self, ImageError> {
        Self::from_busybox(Path::new(DEFAULT_BUSYBOX), &ImageConfig::busybox(name))
    }

    /// The pause image built from [`DEFAULT_BUSYBOX`].
    pub fn pause(name: &str) -> Result<Self, ImageError> {
        Self::from_busybox(Path::new(DEFAULT_BUSYBOX), &ImageConfig::pause(name))
    }

    /// One-layer image: `busybox` as /bin/busybox, a symlink per applet, /etc/passwd, /etc/group and the
    /// usual empty directories.
    pub fn from_busybox(busybox: &Path, config: &ImageConfig) -> Result<Self, ImageError> {
        let binary =
            fs::read(busybox).map_err(|source| ImageError::ReadBusybox { path: busybox.to_owned(), source })?;
        let applets = busybox_applets(busybox)?;
        let layer = rootfs_layer(&binary, &applets)?;
        Self::from_layer(layer, config)
    }

    fn from_layer(layer: Vec<u8>, config: &ImageConfig) -> Result<Self, ImageError> {
        let tag = image_tag(&config.name)?;
        let arch = oci_arch();
        let layer_digest = sha256_digest(&layer);

        let mut container_config = serde_json::Map::new();
        container_config.insert("Env".into(), json!(config.env));
        if !config.entrypoint.is_empty() {
            container_config.insert("Entrypoint".into(), json!(config.entrypoint));
        }
        if !config.cmd.is_empty() {
            container_config.insert("Cmd".into(), json!(config.cmd));
        }
        container_config.insert("WorkingDir".into(), json!(config.working_dir));
        let image_config = json!({
            "architecture": arch,
            "os": "linux",
            "created": FIXED_CREATED,
            "config": container_config,
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
            "history": [{ "created": FIXED_CREATED, "created_by": "kata-rs e2e image builder (busybox-static)" }],
        });
        let config_blob = to_json("config", &image_config)?;
        let config_digest = sha256_digest(&config_blob);

        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_blob.len() },
            "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len() }],
        });
        let manifest_blob = to_json("manifest", &manifest)?;
        let manifest_digest = sha256_digest(&manifest_blob);

        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_blob.len(),
                "platform": { "architecture": arch, "os": "linux" },
                "annotations": {
                    "io.containerd.image.name": config.name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        });
        let index_blob = to_json("index", &index)?;

        let mut out = TarWriter::new();
        out.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?;
        out.file("index.json", &index_blob, 0o644)?;
        out.dir("blobs/", 0o755)?;
        out.dir("blobs/sha256/", 0o755)?;
        let mut blobs =
            [(&layer_digest, &layer[..]), (&config_digest, &config_blob[..]), (&manifest_digest, &manifest_blob[..])];
        blobs.sort_by(|a, b| a.0.cmp(b.0));
        for (digest, blob) in blobs {
            let hex = digest.trim_start_matches("sha256:");
            out.file(&format!("blobs/sha256/{hex}"), blob, 0o644)?;
        }
        Ok(Self { name: config.name.clone(), manifest_digest, tar: out.finish()? })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sha256:<hex>` of the manifest: identifies the image content.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    pub fn tar_bytes(&self) -> &[u8] {
        &self.tar
    }

    /// Writes the layout tar to `path` (atomically, through a temporary file beside it).
    pub fn write_to(&self, path: &Path) -> Result<(), ImageError> {
        let err = |source| ImageError::Write { path: path.to_owned(), source };
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &self.tar).map_err(err)?;
        fs::rename(&tmp, path).map_err(err)
    }

    /// Writes the tar into `dir` under a name derived from the image name and manifest digest, unless a
    /// file of that name is already there; returns its path.
    pub fn write_cached(&self, dir: &Path) -> Result<PathBuf, ImageError> {
        fs::create_dir_all(dir).map_err(|source| ImageError::Write { path: dir.to_owned(), source })?;
        let short = self.manifest_digest.trim_start_matches("sha256:").get(..16).unwrap_or_default();
        let safe_name: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
            .collect();
        let path = dir.join(format!("{safe_name}-{short}.tar"));
        if !path.exists() {
            self.write_to(&path)?;
        }
        Ok(path)
    }
}

/// The applet names `busybox --list` prints, sorted, without `busybox` itself.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|source| ImageError::ListApplets { path: busybox.to_owned(), source })?;
    let mut applets: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    if !output.status.success() || applets.is_empty() {
        return Err(ImageError::NoApplets { path: busybox.to_owned() });
    }
    applets.sort();
    applets.dedup();
    Ok(applets)
}

fn rootfs_layer(busybox: &[u8], applets: &[String]) -> Result<Vec<u8>, ImageError> {
    let mut layer = TarWriter::new();
    for (dir, mode) in [
        ("bin/", 0o755),
        ("dev/", 0o755),
        ("etc/", 0o755),
        ("home/", 0o755),
        ("proc/", 0o555),
        ("root/", 0o700),
        ("run/", 0o755),
        ("sys/", 0o555),
        ("tmp/", 0o1777),
        ("usr/", 0o755),
        ("usr/bin/", 0o755),
        ("var/", 0o755),
        ("var/tmp/", 0o1777),
    ] {
        layer.dir(dir, mode)?;
    }
    layer.file("bin/busybox", busybox, 0o755)?;
    for applet in applets {
        layer.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    layer.symlink("usr/bin/env", "/bin/busybox")?;
    layer.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    layer.file("etc/group", b"root:x:0:\nnobody:x:65534:\n", 0o644)?;
    layer.finish()
}

/// A tar builder whose headers carry nothing that varies between runs.
struct TarWriter {
    builder: tar::Builder<Vec<u8>>,
}

impl TarWriter {
    fn new() -> Self {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        Self { builder }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(FIXED_MTIME);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), ImageError> {
        let mut header = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.builder.append_data(&mut header, path, data).map_err(|source| tar_error(path, source))
    }

    fn dir(&mut self, path: &str, mode: u32) -> Result<(), ImageError> {
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.builder.append_data(&mut header, path, io::empty()).map_err(|source| tar_error(path, source))
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<(), ImageError> {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut header, path, target).map_err(|source| tar_error(path, source))
    }

    fn finish(self) -> Result<Vec<u8>, ImageError> {
        self.builder.into_inner().map_err(|source| tar_error("(end of archive)", source))
    }
}

fn tar_error(entry: &str, source: io::Error) -> ImageError {
    ImageError::Tar { entry: entry.to_owned(), source }
}

fn to_json(what: &'static str, value: &serde_json::Value) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|source| ImageError::Json { what, source })
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The tag of a reference: what follows the last `:` after the last `/` (`latest` for `busybox:latest`).
fn image_tag(name: &str) -> Result<&str, ImageError> {
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.rsplit_once(':') {
        Some((_, tag)) if !tag.is_empty() => Ok(tag),
        _ => Err(ImageError::NoTag { name: name.to_owned() }),
    }
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn fake_image(config: &ImageConfig) -> OciImage {
        let layer = rootfs_layer(b"\x7fELF fake", &["sh".to_owned(), "echo".to_owned()]).unwrap();
        OciImage::from_layer(layer, config).unwrap()
    }

    fn entries(tar_bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut archive = tar::Archive::new(tar_bytes);
        let mut out = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.insert(path, data);
        }
        out
    }

    #[test]
    fn tags_are_taken_after_the_last_slash() {
        assert_eq!(image_tag("docker.io/library/busybox:latest").unwrap(), "latest");
        assert_eq!(image_tag("localhost:5000/pause:3.6").unwrap(), "3.6");
        assert!(image_tag("localhost:5000/pause").is_err());
    }

    #[test]
    fn output_is_deterministic() {
        let a = fake_image(&ImageConfig::busybox(BUSYBOX_IMAGE));
        let b = fake_image(&ImageConfig::busybox(BUSYBOX_IMAGE));
        assert_eq!(a.tar_bytes(), b.tar_bytes());
        assert_eq!(a.manifest_digest(), b.manifest_digest());
        let pause = fake_image(&ImageConfig::pause(PAUSE_IMAGE));
        assert_ne!(a.manifest_digest(), pause.manifest_digest());
    }

    #[test]
    fn layout_has_annotated_index_and_all_blobs() {
        let image = fake_image(&ImageConfig::busybox(BUSYBOX_IMAGE));
        let files = entries(image.tar_bytes());
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(entry["annotations"]["io.containerd.image.name"], BUSYBOX_IMAGE);
        assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], "latest");
        assert_eq!(entry["digest"], image.manifest_digest());
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(sha256_digest(data), format!("sha256:{hex}"), "{path}");
            }
        }
        let manifest_path = format!("blobs/sha256/{}", image.manifest_digest().trim_start_matches("sha256:"));
        let manifest: serde_json::Value = serde_json::from_slice(&files[&manifest_path]).unwrap();
        let config_path =
            format!("blobs/sha256/{}", manifest["config"]["digest"].as_str().unwrap().trim_start_matches("sha256:"));
        let config: serde_json::Value = serde_json::from_slice(&files[&config_path]).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert_eq!(config["rootfs"]["diff_ids"][0], manifest["layers"][0]["digest"]);
    }

    #[test]
    fn layer_has_busybox_applet_links_and_accounts() {
        let layer = rootfs_layer(b"bin", &["sh".to_owned()]).unwrap();
        let mut archive = tar::Archive::new(&layer[..]);
        let mut seen = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), FIXED_MTIME);
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let link = entry.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
            seen.insert(path, (header.entry_type(), link, header.mode().unwrap()));
        }
        assert_eq!(seen["bin/sh"].1.as_deref(), Some("busybox"));
        assert_eq!(seen["tmp/"].2, 0o1777);
        assert!(seen.contains_key("etc/passwd") && seen.contains_key("etc/group"));
        for dir in ["proc/", "sys/", "dev/"] {
            assert!(seen[dir].0.is_dir(), "{dir}");
        }
    }

    #[test]
    fn real_busybox_lists_the_applets_tests_use() {
        let path = Path::new(DEFAULT_BUSYBOX);
        testutil::skip_unless!(
            (!path.exists()).then(|| format!("{DEFAULT_BUSYBOX} is missing (install busybox-static)"))
        );
        let applets = busybox_applets(path).unwrap();
        for needed in ["sh", "echo", "cat", "sleep", "uname", "httpd", "nc"] {
            assert!(applets.iter().any(|a| a == needed), "{needed} missing");
        }
    }
}
