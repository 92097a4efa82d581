//! kata-rs's runtime in containerd's config: one block appended between marker lines, so nothing else in
//! the file changes and uninstall gives back the bytes it found.
//!
//! The block is `config/containerd/v*/runtimeclass.toml`'s `kata` runtime, in the file's own format
//! (`version = 2`: `plugins."io.containerd.grpc.v1.cri"`; version 1 or none: `plugins.cri`), with `ConfigPath`
//! naming the installed configuration. Merging always adds exactly "\n" + block, so stripping is exact.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use toml::Value;

pub const BEGIN: &str = "# BEGIN kata-rs (kata-runtime install): do not edit this block";
pub const END: &str = "# END kata-rs";
/// What a config file created by the installer holds besides the block.
pub const CREATED: &str = "version = 2\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V1,
    V2,
}

impl Format {
    /// The CRI plugin's key under `plugins`.
    fn cri_id(self) -> &'static str {
        match self {
            Format::V1 => "cri",
            Format::V2 => "io.containerd.grpc.v1.cri",
        }
    }

    fn runtimes(self) -> &'static str {
        match self {
            Format::V1 => "plugins.cri.containerd.runtimes",
            Format::V2 => "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes",
        }
    }

    fn table(self) -> String {
        format!("{}.kata", self.runtimes())
    }
}

/// The block for `format`, `kata_config` being the host path of the kata-rs configuration. With `with_runc`
/// it also names containerd's default runtime, runc: a config that names no runtime gets it implicitly, but
/// naming any runtime replaces containerd's default set, and CRI then fails to load ("no corresponding
/// runtime configured in `containerd.runtimes` for `containerd` `default_runtime_name`").
pub fn block(format: Format, kata_config: &str, with_runc: bool) -> String {
    let table = format.table();
    let config_path = Value::String(kata_config.to_string());
    let runc = if with_runc {
        format!(
            "# containerd's default runtime, which naming any runtime would otherwise drop.\n\
             [{}.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\n",
            format.runtimes()
        )
    } else {
        String::new()
    };
    format!(
        "{BEGIN}\n\
         # Pods with RuntimeClass handler \"kata\" run in a Kata VM; `kata-runtime uninstall` removes this block.\n\
         {runc}\
         [{table}]\n  \
           runtime_type = \"io.containerd.kata.v2\"\n  \
           privileged_without_host_devices = true\n  \
           pod_annotations = [\"io.katacontainers.*\"]\n  \
           container_annotations = [\"io.katacontainers.*\"]\n\
         \n\
         [{table}.options]\n  \
           ConfigPath = {config_path}\n\
         {END}\n"
    )
}

/// Parses `text` as TOML, naming the file and line on error.
fn parse(text: &str, file: &Path) -> Result<toml::Table> {
    text.parse::<toml::Table>().map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(line) => anyhow!("{}:{line}: not valid TOML: {}", file.display(), e.message().trim_end()),
            None => anyhow!("{}: not valid TOML: {}", file.display(), e.message().trim_end()),
        }
    })
}

fn format_of(config: &toml::Table, file: &Path) -> Result<Format> {
    match config.get("version") {
        None => Ok(Format::V1),
        Some(Value::Integer(1)) => Ok(Format::V1),
        Some(Value::Integer(2)) => Ok(Format::V2),
        Some(other) => bail!(
            "{}: `version = {other}` is not a containerd 1.x config format (1 or 2); merge the kata runtime by hand \
             (docs/containerd.md)",
            file.display()
        ),
    }
}

fn cri_containerd(config: &toml::Table, format: Format) -> Option<&Value> {
    config.get("plugins")?.get(format.cri_id())?.get("containerd")
}

fn kata_runtime(config: &toml::Table, format: Format) -> Option<&Value> {
    cri_containerd(config, format)?.get("runtimes")?.get("kata")
}

/// Whether the config names no runtime, so containerd uses its default set (runc).
fn names_no_runtime(config: &toml::Table, format: Format) -> bool {
    let runtimes = cri_containerd(config, format).and_then(|c| c.get("runtimes"));
    runtimes.and_then(Value::as_table).is_none_or(|t| t.is_empty())
}

/// containerd's own check: the default runtime must be one of `runtimes` (unless the legacy
/// `default_runtime` table, which containerd registers as "default", is used).
fn check_default_runtime(config: &toml::Table, format: Format, file: &Path) -> Result<()> {
    let containerd = cri_containerd(config, format);
    let legacy = containerd
        .and_then(|c| c.get("default_runtime"))
        .and_then(|d| d.get("runtime_type"))
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    let name = containerd.and_then(|c| c.get("default_runtime_name")).and_then(Value::as_str).unwrap_or("runc");
    if !legacy && containerd.and_then(|c| c.get("runtimes")).and_then(|r| r.get(name)).is_none() {
        bail!(
            "{}: with kata-rs's block added, default_runtime_name {name:?} names no runtime in [{}], so containerd's \
             CRI plugin would not load; define that runtime first",
            file.display(),
            format.runtimes()
        );
    }
    Ok(())
}

/// Checks that kata-rs's block can go into `original` (a config without it) and returns the format.
pub fn check(original: &str, file: &Path) -> Result<Format> {
    let config = parse(original, file)?;
    let format = format_of(&config, file)?;
    if let Some(Value::Array(disabled)) = config.get("disabled_plugins") {
        if let Some(cri) = disabled.iter().find(|p| matches!(p.as_str(), Some("cri" | "io.containerd.grpc.v1.cri"))) {
            bail!(
                "{}: `disabled_plugins` contains {cri}: containerd's CRI plugin is off, so Kubernetes cannot use it \
                 and a runtime for it would do nothing; enable CRI first",
                file.display()
            );
        }
    }
    if kata_runtime(&config, format).is_some() {
        bail!(
            "{}: a runtime called \"kata\" is already defined ([{}]) outside kata-rs's block; \
             refusing to replace it: remove it, or keep it and do not run the installer",
            file.display(),
            format.table()
        );
    }
    Ok(format)
}

/// `original` (without our block) with the block appended, checked to parse and to hold the runtime where
/// containerd reads it.
pub fn merge(original: &str, file: &Path, kata_config: &str) -> Result<String> {
    let format = check(original, file)?;
    let with_runc = names_no_runtime(&parse(original, file)?, format);
    let merged = format!("{original}\n{}", block(format, kata_config, with_runc));
    let parsed = parse(&merged, file).map_err(|e| anyhow!("with kata-rs's block added, {e:#}"))?;
    check_default_runtime(&parsed, format, file)?;
    let runtime = kata_runtime(&parsed, format);
    let ok = runtime.and_then(|r| r.get("runtime_type")).and_then(Value::as_str) == Some("io.containerd.kata.v2")
        && runtime.and_then(|r| r.get("options")).and_then(|o| o.get("ConfigPath")).and_then(Value::as_str)
            == Some(kata_config)
        && format_of(&parsed, file)? == format;
    if !ok {
        bail!("{}: with kata-rs's block added, containerd would not find [{}]", file.display(), format.table());
    }
    Ok(merged)
}

/// `text` without our block and the newline merge put before it, or `None` when it has no block.
pub fn strip(text: &str, file: &Path) -> Result<Option<String>> {
    let begin_line = format!("{BEGIN}\n");
    let end_line = format!("{END}\n");
    let at_line_start = |i: usize| i == 0 || text.as_bytes()[i - 1] == b'\n';
    let begins: Vec<usize> = text.match_indices(&begin_line).map(|(i, _)| i).filter(|&i| at_line_start(i)).collect();
    let Some(&begin) = begins.first() else {
        if text.lines().any(|l| l == END) {
            bail!("{}: kata-rs's block has an end marker but no `{BEGIN}` line; fix the file by hand", file.display());
        }
        return Ok(None);
    };
    if begins.len() > 1 {
        bail!("{}: kata-rs's block appears more than once; fix the file by hand", file.display());
    }
    let end = text[begin..]
        .match_indices(&end_line)
        .map(|(i, _)| begin + i)
        .find(|&i| at_line_start(i))
        .ok_or_else(|| anyhow!("{}: kata-rs's block has no `{END}` line; fix the file by hand", file.display()))?;
    if begin == 0 || text.as_bytes()[begin - 1] != b'\n' {
        bail!("{}: kata-rs's block does not follow the newline the installer put before it", file.display());
    }
    Ok(Some(format!("{}{}", &text[..begin - 1], &text[end + end_line.len()..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KATA: &str = "/usr/share/defaults/kata-containers/configuration-qemu.toml";

    fn file() -> &'static Path {
        Path::new("/etc/containerd/config.toml")
    }

    #[test]
    fn the_block_matches_the_shipped_runtimeclass_snippets() {
        for (format, shipped) in [
            (Format::V1, include_str!("../../../../config/containerd/v1/runtimeclass.toml")),
            (Format::V2, include_str!("../../../../config/containerd/v2/runtimeclass.toml")),
        ] {
            let shipped = shipped.parse::<toml::Table>().unwrap();
            let ours = block(format, "/etc/kata-containers/configuration.toml", true).parse::<toml::Table>().unwrap();
            assert_eq!(kata_runtime(&ours, format), kata_runtime(&shipped, format), "{format:?}");
            let runc = |t: &toml::Table| cri_containerd(t, format).unwrap()["runtimes"]["runc"].clone();
            assert_eq!(runc(&ours), runc(&shipped), "{format:?}");
        }
    }

    #[test]
    fn merge_then_strip_gives_back_the_bytes() {
        for original in ["", "\n", "version = 2", "version = 2\n", "# c\n\n\n", "[a]\nb = 1\n\n"] {
            let merged = merge(original, file(), KATA).unwrap();
            assert!(merged.starts_with(original));
            assert_eq!(strip(&merged, file()).unwrap().as_deref(), Some(original), "{original:?}");
        }
        assert_eq!(strip("version = 2\n", file()).unwrap(), None);
    }

    #[test]
    fn the_format_follows_the_version_key() {
        assert!(merge("", file(), KATA).unwrap().contains("[plugins.cri.containerd.runtimes.kata]"));
        assert!(merge("version = 1\n", file(), KATA).unwrap().contains("[plugins.cri.containerd.runtimes.kata]"));
        let v2 = merge("version = 2\n", file(), KATA).unwrap();
        assert!(v2.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]"));
        assert!(!v2.contains("plugins.cri."));
        let err = merge("version = 3\n", file(), KATA).unwrap_err().to_string();
        assert!(err.contains("version = 3"), "{err}");
    }

    #[test]
    fn malformed_toml_is_named_by_file_and_line() {
        let err = merge("version = 2\n\n[plugins\nx = 1\n", file(), KATA).unwrap_err().to_string();
        assert!(err.starts_with("/etc/containerd/config.toml:3: not valid TOML"), "{err}");
    }

    #[test]
    fn a_foreign_kata_runtime_is_not_replaced() {
        for config in [
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata]\nruntime_type = \"x\"\n",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata.options]\nConfigPath = \"x\"\n",
            "[plugins.cri.containerd.runtimes.kata]\n",
        ] {
            let err = merge(config, file(), KATA).unwrap_err().to_string();
            assert!(err.contains("already defined") && err.contains("refusing"), "{err}");
        }
        // The other format's table is ignored by containerd, so it is no conflict.
        merge("version = 2\n[plugins.cri.containerd.runtimes.kata]\n", file(), KATA).unwrap();
    }

    #[test]
    fn a_disabled_cri_plugin_is_refused() {
        for config in
            ["disabled_plugins = [\"cri\"]\n", "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"]
        {
            let err = merge(config, file(), KATA).unwrap_err().to_string();
            assert!(err.contains("CRI plugin is off"), "{err}");
        }
        merge("version = 2\ndisabled_plugins = [\"io.containerd.internal.v1.opt\"]\n", file(), KATA).unwrap();
    }

    #[test]
    fn a_block_that_would_not_parse_is_refused() {
        // runtimes as an inline table cannot take another table: the merge must fail, not write it.
        let config = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = { runc = {} }\n";
        let err = merge(config, file(), KATA).unwrap_err().to_string();
        assert!(err.contains("with kata-rs's block added"), "{err}");
    }

    #[test]
    fn damaged_blocks_are_refused() {
        let merged = merge("version = 2\n", file(), KATA).unwrap();
        let no_end = merged.replace(&format!("{END}\n"), "");
        assert!(strip(&no_end, file()).unwrap_err().to_string().contains("no `# END"));
        let twice = format!("{merged}\n{}", block(Format::V2, KATA, false));
        assert!(strip(&twice, file()).unwrap_err().to_string().contains("more than once"));
        let no_begin = merged.replace(&format!("{BEGIN}\n"), "");
        assert!(strip(&no_begin, file()).is_err());
    }

    #[test]
    fn text_after_the_block_is_kept() {
        let merged = merge("version = 2\n", file(), KATA).unwrap();
        let edited = format!("{merged}[x]\ny = 1\n");
        assert_eq!(strip(&edited, file()).unwrap().unwrap(), "version = 2\n[x]\ny = 1\n");
    }

    #[test]
    fn runc_is_named_only_when_the_config_names_no_runtime() {
        let runc_v2 = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]";
        assert!(merge("version = 2\n", file(), KATA).unwrap().contains(runc_v2));
        assert!(merge("", file(), KATA).unwrap().contains("[plugins.cri.containerd.runtimes.runc]"));
        let with_runc = format!("version = 2\n{runc_v2}\nruntime_type = \"io.containerd.runc.v2\"\n");
        assert_eq!(merge(&with_runc, file(), KATA).unwrap().matches(runc_v2).count(), 1);
    }

    #[test]
    fn a_default_runtime_that_does_not_exist_is_refused() {
        let config =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"crun\"\n";
        let err = merge(config, file(), KATA).unwrap_err().to_string();
        assert!(err.contains("default_runtime_name \"crun\" names no runtime"), "{err}");
        // containerd registers the legacy default_runtime table itself.
        merge(include_str!("../../../../config/containerd/v2/default-legacy.toml"), file(), KATA).unwrap();
    }
}
