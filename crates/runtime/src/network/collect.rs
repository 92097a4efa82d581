//! Reads the pod namespace's links, addresses, routes and neighbours over rtnetlink and maps them onto
//! [`PodNetwork`]. The mapping functions are pure, so they are tested on hand-built netlink messages.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use protocols::net::{ArpNeighbor, IpNet, Route};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::types::{format_mac, guest_address, guest_route_destination, is_tap_name};

/// What setup and teardown need to know about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Vec<u8>>,
    pub mtu: u32,
    pub kind: Option<InfoKind>,
    pub ethernet: bool,
    pub loopback: bool,
}

impl Link {
    pub fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            kind: None,
            ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
            loopback: msg.header.flags.contains(LinkFlags::Loopback)
                || msg.header.link_layer_type == LinkLayerType::Loopback,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) => link.mac = Some(a.clone()),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    link.kind = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.clone()),
                        _ => None,
                    })
                }
                _ => {}
            }
        }
        link
    }

    /// One of the tap devices we create (see [`super::tap_name`]).
    pub fn is_our_tap(&self) -> bool {
        is_tap_name(&self.name) && matches!(self.kind, Some(InfoKind::Tun) | None)
    }

    /// An interface CNI gave the pod, which the VM mirrors: Ethernet with a MAC, not loopback, not our tap.
    pub fn is_pod_interface(&self) -> bool {
        self.ethernet && !self.loopback && !is_tap_name(&self.name) && self.mac.as_ref().is_some_and(|m| m.len() == 6)
    }
}

/// The interface index and address of an address message, if the guest should get it.
pub(crate) fn address_of(msg: &AddressMessage) -> Option<(u32, IpNet)> {
    // For point-to-point links IFA_ADDRESS is the peer and IFA_LOCAL ours; otherwise they are equal.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    let addr = local.or(address)?;
    guest_address(&addr).then_some((msg.header.index, IpNet { addr, prefix_len: msg.header.prefix_len }))
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A main-table unicast route through one of `devices` (index -> name), if the guest should get it.
/// Multipath routes (no single output interface) are left out.
pub(crate) fn route_of(msg: &RouteMessage, devices: &HashMap<u32, String>) -> Option<Route> {
    let mut table = u32::from(msg.header.table);
    let (mut dest, mut gateway, mut oif, mut source) = (None, None, None, None);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dest = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(a) => source = route_ip(a),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let device = devices.get(&oif?)?.clone();
    let destination = match dest {
        Some(addr) => Some(IpNet { addr, prefix_len: msg.header.destination_prefix_length }),
        None if msg.header.destination_prefix_length == 0 => None,
        None => return None,
    };
    guest_route_destination(&destination).then(|| Route {
        destination,
        gateway,
        device,
        source,
        kernel: msg.header.protocol == RouteProtocol::Kernel,
    })
}

/// A permanent neighbour on one of `devices`. Learnt entries are left out: the guest learns its own.
pub(crate) fn neighbor_of(msg: &NeighbourMessage, devices: &HashMap<u32, String>) -> Option<ArpNeighbor> {
    if msg.header.state != NeighbourState::Permanent {
        return None;
    }
    let device = devices.get(&msg.header.ifindex)?.clone();
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => mac = Some(format_mac(l)),
            _ => {}
        }
    }
    Some(ArpNeighbor { ip: ip?, mac: mac?, device })
}

pub(crate) async fn links(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    let mut links: Vec<Link> = msgs.iter().map(Link::from_message).collect();
    links.sort_by_key(|l| l.index);
    Ok(links)
}

pub(crate) async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    Ok(links(handle).await?.into_iter().find(|l| l.name == name))
}

pub(crate) async fn addresses(handle: &Handle) -> Result<Vec<(u32, IpNet)>, rtnetlink::Error> {
    let msgs: Vec<AddressMessage> = handle.address().get().execute().try_collect().await?;
    Ok(msgs.iter().filter_map(address_of).collect())
}

pub(crate) async fn routes(handle: &Handle, devices: &HashMap<u32, String>) -> Result<Vec<Route>, rtnetlink::Error> {
    let mut out = Vec::new();
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let msgs: Vec<RouteMessage> = handle.route().get(query).execute().try_collect().await?;
        out.extend(msgs.iter().filter_map(|m| route_of(m, devices)));
    }
    Ok(out)
}

pub(crate) async fn neighbors(
    handle: &Handle,
    devices: &HashMap<u32, String>,
) -> Result<Vec<ArpNeighbor>, rtnetlink::Error> {
    let msgs: Vec<NeighbourMessage> = handle.neighbours().get().execute().try_collect().await?;
    Ok(msgs.iter().filter_map(|m| neighbor_of(m, devices)).collect())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rtnetlink::packet_route::route::RouteScope;

    use super::*;

    fn link(name: &str, kind: Option<InfoKind>, mac: Option<Vec<u8>>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.header.link_layer_type = LinkLayerType::Ether;
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::Mtu(1450));
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac));
        }
        if let Some(kind) = kind {
            msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        }
        msg
    }

    #[test]
    fn veth_is_a_pod_interface_and_our_tap_is_not() {
        let veth = Link::from_message(&link("eth0", Some(InfoKind::Veth), Some(vec![2, 0, 0, 0, 0, 1])));
        assert_eq!((veth.index, veth.name.as_str(), veth.mtu), (7, "eth0", 1450));
        assert!(veth.is_pod_interface());
        assert!(!veth.is_our_tap());

        let tap = Link::from_message(&link("tap0_kata", Some(InfoKind::Tun), Some(vec![2, 0, 0, 0, 0, 2])));
        assert!(tap.is_our_tap());
        assert!(!tap.is_pod_interface());

        let mut lo = link("lo", None, Some(vec![0; 6]));
        lo.header.link_layer_type = LinkLayerType::Loopback;
        lo.header.flags = LinkFlags::Loopback;
        assert!(!Link::from_message(&lo).is_pod_interface());

        // A user's tun device with our naming pattern is not ours to delete.
        assert!(!Link::from_message(&link("tap0_kata", Some(InfoKind::Veth), Some(vec![2; 6]))).is_our_tap());
    }

    #[test]
    fn addresses_prefer_the_local_address() {
        let mut msg = AddressMessage::default();
        msg.header.index = 3;
        msg.header.prefix_len = 24;
        msg.attributes.push(AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))));
        msg.attributes.push(AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))));
        assert_eq!(address_of(&msg), Some((3, IpNet { addr: "10.0.0.5".parse().unwrap(), prefix_len: 24 })));

        let mut ll = AddressMessage::default();
        ll.header.prefix_len = 64;
        ll.attributes.push(AddressAttribute::Address(IpAddr::V6("fe80::1".parse::<Ipv6Addr>().unwrap())));
        assert_eq!(address_of(&ll), None);
    }

    fn devices() -> HashMap<u32, String> {
        HashMap::from([(2, "eth0".to_string())])
    }

    fn route(dest: Option<(IpAddr, u8)>, gateway: Option<IpAddr>, oif: u32) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        if let Some((ip, len)) = dest {
            msg.header.destination_prefix_length = len;
            msg.attributes.push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(gw) = gateway {
            msg.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        msg
    }

    #[test]
    fn default_route_maps_with_gateway_and_device() {
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        let r = route_of(&route(None, Some(gw), 2), &devices()).unwrap();
        assert_eq!(
            r,
            Route { destination: None, gateway: Some(gw), device: "eth0".into(), source: None, kernel: false }
        );
    }

    #[test]
    fn kernel_subnet_route_is_flagged() {
        let mut msg = route(Some(("10.0.0.0".parse().unwrap(), 24)), None, 2);
        msg.header.protocol = RouteProtocol::Kernel;
        msg.attributes.push(RouteAttribute::PrefSource(IpAddr::from([10, 0, 0, 5]).into()));
        let r = route_of(&msg, &devices()).unwrap();
        assert_eq!(r.destination.map(|d| d.to_string()).as_deref(), Some("10.0.0.0/24"));
        assert_eq!(r.source, Some("10.0.0.5".parse().unwrap()));
        assert!(r.kernel);
    }

    #[test]
    fn other_tables_devices_and_types_are_left_out() {
        let mut local = route(Some(("10.0.0.5".parse().unwrap(), 32)), None, 2);
        local.header.table = 255;
        local.header.kind = RouteType::Local;
        assert_eq!(route_of(&local, &devices()), None);

        let on_tap = route(Some(("10.1.0.0".parse().unwrap(), 16)), None, 9);
        assert_eq!(route_of(&on_tap, &devices()), None);

        let mut big_table = route(None, Some("10.0.0.1".parse().unwrap()), 2);
        big_table.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(route_of(&big_table, &devices()), None);

        let ll6 = route(Some(("fe80::".parse().unwrap(), 64)), None, 2);
        assert_eq!(route_of(&ll6, &devices()), None);
    }

    fn neighbour(state: NeighbourState, ifindex: u32) -> NeighbourMessage {
        let mut msg = NeighbourMessage::default();
        msg.header.state = state;
        msg.header.ifindex = ifindex;
        msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(10, 0, 0, 1))));
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![0x0a, 0x58, 0, 0, 0, 1]));
        msg
    }

    #[test]
    fn only_permanent_neighbours_on_pod_interfaces() {
        let n = neighbor_of(&neighbour(NeighbourState::Permanent, 2), &devices()).unwrap();
        assert_eq!(
            n,
            ArpNeighbor { ip: "10.0.0.1".parse().unwrap(), mac: "0a:58:00:00:00:01".into(), device: "eth0".into() }
        );
        assert_eq!(neighbor_of(&neighbour(NeighbourState::Reachable, 2), &devices()), None);
        assert_eq!(neighbor_of(&neighbour(NeighbourState::Permanent, 5), &devices()), None);
    }
}
