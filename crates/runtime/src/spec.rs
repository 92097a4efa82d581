//! Rewrites a container's OCI spec from the host's point of view to the guest's.
//!
//! Host-only parts are dropped: hooks (they would run host binaries) and the network namespace (the VM is the
//! pod's network namespace, so containers share it). A namespace path names a host process: in a pod, the
//! IPC, UTS and PID joins (of the pause container, as CRI writes them) become joins of the pod's sandbox
//! container in the guest; every other path is dropped, giving the container a namespace of its own. Every
//! container gets a cgroup namespace: the guest's cgroups are v2, and as with runc (a cgroup namespace on a v2
//! host, its own cgroup directories on a v1 one) the container sees its own cgroup at `/sys/fs/cgroup`.
//! Host bind mounts are shared into the guest and their sources rewritten.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};

use crate::paths::GUEST_SHARED_DIR;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid rootfs: {0}")]
    Rootfs(String),
    #[error("cannot encode the OCI spec")]
    Encode(#[from] serde_json::Error),
    #[error("mount {destination}: source {} does not exist on the host", path.display())]
    MissingSource { destination: String, path: PathBuf },
    #[error("{mode} pods are not supported: the VM cannot share the host's {what} namespace (the OCI spec has none)")]
    HostNamespace { mode: &'static str, what: &'static str },
}

/// A host path to share into the guest for one bind mount of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBind {
    pub host_source: PathBuf,
    /// Relative to the sandbox's shared directory.
    pub shared_path: String,
    pub read_only: bool,
}

pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Returns the guest spec (as JSON) and the host paths that must be shared for its bind mounts. `pod_sandbox`
/// is the pod's sandbox container when `container_id` is another container of the pod; without `seccomp`
/// (`runtime.disable_guest_seccomp`) the spec's seccomp profile is dropped.
pub fn for_guest(
    spec: &Spec,
    container_id: &str,
    pod_sandbox: Option<&str>,
    seccomp: bool,
) -> Result<(Vec<u8>, Vec<SharedBind>), SpecError> {
    let mut spec = spec.clone();
    spec.set_hooks(None);
    if let Some(linux) = spec.linux_mut() {
        // A spec without a PID or IPC namespace asks to share the host's (hostPID, hostIPC): in the guest it would
        // share the VM's own, the agent's and every container's, which is neither.
        let namespaces = linux.namespaces().clone().unwrap_or_default();
        for (typ, mode, what) in
            [(LinuxNamespaceType::Pid, "hostPID", "PID"), (LinuxNamespaceType::Ipc, "hostIPC", "IPC")]
        {
            if !namespaces.iter().any(|ns| ns.typ() == typ) {
                return Err(SpecError::HostNamespace { mode, what });
            }
        }
        if !seccomp {
            linux.set_seccomp(None);
        }
        if let Some(namespaces) = linux.namespaces_mut() {
            namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
            for ns in namespaces.iter_mut() {
                let joined = match (ns.path(), pod_sandbox, shared_kind(ns.typ())) {
                    (Some(_), Some(sandbox), Some(kind)) => {
                        Some(PathBuf::from(protocols::container_namespace_path(sandbox, kind)))
                    }
                    _ => None,
                };
                ns.set_path(joined);
            }
            if !namespaces.iter().any(|ns| ns.typ() == LinuxNamespaceType::Cgroup) {
                let mut cgroup = LinuxNamespace::default();
                cgroup.set_typ(LinuxNamespaceType::Cgroup);
                namespaces.push(cgroup);
            }
        }
        linux.set_cgroups_path(Some(PathBuf::from(protocols::container_cgroup(container_id))));
    }
    let mut binds = Vec::new();
    if let Some(list) = spec.mounts_mut() {
        for (i, m) in list.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            let source = m.source().clone().unwrap_or_default();
            if !source.exists() {
                return Err(SpecError::MissingSource {
                    destination: m.destination().display().to_string(),
                    path: source,
                });
            }
            let shared_path = format!("{container_id}/mounts/{i}");
            let read_only = m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == "ro"));
            m.set_source(Some(Path::new(GUEST_SHARED_DIR).join(&shared_path)));
            binds.push(SharedBind { host_source: source, shared_path, read_only });
        }
    }
    Ok((serde_json::to_vec(&spec)?, binds))
}

/// The namespaces a pod's containers share with its sandbox container, by their `/proc/<pid>/ns/` names.
fn shared_kind(typ: LinuxNamespaceType) -> Option<&'static str> {
    match typ {
        LinuxNamespaceType::Ipc => Some("ipc"),
        LinuxNamespaceType::Uts => Some("uts"),
        LinuxNamespaceType::Pid => Some("pid"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_from(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn host_only_parts_are_dropped() {
        let spec = spec_from(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "linux": {
                "cgroupsPath": "system.slice:cri-containerd:abc",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"}
                ]
            }
        }));
        let (json, binds) = for_guest(&spec, "c1", None, true).unwrap();
        assert!(binds.is_empty());
        let out: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert!(out.get("hooks").is_none() || out["hooks"].is_null());
        assert_eq!(out["linux"]["cgroupsPath"], "/kata/c1");
        let ns = out["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns.len(), 3, "{ns:?}");
        assert!(ns.iter().all(|n| n.get("path").is_none()), "{ns:?}");
        assert!(ns.iter().any(|n| n["type"] == "cgroup"), "a container sees its own cgroup: {ns:?}");
    }

    #[test]
    fn a_pod_container_joins_the_sandbox_container_namespaces_in_the_guest() {
        let spec = spec_from(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {
                "namespaces": [
                    {"type": "pid", "path": "/proc/42/ns/pid"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts", "path": "/proc/42/ns/uts"},
                    {"type": "mount"},
                    {"type": "cgroup", "path": "/proc/42/ns/cgroup"},
                    {"type": "network", "path": "/var/run/netns/cni-1"}
                ]
            }
        }));
        let (json, _) = for_guest(&spec, "app", Some("pause"), true).unwrap();
        let out: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let paths: Vec<_> = out["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (n["type"].as_str().unwrap().to_string(), n.get("path").and_then(|p| p.as_str()).map(str::to_string))
            })
            .collect();
        let ns = |t: &str, p: Option<&str>| (t.to_string(), p.map(str::to_string));
        assert_eq!(
            paths,
            [
                ns("pid", Some("/run/kata-containers/namespaces/pause/pid")),
                ns("ipc", Some("/run/kata-containers/namespaces/pause/ipc")),
                ns("uts", Some("/run/kata-containers/namespaces/pause/uts")),
                ns("mount", None),
                ns("cgroup", None),
            ]
        );
    }

    #[test]
    fn seccomp_is_kept_unless_disabled() {
        let spec = spec_from(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}],
                "seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}
            }
        }));
        let kept: serde_json::Value = serde_json::from_slice(&for_guest(&spec, "c1", None, true).unwrap().0).unwrap();
        assert_eq!(kept["linux"]["seccomp"]["syscalls"][0]["names"][0], "mkdir");
        let dropped: serde_json::Value =
            serde_json::from_slice(&for_guest(&spec, "c1", None, false).unwrap().0).unwrap();
        assert!(dropped["linux"].get("seccomp").is_none_or(|s| s.is_null()), "{dropped}");
    }

    #[test]
    fn host_pid_and_ipc_are_refused_with_the_reason() {
        for (namespaces, expected) in [
            (serde_json::json!([{"type": "ipc"}, {"type": "mount"}]), "hostPID pods are not supported"),
            (serde_json::json!([{"type": "pid"}]), "hostIPC pods are not supported"),
        ] {
            let spec = spec_from(serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": namespaces}}));
            let err = for_guest(&spec, "c1", None, true).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
    }

    #[test]
    fn bind_mounts_are_shared_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec_from(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": dir.path(), "options": ["rbind", "ro"]}
            ]
        }));
        let (json, binds) = for_guest(&spec, "c1", None, true).unwrap();
        assert_eq!(
            binds,
            [SharedBind { host_source: dir.path().into(), shared_path: "c1/mounts/1".into(), read_only: true }]
        );
        let out: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(out["mounts"][1]["source"], "/run/kata-containers/shared/c1/mounts/1");
        assert_eq!(out["mounts"][0]["source"], "proc");
    }

    #[test]
    fn missing_bind_source_is_named() {
        let spec = spec_from(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/data", "type": "bind", "source": "/nonexistent/x", "options": ["rbind"]}]
        }));
        let err = for_guest(&spec, "c1", None, true).unwrap_err().to_string();
        assert_eq!(err, "mount /data: source /nonexistent/x does not exist on the host");
    }
}
