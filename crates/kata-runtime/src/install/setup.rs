//! `kata-runtime install`: everything is checked before anything is written (the payload, containerd's
//! config and the merged text, every target), then each step is recorded in the manifest as it is done.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::containerd::{restart_and_check, Containerd};
use super::containerd_config::{merge, strip, CREATED};
use super::host::{sha256_of, Entry, HostRoot};
use super::manifest::{self, ConfigRecord, InstalledFile, InstalledLink, Manifest, Original};
use super::{backup_path, Item, Options, FILES, KATA_CONFIG, LINK, QEMU};

/// What to do about one target.
#[derive(Debug)]
enum Target {
    /// Missing, or the file a previous install wrote: write over it.
    Write,
    /// Already what the payload holds.
    Same,
    /// Someone else's file: save it for uninstall, then write.
    SaveThenWrite(Original),
}

/// The containerd config as found, and what it becomes.
#[derive(Debug)]
struct ConfigPlan {
    /// Bytes now on disk (`None`: no file).
    current: Option<String>,
    /// The config without kata-rs's block: what uninstall gives back.
    original: String,
    created: bool,
    mode: u32,
    merged: String,
}

pub fn install(payload: &Path, opts: &Options, containerd: &dyn Containerd) -> Result<Vec<String>> {
    let root = HostRoot::open(&opts.host_root)?;
    let mut notes = Vec::new();
    let mut manifest = Manifest::load(&root)?.unwrap_or_default();

    let sources = payload_files(payload)?;
    let config = plan_config(&root, opts, &manifest)?;
    let mut targets = Vec::new();
    for (item, sha256) in &sources {
        targets.push(plan_target(&root, item, sha256, &manifest)?);
    }

    manifest.save(&root)?;
    for ((item, _), target) in FILES.iter().zip(&sources).zip(targets) {
        match target {
            Target::Same => {
                notes.push(format!("{} is up to date", root.display(item.to)));
                continue;
            }
            Target::SaveThenWrite(original) => save_original(&root, item.to, original, &mut manifest)?,
            Target::Write => {
                if manifest.file(item.to).is_none() {
                    manifest.files.push(InstalledFile { path: item.to.into(), sha256: None, original: None });
                }
            }
        }
        let mut source = File::open(payload.join(item.from))
            .with_context(|| format!("open {}", payload.join(item.from).display()))?;
        let sha256 = root.write(item.to, &mut source, item.mode, &mut manifest.dirs)?;
        if let Some(entry) = manifest.file_mut(item.to) {
            entry.sha256 = Some(sha256);
        }
        manifest.save(&root)?;
        notes.push(format!("installed {}", root.display(item.to)));
    }
    install_link(&root, &mut manifest, &mut notes)?;

    let changed = install_config(&root, opts, config, &mut manifest, &mut notes)?;
    if !matches!(root.inspect(QEMU)?, Entry::File { .. }) {
        notes.push(format!(
            "warning: {} is missing: kata-rs pods need QEMU (Debian package qemu-system-x86) on the node",
            root.display(QEMU)
        ));
    }
    if opts.restart {
        restart_and_check(containerd, changed, opts.cri_timeout).map_err(|e| {
            anyhow!("{e:#}; containerd's config has the kata runtime, `kata-runtime uninstall` takes it out again")
        })?;
        notes.push("containerd's CRI plugin is up: RuntimeClass handler \"kata\" is ready".into());
    } else if changed {
        notes.push("containerd was not restarted (--no-restart): restart it to use the kata runtime".into());
    }
    Ok(notes)
}

/// The payload's files with their SHA-256, all present before anything is written.
fn payload_files(payload: &Path) -> Result<Vec<(Item, String)>> {
    FILES
        .iter()
        .map(|item| {
            let path = payload.join(item.from);
            let mut file = File::open(&path).with_context(|| {
                format!(
                    "the payload {} has no {} (expected the release layout: bin/, share/kata-containers/, \
                     share/defaults/kata-containers/)",
                    payload.display(),
                    item.from
                )
            })?;
            if !file.metadata()?.is_file() {
                bail!("{} is not a regular file", path.display());
            }
            Ok((*item, sha256_of(&mut file).with_context(|| format!("read {}", path.display()))?))
        })
        .collect()
}

fn plan_config(root: &HostRoot, opts: &Options, manifest: &Manifest) -> Result<ConfigPlan> {
    let path = &opts.containerd_config;
    let shown = PathBuf::from(root.display(path));
    if let Some(record) = &manifest.containerd_config {
        if &record.path != path {
            bail!(
                "kata-rs was installed into containerd config {}, not {path}; run `kata-runtime uninstall \
                 --containerd-config {}` first",
                record.path,
                record.path
            );
        }
    }
    let (current, mode) = match root.inspect(path)? {
        Entry::Missing => (None, 0o644),
        Entry::File { mode, .. } => {
            let bytes = root.read(path)?.ok_or_else(|| anyhow!("{} vanished while it was read", shown.display()))?;
            let text =
                String::from_utf8(bytes).map_err(|_| anyhow!("{} is not UTF-8 text, so not TOML", shown.display()))?;
            (Some(text), mode)
        }
        Entry::Symlink { target } => bail!(
            "{} is a symlink (to {}); refusing to write through it: pass the real file with --containerd-config",
            shown.display(),
            target.display()
        ),
        Entry::Other => bail!("{} is not a regular file", shown.display()),
    };
    let previously_created = manifest.containerd_config.as_ref().is_some_and(|r| r.created);
    let (original, created) = match &current {
        None => (CREATED.to_string(), true),
        Some(text) => match strip(text, &shown)? {
            Some(stripped) => (stripped, previously_created),
            None => (text.clone(), false),
        },
    };
    let merged = merge(&original, &shown, KATA_CONFIG)?;
    Ok(ConfigPlan { current, original, created, mode, merged })
}

fn plan_target(root: &HostRoot, item: &Item, payload_sha: &str, manifest: &Manifest) -> Result<Target> {
    let recorded = manifest.file(item.to);
    match root.inspect(item.to)? {
        Entry::Missing => Ok(Target::Write),
        Entry::File { sha256, .. } if sha256 == payload_sha && recorded.is_some() => Ok(Target::Same),
        Entry::File { sha256, mode } => match recorded {
            // Ours from an earlier install (an upgrade), or the original still there after an install cut
            // short before it wrote this file.
            Some(r) if r.sha256.as_deref() == Some(sha256.as_str()) => Ok(Target::Write),
            Some(r) if r.original.as_ref().is_some_and(|o| o.sha256 == sha256) => Ok(Target::Write),
            Some(_) => bail!(
                "{} changed since kata-rs installed it; refusing to overwrite it: move it away or run \
                 `kata-runtime uninstall` first",
                root.display(item.to)
            ),
            None => Ok(Target::SaveThenWrite(Original { sha256, mode })),
        },
        Entry::Symlink { target } => bail!(
            "{} is a symlink (to {}); refusing to replace it: remove it if it is not yours",
            root.display(item.to),
            target.display()
        ),
        Entry::Other => bail!("{} is not a regular file; refusing to replace it", root.display(item.to)),
    }
}

/// Copies the file found at `to` into the originals directory (checking it is what was inspected), and
/// records it before anything overwrites it.
fn save_original(root: &HostRoot, to: &str, original: Original, manifest: &mut Manifest) -> Result<()> {
    let saved = manifest::original_path(to);
    let mut source = root.open_read(to)?;
    let sha256 = root.write(&saved, &mut source, 0o600, &mut manifest.dirs)?;
    if sha256 != original.sha256 {
        root.remove(&saved)?;
        bail!("{} changed while it was saved; run the installer again", root.display(to));
    }
    manifest.files.push(InstalledFile { path: to.into(), sha256: None, original: Some(original) });
    manifest.save(root)
}

fn install_link(root: &HostRoot, manifest: &mut Manifest, notes: &mut Vec<String>) -> Result<()> {
    let (path, target) = LINK;
    match root.inspect(path)? {
        Entry::Missing => {
            root.symlink(path, target, &mut manifest.dirs)?;
            manifest.links.push(InstalledLink { path: path.into(), target: target.into() });
            manifest.save(root)?;
        }
        Entry::Symlink { target: found } if found == Path::new(target) => {}
        _ => notes.push(format!(
            "kept {}, which is not a symlink to {target}: containerd's ConfigPath names {KATA_CONFIG} directly",
            root.display(path)
        )),
    }
    Ok(())
}

/// Backs up and rewrites containerd's config; says whether it changed.
fn install_config(
    root: &HostRoot,
    opts: &Options,
    plan: ConfigPlan,
    manifest: &mut Manifest,
    notes: &mut Vec<String>,
) -> Result<bool> {
    let path = &opts.containerd_config;
    if manifest.containerd_config.is_none() {
        let backup = match &plan.current {
            Some(_) if !plan.created => {
                let backup = backup_path(path);
                root.write(&backup, &mut plan.original.as_bytes(), 0o600, &mut manifest.dirs)?;
                Some(backup)
            }
            _ => None,
        };
        manifest.containerd_config = Some(ConfigRecord { path: path.clone(), created: plan.created, backup });
        manifest.save(root)?;
    }
    if plan.current.as_deref() == Some(plan.merged.as_str()) {
        notes.push(format!("{} already has the kata runtime", root.display(path)));
        return Ok(false);
    }
    root.write(path, &mut plan.merged.as_bytes(), plan.mode, &mut manifest.dirs)?;
    manifest.save(root)?;
    notes.push(format!("added the kata runtime to {}", root.display(path)));
    Ok(true)
}
