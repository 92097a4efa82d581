//! Taps for VMs started before their pod exists (the VM cache): each is made in a private "parking" network
//! namespace of the cache server, opened by the VM's QEMU at start, and moved into the pod's namespace when a
//! shim takes the VM. QEMU's fd stays attached to the tap across the move, so the guest NIC keeps working; the
//! shim then wires it to the pod interface like a tap of its own ([`super::setup_pod_network_adopting`]).
//!
//! The parking namespace has no interfaces but its taps and lives as long as the server holds it open: when the
//! server exits, the namespace and every tap still parked in it go with it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rtnetlink::LinkUnspec;

use super::{collect, netlink_error, netns, tap, NetworkError};

/// A private network namespace, held open.
#[derive(Debug)]
pub struct Parking {
    netns: File,
}

impl Parking {
    /// Makes a new, empty network namespace (on a thread of its own, which exits after: the file keeps it).
    pub fn new() -> Result<Self, NetworkError> {
        let made = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            File::open("/proc/thread-self/ns/net")
        })
        .join()
        .map_err(|_| NetworkError::ThreadDied { path: label() })?;
        let netns = made.map_err(|source| NetworkError::Netns { path: label(), source })?;
        Ok(Parking { netns })
    }

    fn file(&self) -> Result<File, NetworkError> {
        self.netns.try_clone().map_err(|source| NetworkError::Netns { path: label(), source })
    }

    /// Creates the tap `name` here and returns its fd, for the VM's NIC.
    pub async fn tap(&self, name: &str) -> Result<OwnedFd, NetworkError> {
        let owned = name.to_owned();
        netns::run_blocking_in_netns(&label(), self.file()?, move || {
            tap::create_tap(&owned).map_err(|source| NetworkError::Tap {
                netns: label(),
                name: owned.clone(),
                action: "create",
                source,
            })
        })
        .await?
    }

    /// Moves the tap `name` into the namespace at `target`, renamed to `new_name`. The name must be free there.
    pub async fn move_tap(&self, name: &str, target: &Path, new_name: &str) -> Result<(), NetworkError> {
        let Some(target_file) = netns::open_netns(target)? else {
            return Err(NetworkError::Netns {
                path: target.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        };
        let (name, new_name, path) = (name.to_owned(), new_name.to_owned(), label());
        netns::run_in_netns(&label(), self.file()?, move |handle| async move {
            let link = collect::link_by_name(&handle, &name)
                .await
                .map_err(netlink_error(&path, format!("look up {name}")))?
                .ok_or_else(|| NetworkError::Tap {
                    netns: path.clone(),
                    name: name.clone(),
                    action: "look up",
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                })?;
            let message =
                LinkUnspec::new_with_index(link.index).setns_by_fd(target_file.as_raw_fd()).name(new_name).build();
            let moved = handle.link().set(message).execute().await;
            drop(target_file);
            moved.map_err(netlink_error(&path, format!("move {name} into another namespace")))
        })
        .await
    }
}

fn label() -> PathBuf {
    PathBuf::from("(the VM cache's parking namespace)")
}
