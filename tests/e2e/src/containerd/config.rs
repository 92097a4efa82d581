//! The version 2 `config.toml` of a private containerd.

use std::path::{Path, PathBuf};

/// Settings for the CRI plugin, which is off unless these are given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriOptions {
    /// Image the CRI plugin uses for pod sandboxes (import it first).
    pub sandbox_image: String,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// Runtime handler used when a pod names none.
    pub default_runtime_name: String,
}

impl CriOptions {
    /// CRI with Debian's CNI plugins, our pause image and runc as the default handler.
    pub fn new(cni_conf_dir: impl Into<PathBuf>) -> Self {
        Self {
            sandbox_image: crate::image::PAUSE_IMAGE.to_owned(),
            cni_bin_dir: PathBuf::from("/usr/lib/cni"),
            cni_conf_dir: cni_conf_dir.into(),
            default_runtime_name: "runc".to_owned(),
        }
    }
}

/// The directories a config refers to.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub root: PathBuf,
    pub state: PathBuf,
    pub address: PathBuf,
    pub opt: PathBuf,
}

/// Plugins that only log errors on these machines (no btrfs, zfs, aufs or devmapper).
const NOISY_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

pub(crate) fn render(layout: &Layout, cri: Option<&CriOptions>, debug: bool, extra: &str) -> String {
    let mut disabled: Vec<String> = NOISY_PLUGINS.iter().map(|p| quote(p)).collect();
    if cri.is_none() {
        disabled.push(quote("io.containerd.grpc.v1.cri"));
    }
    let mut out = format!(
        r#"version = 2
root = {root}
state = {state}
disabled_plugins = [{disabled}]

[grpc]
  address = {address}

[ttrpc]
  address = {ttrpc}

[debug]
  level = {level}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}
"#,
        root = quote_path(&layout.root),
        state = quote_path(&layout.state),
        disabled = disabled.join(", "),
        address = quote_path(&layout.address),
        ttrpc = quote(&format!("{}.ttrpc", layout.address.display())),
        level = quote(if debug { "debug" } else { "info" }),
        opt = quote_path(&layout.opt),
    );
    if let Some(cri) = cri {
        out.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox_image}
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = {default_runtime}

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = {cni_bin}
  conf_dir = {cni_conf}
"#,
            sandbox_image = quote(&cri.sandbox_image),
            default_runtime = quote(&cri.default_runtime_name),
            cni_bin = quote_path(&cri.cni_bin_dir),
            cni_conf = quote_path(&cri.cni_conf_dir),
        ));
    }
    if !extra.is_empty() {
        out.push('\n');
        out.push_str(extra);
        out.push('\n');
    }
    out
}

/// A TOML basic string.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quote_path(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            root: "/t/root".into(),
            state: "/t/state".into(),
            address: "/t/containerd.sock".into(),
            opt: "/t/opt".into(),
        }
    }

    #[test]
    fn cri_is_disabled_by_default() {
        let text = render(&layout(), None, false, "");
        assert!(text.contains(r#""io.containerd.grpc.v1.cri""#));
        assert!(!text.contains("restrict_oom_score_adj"));
        assert!(text.contains(r#"address = "/t/containerd.sock""#));
        assert!(text.contains(r#"address = "/t/containerd.sock.ttrpc""#));
    }

    #[test]
    fn cri_options_are_rendered() {
        let cri = CriOptions::new("/t/cni");
        let text = render(&layout(), Some(&cri), true, "# extra");
        assert!(
            !text.contains(r#""io.containerd.grpc.v1.cri","#) && !text.contains(r#", "io.containerd.grpc.v1.cri"]"#)
        );
        assert!(text.contains("restrict_oom_score_adj = true"));
        assert!(text.contains(r#"sandbox_image = "registry.k8s.io/pause:3.6""#));
        assert!(text.contains(r#"conf_dir = "/t/cni""#));
        assert!(text.ends_with("# extra\n"));
    }

    #[test]
    fn quotes_toml_strings() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
