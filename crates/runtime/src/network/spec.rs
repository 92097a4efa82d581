//! Which network namespace a VM pod mirrors, decided from the sandbox's OCI spec.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::NetworkError;

/// The network a pod's VM gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetns {
    /// The namespace CNI prepared (e.g. `/var/run/netns/cni-…`): its interfaces are mirrored into the VM.
    Path(PathBuf),
    /// The spec asks for a new, empty namespace (`ctr run` without `--net-host`): the VM gets no NIC.
    Isolated,
}

impl PodNetns {
    /// The namespace to mirror, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            PodNetns::Path(p) => Some(p),
            PodNetns::Isolated => None,
        }
    }
}

/// Decides the pod's network from the sandbox's OCI spec; refuses hostNetwork pods, which CRI expresses by
/// leaving the network namespace out of the spec (or by naming the host's own namespace).
pub fn pod_netns(spec: &Spec) -> Result<PodNetns, NetworkError> {
    classify(spec, is_host_netns)
}

/// [`pod_netns`] with the "is this the host's namespace" test injected, so the decision is testable.
pub fn classify(spec: &Spec, is_host: impl Fn(&Path) -> io::Result<bool>) -> Result<PodNetns, NetworkError> {
    let network = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|nss| nss.iter().find(|ns| ns.typ() == LinuxNamespaceType::Network));
    let Some(network) = network else {
        return Err(NetworkError::HostNetwork { reason: "the OCI spec has no network namespace".into() });
    };
    match network.path() {
        None => Ok(PodNetns::Isolated),
        Some(path) if path.as_os_str().is_empty() => Ok(PodNetns::Isolated),
        Some(path) => match is_host(path) {
            Ok(true) => Err(NetworkError::HostNetwork {
                reason: format!("the OCI spec's network namespace {} is the host's", path.display()),
            }),
            Ok(false) => Ok(PodNetns::Path(path.clone())),
            Err(source) => Err(NetworkError::Netns { path: path.clone(), source }),
        },
    }
}

/// Whether `path` names the network namespace this process runs in (the shim runs in the host's).
pub fn is_host_netns(path: &Path) -> io::Result<bool> {
    let ours = std::fs::metadata("/proc/self/ns/net")?;
    let theirs = std::fs::metadata(path)?;
    Ok(ours.dev() == theirs.dev() && ours.ino() == theirs.ino())
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, SpecBuilder};

    use super::*;

    fn spec(namespaces: &[(LinuxNamespaceType, Option<&str>)]) -> Spec {
        let nss = namespaces
            .iter()
            .map(|(typ, path)| {
                let b = LinuxNamespaceBuilder::default().typ(*typ);
                match path {
                    Some(p) => b.path(PathBuf::from(p)),
                    None => b,
                }
                .build()
                .unwrap()
            })
            .collect::<Vec<_>>();
        SpecBuilder::default().linux(LinuxBuilder::default().namespaces(nss).build().unwrap()).build().unwrap()
    }

    fn never_host(_: &Path) -> io::Result<bool> {
        Ok(false)
    }

    #[test]
    fn cni_namespace_is_mirrored() {
        let s =
            spec(&[(LinuxNamespaceType::Pid, None), (LinuxNamespaceType::Network, Some("/var/run/netns/cni-1234"))]);
        assert_eq!(classify(&s, never_host).unwrap(), PodNetns::Path("/var/run/netns/cni-1234".into()));
    }

    #[test]
    fn missing_network_namespace_is_host_network() {
        let s = spec(&[(LinuxNamespaceType::Pid, None), (LinuxNamespaceType::Mount, None)]);
        let err = classify(&s, never_host).unwrap_err();
        assert!(matches!(err, NetworkError::HostNetwork { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("hostNetwork pods are not supported: the VM cannot share the host's network namespace"),
            "{err}"
        );
    }

    #[test]
    fn spec_without_linux_section_is_host_network() {
        let mut s = Spec::default();
        s.set_linux(None);
        assert!(matches!(classify(&s, never_host), Err(NetworkError::HostNetwork { .. })));
    }

    #[test]
    fn host_namespace_path_is_host_network() {
        let s = spec(&[(LinuxNamespaceType::Network, Some("/proc/1/ns/net"))]);
        let err = classify(&s, |p| Ok(p == Path::new("/proc/1/ns/net"))).unwrap_err();
        assert!(err.to_string().contains("/proc/1/ns/net is the host's"), "{err}");
    }

    #[test]
    fn new_empty_namespace_means_no_nic() {
        let s = spec(&[(LinuxNamespaceType::Network, None)]);
        assert_eq!(classify(&s, never_host).unwrap(), PodNetns::Isolated);
    }

    #[test]
    fn unreadable_namespace_path_names_the_path() {
        let s = spec(&[(LinuxNamespaceType::Network, Some("/var/run/netns/gone"))]);
        let err = classify(&s, |_| Err(io::Error::from(io::ErrorKind::NotFound))).unwrap_err();
        assert_eq!(err.to_string(), "cannot use network namespace /var/run/netns/gone");
        let chain = crate::error_chain(&err);
        assert_eq!(chain, format!("{err}: {}", io::Error::from(io::ErrorKind::NotFound)), "the cause once, last");
    }

    #[test]
    fn our_own_namespace_is_the_hosts() {
        assert!(is_host_netns(Path::new("/proc/self/ns/net")).unwrap());
        assert!(is_host_netns(Path::new("/proc/thread-self/ns/net")).unwrap());
    }
}
