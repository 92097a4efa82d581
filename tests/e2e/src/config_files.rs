//! Whole containerd configurations built from the repository's snippets (`config/containerd/v1|v2/*.toml`),
//! for tests that check those snippets against a real containerd in both config formats.

use toml::{Table, Value};

use crate::image::PAUSE_IMAGE;

/// The CRI plugin's table name in containerd config format `version` (1 or 2).
pub fn cri_plugin(version: i64) -> &'static str {
    if version == 1 {
        "cri"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

/// A complete private configuration of format `version`: paths under `{dir}` (replaced by the harness), CRI with
/// our pause image, `restrict_oom_score_adj` (these machines drop CAP_SYS_RESOURCE) and CNI configs in
/// `cni_conf_dir`.
pub fn private_cri_config(version: i64, cni_conf_dir: &str) -> Table {
    let cri = cri_plugin(version);
    let opt = if version == 1 { "opt" } else { "io.containerd.internal.v1.opt" };
    let text = format!(
        r#"version = {version}
root = "{{dir}}/root"
state = "{{dir}}/state"
[grpc]
  address = "{{dir}}/containerd.sock"
[ttrpc]
  address = "{{dir}}/containerd.sock.ttrpc"
[plugins."{opt}"]
  path = "{{dir}}/opt"
[plugins."{cri}"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[plugins."{cri}".containerd]
  snapshotter = "overlayfs"
[plugins."{cri}".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni_conf_dir}"
"#
    );
    // The text above is ours and fixed; only the two paths vary.
    text.parse().unwrap_or_default()
}

/// Merges `from` over `into`, table by table (containerd's own `imports` would replace whole plugin tables).
pub fn merge(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_config_parses_in_both_formats() {
        for version in [1, 2] {
            let t = private_cri_config(version, "/tmp/cni");
            assert_eq!(t["version"].as_integer(), Some(version));
            let cri = &t["plugins"][cri_plugin(version)];
            assert_eq!(cri["cni"]["conf_dir"].as_str(), Some("/tmp/cni"));
            assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        }
    }

    #[test]
    fn merge_is_table_by_table() {
        let mut a: Table = "[x]\nkeep = 1\nover = 1\n".parse().unwrap();
        merge(&mut a, "[x]\nover = 2\nnew = 3\n".parse().unwrap());
        assert_eq!(toml::to_string(&a).unwrap(), "[x]\nkeep = 1\nnew = 3\nover = 2\n");
    }
}
