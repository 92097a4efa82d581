//! `kata-runtime uninstall`: undo what the manifest records, and only that. A file changed since install is
//! left where it is (and said so); the containerd config loses exactly kata-rs's block.

use anyhow::{anyhow, bail, Result};

use super::containerd::{restart_and_check, Containerd};
use super::containerd_config::{strip, CREATED};
use super::host::{Entry, HostRoot};
use super::manifest::{self, ConfigRecord, InstalledFile, Manifest};
use super::{backup_path, is_ancestor_of_a_target, Options, FILES, LINK};

pub fn uninstall(opts: &Options, containerd: &dyn Containerd) -> Result<Vec<String>> {
    let root = HostRoot::open(&opts.host_root)?;
    let Some(mut manifest) = Manifest::load(&root)? else {
        return Ok(vec![format!(
            "nothing to uninstall: {} does not exist (kata-runtime install has not run on this node)",
            root.display(manifest::PATH)
        )]);
    };
    check_paths(&manifest, opts)
        .map_err(|e| anyhow!("{}: {e:#}; nothing was removed", root.display(manifest::PATH)))?;
    let mut notes = Vec::new();

    let mut changed = false;
    if let Some(record) = manifest.containerd_config.clone() {
        changed = remove_config(&root, &record, &mut notes)?;
        manifest.containerd_config = None;
        manifest.save(&root)?;
    }
    for file in manifest.files.clone() {
        remove_file(&root, &file, &mut notes)?;
        manifest.files.retain(|f| f.path != file.path);
        manifest.save(&root)?;
    }
    for link in manifest.links.clone() {
        match root.inspect(&link.path)? {
            Entry::Symlink { target } if target.as_os_str() == link.target.as_str() => {
                root.remove(&link.path)?;
                notes.push(format!("removed {}", root.display(&link.path)));
            }
            _ => notes.push(format!("left {}: it is no longer kata-rs's symlink", root.display(&link.path))),
        }
    }
    root.remove(manifest::PATH)?;
    for dir in manifest.dirs.iter().rev() {
        if !root.remove_empty_dir(dir)? && root.inspect(dir)? != Entry::Missing {
            notes.push(format!("left {}: not empty", root.display(dir)));
        }
    }

    if opts.restart {
        restart_and_check(containerd, changed, opts.cri_timeout)?;
        notes.push("containerd's CRI plugin is up without the kata runtime".into());
    } else if changed {
        notes.push("containerd was not restarted (--no-restart): restart it to drop the kata runtime".into());
    }
    Ok(notes)
}

/// The manifest may name only what the installer writes; anything else means it was tampered with.
fn check_paths(manifest: &Manifest, opts: &Options) -> Result<()> {
    for (i, file) in manifest.files.iter().enumerate() {
        if !FILES.iter().any(|f| f.to == file.path) || manifest.files[..i].iter().any(|f| f.path == file.path) {
            bail!("it names {:?}, which kata-runtime install does not write", file.path);
        }
    }
    for link in &manifest.links {
        if (link.path.as_str(), link.target.as_str()) != LINK {
            bail!(
                "it names the symlink {:?} -> {:?}, which kata-runtime install does not make",
                link.path,
                link.target
            );
        }
    }
    for dir in &manifest.dirs {
        if !is_ancestor_of_a_target(dir, &opts.containerd_config) {
            bail!("it names the directory {dir:?}, which kata-runtime install does not create");
        }
    }
    if let Some(config) = &manifest.containerd_config {
        if config.path != opts.containerd_config {
            bail!(
                "it names containerd config {:?}, not {:?} (--containerd-config)",
                config.path,
                opts.containerd_config
            );
        }
        if config.backup.as_ref().is_some_and(|b| *b != backup_path(&config.path)) {
            bail!("it names the backup {:?}, which kata-runtime install does not write", config.backup);
        }
    }
    Ok(())
}

/// Takes kata-rs's block out of containerd's config; says whether the file changed.
fn remove_config(root: &HostRoot, record: &ConfigRecord, notes: &mut Vec<String>) -> Result<bool> {
    let shown = root.display(&record.path);
    let (text, mode) = match root.inspect(&record.path)? {
        Entry::Missing => {
            notes.push(format!("{shown} is gone; nothing to take out of it"));
            return Ok(false);
        }
        Entry::File { mode, .. } => {
            let bytes = root.read(&record.path)?.ok_or_else(|| anyhow!("{shown} vanished while it was read"))?;
            (String::from_utf8(bytes).map_err(|_| anyhow!("{shown} is not UTF-8 text"))?, mode)
        }
        Entry::Symlink { .. } | Entry::Other => bail!("{shown} is no longer a regular file; refusing to touch it"),
    };
    let Some(stripped) = strip(&text, shown.as_ref())? else {
        notes.push(format!("{shown} has no kata-rs block; left as it is"));
        return Ok(false);
    };
    if record.created && stripped == CREATED {
        root.remove(&record.path)?;
        notes.push(format!("removed {shown} (kata-runtime install created it)"));
    } else {
        root.write(&record.path, &mut stripped.as_bytes(), mode, &mut Vec::new())?;
        notes.push(format!("took the kata runtime out of {shown}"));
    }
    if let Some(backup) = &record.backup {
        if root.read(backup)?.as_deref() == Some(stripped.as_bytes()) {
            root.remove(backup)?;
        } else {
            notes.push(format!(
                "kept {}: {shown} was changed outside kata-rs's block since install, and those changes were kept",
                root.display(backup)
            ));
        }
    }
    Ok(true)
}

/// Removes an installed file, putting back the one it replaced, unless it changed since install.
fn remove_file(root: &HostRoot, file: &InstalledFile, notes: &mut Vec<String>) -> Result<()> {
    let shown = root.display(&file.path);
    let saved = manifest::original_path(&file.path);
    let found = root.inspect(&file.path)?;
    let ours = matches!(&found, Entry::File { sha256, .. } if file.sha256.as_ref() == Some(sha256));
    let still_original =
        matches!((&found, &file.original), (Entry::File { sha256, .. }, Some(o)) if *sha256 == o.sha256);
    match (&file.original, ours || found == Entry::Missing) {
        _ if still_original => {
            root.remove(&saved)?;
        }
        (Some(original), true) => {
            if !matches!(root.inspect(&saved)?, Entry::File { sha256, .. } if sha256 == original.sha256) {
                bail!(
                    "the saved original {} is missing or changed since install; {shown} was left",
                    root.display(&saved)
                );
            }
            let mut source = root.open_read(&saved)?;
            root.write(&file.path, &mut source, original.mode, &mut Vec::new())?;
            root.remove(&saved)?;
            notes.push(format!("put back the {shown} that was there before install"));
        }
        (None, true) => {
            root.remove(&file.path)?;
            notes.push(format!("removed {shown}"));
        }
        (original, false) => {
            let kept = original.as_ref().map(|_| format!("; the file it replaced is in {}", root.display(&saved)));
            notes.push(format!("left {shown}: it changed since install{}", kept.unwrap_or_default()));
        }
    }
    Ok(())
}
