//! Which configuration file a shim uses, and the pod facts containerd passes in OCI annotations.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;

/// Set by `start` for the shim server it spawns: the `ConfigPath` runtime option containerd sent on stdin.
pub const CONFIG_PATH_ENV: &str = "KATA_RS_CONFIG_PATH";

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// `ConfigPath` from containerd's runtime options (`runtimeoptions.v1.Options`, field 2), if `any` holds them.
pub fn config_path(any: &Any) -> Option<PathBuf> {
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    string_field(&any.value, 2).filter(|s| !s.is_empty()).map(PathBuf::from)
}

/// `ShimCgroup` from runc's runtime options (`containerd.runc.v1.Options`, field 3), which a containerd client
/// may send with any runtime: the cgroup the shim is to run in.
pub fn shim_cgroup(any: &Any) -> Option<String> {
    if !any.type_url.ends_with("containerd.runc.v1.Options") {
        return None;
    }
    string_field(&any.value, 3).filter(|s| !s.is_empty())
}

/// Reads one string field from protobuf wire bytes; skips every other field. `None` on malformed input.
fn string_field(mut bytes: &[u8], wanted: u64) -> Option<String> {
    let mut found = None;
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut bytes)?;
            }
            1 => bytes = bytes.get(8..)?,
            5 => bytes = bytes.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut bytes)?).ok()?;
                let value = bytes.get(..len)?;
                if field == wanted {
                    found = Some(String::from_utf8(value.to_vec()).ok()?);
                }
                bytes = &bytes[len..];
            }
            _ => return None,
        }
    }
    found
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The shim grouping: all containers of one CRI pod share the pod sandbox's shim (and VM).
pub fn grouping(id: &str, annotations: Option<&std::collections::HashMap<String, String>>) -> String {
    let Some(a) = annotations else { return id.to_string() };
    match (a.get(CONTAINER_TYPE).map(String::as_str), a.get(SANDBOX_ID)) {
        (Some("container"), Some(sandbox)) => sandbox.clone(),
        _ => id.to_string(),
    }
}

/// True when the container starts a new sandbox (a CRI pod sandbox, or a plain `ctr run` container).
pub fn starts_sandbox(annotations: Option<&std::collections::HashMap<String, String>>) -> bool {
    annotations.and_then(|a| a.get(CONTAINER_TYPE)).map(String::as_str) != Some("container")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn encoded(type_url: &str, config_path: &str) -> Vec<u8> {
        let mut v = vec![0x0a, type_url.len() as u8];
        v.extend_from_slice(type_url.as_bytes());
        v.extend_from_slice(&[0x12, config_path.len() as u8]);
        v.extend_from_slice(config_path.as_bytes());
        v
    }

    #[test]
    fn config_path_is_read_from_runtime_options() {
        let mut any = Any::new();
        any.type_url = "runtimeoptions.v1.Options".into();
        any.value = encoded("io.containerd.kata.v2", "/etc/kata/configuration-fc.toml");
        assert_eq!(config_path(&any), Some(PathBuf::from("/etc/kata/configuration-fc.toml")));
        any.type_url = "containerd.runc.v1.Options".into();
        assert_eq!(config_path(&any), None);
    }

    #[test]
    fn shim_cgroup_is_read_from_runc_options() {
        let mut any = Any::new();
        any.type_url = "type.googleapis.com/containerd.runc.v1.Options".into();
        // no_pivot_root = true (varint), then shim_cgroup = "/pods/p1".
        any.value = vec![0x08, 0x01, 0x1a, 8];
        any.value.extend_from_slice(b"/pods/p1");
        assert_eq!(shim_cgroup(&any).as_deref(), Some("/pods/p1"));
        any.type_url = "runtimeoptions.v1.Options".into();
        assert_eq!(shim_cgroup(&any), None);
    }

    #[test]
    fn malformed_options_are_ignored() {
        let mut any = Any::new();
        any.type_url = "type.googleapis.com/runtimeoptions.v1.Options".into();
        any.value = vec![0x12, 0x40, b'x'];
        assert_eq!(config_path(&any), None);
    }

    #[test]
    fn pod_containers_group_under_their_sandbox() {
        let mut a = HashMap::new();
        assert_eq!(grouping("c1", Some(&a)), "c1");
        a.insert(CONTAINER_TYPE.to_string(), "sandbox".to_string());
        a.insert(SANDBOX_ID.to_string(), "pod1".to_string());
        assert_eq!(grouping("pod1", Some(&a)), "pod1");
        assert!(starts_sandbox(Some(&a)));
        a.insert(CONTAINER_TYPE.to_string(), "container".to_string());
        assert_eq!(grouping("c1", Some(&a)), "pod1");
        assert!(!starts_sandbox(Some(&a)));
        assert!(starts_sandbox(None));
    }
}
