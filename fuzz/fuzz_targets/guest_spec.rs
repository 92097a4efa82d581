//! The OCI spec rewrite for the guest: `runtime::spec::for_guest` on a spec parsed from fuzzed JSON.
//!
//! Input: a bundle's `config.json`. Besides "never panics", it checks what the rewrite promises, since each is a
//! way out of the VM if it fails: no hook survives (it would run a host binary), no namespace keeps a path (it
//! names a host process), there is no network namespace, the cgroup is the container's own, and every bind mount's
//! source is rewritten into the container's part of the shared directory.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use runtime::spec::{for_guest, is_bind};

const CONTAINER_ID: &str = "c1";
const SHARED_PREFIX: &str = "/run/kata-containers/shared/c1/mounts/";

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<Spec>(data) else { return };
    let (json, binds) = match for_guest(&spec, CONTAINER_ID) {
        Ok(out) => out,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let guest: Spec = serde_json::from_slice(&json).expect("the guest spec parses back");
    assert!(guest.hooks().is_none(), "hooks survived: {:?}", guest.hooks());
    if let Some(linux) = guest.linux() {
        for ns in linux.namespaces().iter().flatten() {
            assert!(ns.path().is_none(), "namespace path survived: {ns:?}");
            assert_ne!(ns.typ(), LinuxNamespaceType::Network, "network namespace survived");
        }
        assert_eq!(linux.cgroups_path().as_deref(), Some(std::path::Path::new("/kata/c1")));
    }
    let guest_binds: Vec<_> = guest.mounts().iter().flatten().filter(|m| is_bind(m)).collect();
    assert_eq!(guest_binds.len(), binds.len());
    for (m, b) in guest_binds.iter().zip(&binds) {
        let source = m.source().as_deref().and_then(|s| s.to_str()).unwrap_or_default();
        assert_eq!(source.strip_prefix(SHARED_PREFIX), b.shared_path.strip_prefix("c1/mounts/"), "{m:?}");
        assert!(!b.shared_path.contains(".."));
    }
});
