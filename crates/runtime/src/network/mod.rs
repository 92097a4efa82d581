//! Pod networking for a VM, host side, with Kata's "tcfilter" internetworking model.
//!
//! CNI leaves the pod's network namespace with veth interfaces (`eth0` with an address, routes, neighbours).
//! For each such interface [`setup_pod_network`] creates a tap device `tapN_kata` in the same namespace (same
//! MTU, up) and redirects every frame arriving on either of the two to the other with tc (ingress qdisc, u32
//! match-all filter, `mirred egress redirect`), so the VM's NIC behind the tap is, to the pod's peers, the
//! veth. The guest NIC takes the veth's MAC, addresses and routes, which setup returns as a [`PodNetwork`].
//!
//! Everything goes through rtnetlink (`netlink-packet-route` has the u32 and mirred types), except the tap
//! itself, which only `/dev/net/tun` can create. The work runs on a dedicated thread that enters the namespace
//! (see `netns.rs`), never on a tokio worker.
//!
//! The tap fds are opened by the runtime inside the namespace and handed to the hypervisor (QEMU:
//! `-netdev tap,id=..,fd=N` + `-device virtio-net-...,netdev=..,mac=<interface MAC>`), so QEMU itself can stay
//! in the host's namespace.

mod collect;
mod error;
mod netns;
pub mod parking;
pub mod port_forward;
mod spec;
mod tap;
mod tcfilter;
mod types;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use protocols::net::Interface;
use rtnetlink::{Handle, LinkUnspec};

pub use error::NetworkError;
pub use spec::{classify, is_host_netns, pod_netns, PodNetns};
pub use tap::VNET_HDR_LEN;
pub use tcfilter::REDIRECT_FILTER_PRIORITY;
pub use types::{is_tap_name, tap_name, PodNetwork};

/// An open tap device, to pass to the hypervisor.
#[derive(Debug)]
pub struct TapDevice {
    /// The tap's name in the pod's namespace (`tap0_kata`).
    pub name: String,
    /// The pod interface it mirrors (`eth0`); the guest NIC takes that interface's MAC.
    pub interface: String,
    /// `/dev/net/tun` attached to the tap: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, single queue, close-on-exec
    /// (clear `FD_CLOEXEC` on the copy the hypervisor inherits). Frames carry a [`VNET_HDR_LEN`]-byte
    /// `virtio_net_hdr`. The tap is persistent: closing the fd does not delete it, [`teardown_pod_network`] does.
    pub fd: OwnedFd,
}

/// What [`setup_pod_network`] built: the network for the guest, and one tap per interface, in the same order.
#[derive(Debug)]
pub struct PodNetworkSetup {
    pub network: PodNetwork,
    pub taps: Vec<TapDevice>,
}

/// Wires every pod interface of the namespace at `netns` to a new tap device and returns what the guest needs.
/// A namespace without interfaces (only `lo`) gives an empty network. On failure, whatever was added is removed.
pub async fn setup_pod_network(netns: &Path) -> Result<PodNetworkSetup, NetworkError> {
    setup(netns, false).await
}

/// [`setup_pod_network`] for a VM from the cache, whose tap is already in the namespace as `tap0_kata` (moved
/// there by the cache, attached to the VM's NIC): it is wired like a new one, and `taps` comes back empty.
pub async fn setup_pod_network_adopting(netns: &Path) -> Result<PodNetworkSetup, NetworkError> {
    setup(netns, true).await
}

async fn setup(netns: &Path, adopt_first: bool) -> Result<PodNetworkSetup, NetworkError> {
    let file = existing_netns(netns)?;
    let path = netns.to_owned();
    netns::run_in_netns(netns, file, move |handle| async move {
        let mut wired = Vec::new();
        match setup_in_netns(&handle, &path, &mut wired, adopt_first).await {
            Ok(setup) => Ok(setup),
            Err(e) => {
                // Undo only this attempt's work: a tap that another process holds (EBUSY) belongs to a live VM.
                for (veth, tap) in &wired {
                    if let Err(cleanup) = unwire(&handle, &path, veth, Some(tap)).await {
                        tracing::warn!(netns = %path.display(), error = %crate::error_chain(&cleanup), "cleanup after failed network setup");
                    }
                }
                Err(e)
            }
        }
    })
    .await
}

/// Opens the namespace file at `netns`, which must exist.
fn existing_netns(netns: &Path) -> Result<std::fs::File, NetworkError> {
    netns::open_netns(netns)?.ok_or_else(|| NetworkError::Netns {
        path: netns.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// How many interfaces of the namespace at `netns` a VM would mirror (what [`setup_pod_network`] wires).
pub async fn count_pod_interfaces(netns: &Path) -> Result<usize, NetworkError> {
    let file = existing_netns(netns)?;
    let path = netns.to_owned();
    netns::run_in_netns(netns, file, move |handle| async move {
        let links = collect::links(&handle).await.map_err(netlink_error(&path, "list links"))?;
        Ok(links.iter().filter(|l| l.is_pod_interface()).count())
    })
    .await
}

/// Removes the taps and the tc qdiscs and filters [`setup_pod_network`] added; CNI's interfaces stay as they
/// are. Idempotent, and fine when the namespace is already gone.
pub async fn teardown_pod_network(netns: &Path) -> Result<(), NetworkError> {
    let Some(file) = netns::open_netns(netns)? else {
        return Ok(());
    };
    let path = netns.to_owned();
    netns::run_in_netns(netns, file, move |handle| async move { teardown_in_netns(&handle, &path).await }).await
}

fn netlink_error(netns: &Path, action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError + '_ {
    let action = action.into();
    move |source| NetworkError::Netlink { netns: netns.to_owned(), action, source }
}

/// `wired` collects each interface whose tap this attempt holds, for the cleanup after a failure.
async fn setup_in_netns(
    handle: &Handle,
    netns: &Path,
    wired: &mut Vec<(collect::Link, String)>,
    adopt_first: bool,
) -> Result<PodNetworkSetup, NetworkError> {
    let links = collect::links(handle).await.map_err(netlink_error(netns, "list links"))?;
    let pod_links: Vec<_> = links.into_iter().filter(|l| l.is_pod_interface()).collect();

    let mut interfaces = Vec::new();
    let mut taps = Vec::new();
    for (i, link) in pod_links.iter().enumerate() {
        let name = tap_name(i);
        let adopted = adopt_first && i == 0;
        let fd = match adopted {
            true => None,
            false => Some(tap::create_tap(&name).map_err(|source| NetworkError::Tap {
                netns: netns.to_owned(),
                name: name.clone(),
                action: "create",
                source,
            })?),
        };
        wired.push((link.clone(), name.clone()));
        let tap = collect::link_by_name(handle, &name)
            .await
            .map_err(netlink_error(netns, format!("look up {name}")))?
            .ok_or_else(|| NetworkError::Tap {
                netns: netns.to_owned(),
                name: name.clone(),
                action: "look up",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(tap.index).mtu(link.mtu).up().build())
            .execute()
            .await
            .map_err(netlink_error(netns, format!("set {name} up with MTU {}", link.mtu)))?;
        redirect_both_ways(handle, netns, link, &tap).await?;
        interfaces.push(Interface {
            name: link.name.clone(),
            mac: types::format_mac(link.mac.as_deref().unwrap_or_default()),
            mtu: link.mtu,
            ..Default::default()
        });
        if let Some(fd) = fd {
            taps.push(TapDevice { name, interface: link.name.clone(), fd });
        }
    }

    let devices: HashMap<u32, String> = pod_links.iter().map(|l| (l.index, l.name.clone())).collect();
    for (index, cidr) in collect::addresses(handle).await.map_err(netlink_error(netns, "list addresses"))? {
        if let Some(iface) = devices.get(&index).and_then(|n| interfaces.iter_mut().find(|i| &i.name == n)) {
            iface.addresses.push(cidr);
        }
    }
    let mut routes = collect::routes(handle, &devices).await.map_err(netlink_error(netns, "list routes"))?;
    types::order_routes(&mut routes);
    let neighbors = collect::neighbors(handle, &devices).await.map_err(netlink_error(netns, "list neighbours"))?;
    Ok(PodNetworkSetup { network: PodNetwork { interfaces, routes, neighbors }, taps })
}

async fn redirect_both_ways(
    handle: &Handle,
    netns: &Path,
    veth: &collect::Link,
    tap: &collect::Link,
) -> Result<(), NetworkError> {
    for (from, to) in [(veth, tap), (tap, veth)] {
        // A filter left by an earlier, interrupted setup would redirect twice.
        tcfilter::remove_redirect(handle, from.index)
            .await
            .map_err(netlink_error(netns, format!("remove the old redirect filter of {}", from.name)))?;
        tcfilter::ensure_ingress_qdisc(handle, from.index)
            .await
            .map_err(netlink_error(netns, format!("add an ingress qdisc to {}", from.name)))?;
        tcfilter::add_redirect(handle, from.index, to.index)
            .await
            .map_err(netlink_error(netns, format!("redirect {} ingress to {}", from.name, to.name)))?;
    }
    Ok(())
}

async fn teardown_in_netns(handle: &Handle, netns: &Path) -> Result<(), NetworkError> {
    let links = collect::links(handle).await.map_err(netlink_error(netns, "list links"))?;
    for link in links.iter().filter(|l| !l.is_our_tap() && !l.loopback) {
        unwire(handle, netns, link, None).await?;
    }
    for tap in links.iter().filter(|l| l.is_our_tap()) {
        delete_tap(handle, netns, tap).await?;
    }
    Ok(())
}

/// Removes our redirect from `veth` (and its ingress qdisc, unless someone else's filters remain on it), and
/// deletes the tap `tap` if given.
async fn unwire(handle: &Handle, netns: &Path, veth: &collect::Link, tap: Option<&str>) -> Result<(), NetworkError> {
    let removed = tcfilter::remove_redirect(handle, veth.index)
        .await
        .map_err(netlink_error(netns, format!("remove the redirect filter of {}", veth.name)))?;
    if removed {
        let left = tcfilter::ingress_filters(handle, veth.index)
            .await
            .map_err(netlink_error(netns, format!("list the ingress filters of {}", veth.name)))?;
        if left.is_empty() {
            tcfilter::remove_ingress_qdisc(handle, veth.index)
                .await
                .map_err(netlink_error(netns, format!("remove the ingress qdisc of {}", veth.name)))?;
        }
    }
    if let Some(name) = tap {
        let found =
            collect::link_by_name(handle, name).await.map_err(netlink_error(netns, format!("look up {name}")))?;
        if let Some(link) = found.filter(|l| l.is_our_tap()) {
            delete_tap(handle, netns, &link).await?;
        }
    }
    Ok(())
}

/// Deletes a tap; its qdisc and filters go with it.
async fn delete_tap(handle: &Handle, netns: &Path, tap: &collect::Link) -> Result<(), NetworkError> {
    match handle.link().del(tap.index).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == nix::libc::ENODEV => Ok(()),
        other => other.map_err(netlink_error(netns, format!("delete {}", tap.name))),
    }
}
