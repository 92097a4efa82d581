//! What `kata-runtime install` did to a node (`/var/lib/kata-rs/install.json` under the host root), so that
//! `uninstall` undoes exactly that. Saved after every step, so an install cut short is still undone.
//!
//! The manifest is data from disk, not trusted: uninstall accepts only the paths the installer itself could
//! have written (`Layout::allows`), so a tampered manifest cannot make it remove anything else.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::host::HostRoot;

pub const PATH: &str = "/var/lib/kata-rs/install.json";
/// Where files found at an install target are kept until uninstall puts them back.
pub const ORIGINALS: &str = "/var/lib/kata-rs/originals";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub files: Vec<InstalledFile>,
    #[serde(default)]
    pub links: Vec<InstalledLink>,
    /// Directories the installer created, parents first.
    #[serde(default)]
    pub dirs: Vec<String>,
    #[serde(default)]
    pub containerd_config: Option<ConfigRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledFile {
    pub path: String,
    /// Of what the installer wrote; `None` while it is being written.
    pub sha256: Option<String>,
    /// The file that was there before, saved under `ORIGINALS` (its SHA-256 and mode).
    pub original: Option<Original>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Original {
    pub sha256: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledLink {
    pub path: String,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRecord {
    pub path: String,
    /// The installer created the file (there was none).
    pub created: bool,
    /// The original bytes, kept beside the config.
    pub backup: Option<String>,
}

/// Where the saved original of `host_path` is kept: by file name, which is unique in the layout.
pub fn original_path(host_path: &str) -> String {
    let name = Path::new(host_path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{ORIGINALS}/{name}")
}

impl Manifest {
    pub fn load(root: &HostRoot) -> Result<Option<Manifest>> {
        let Some(bytes) = root.read(PATH)? else { return Ok(None) };
        let manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("parse the install manifest {}", root.display(PATH)))?;
        Ok(Some(manifest))
    }

    /// Writes the manifest; the directories made for it the first time are recorded in it too.
    pub fn save(&mut self, root: &HostRoot) -> Result<()> {
        let mut created = Vec::new();
        root.write(PATH, &mut self.to_bytes()?.as_slice(), 0o600, &mut created)?;
        if !created.is_empty() {
            self.dirs.extend(created);
            root.write(PATH, &mut self.to_bytes()?.as_slice(), 0o600, &mut Vec::new())?;
        }
        Ok(())
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    pub fn file_mut(&mut self, path: &str) -> Option<&mut InstalledFile> {
        self.files.iter_mut().find(|f| f.path == path)
    }

    pub fn file(&self, path: &str) -> Option<&InstalledFile> {
        self.files.iter().find(|f| f.path == path)
    }
}
