//! What the guest needs to mirror the pod's network, as plain data, and its mapping onto the agent client's types.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::agent::types as agent;

/// An address with its prefix length, e.g. `172.19.0.5/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One CNI interface of the pod, mirrored by one guest NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The name in the pod's namespace (e.g. `eth0`); the guest NIC is renamed to it.
    pub name: String,
    /// The interface's MAC (`aa:bb:cc:dd:ee:ff`): the guest NIC takes it, so peers' ARP caches stay right.
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<IpCidr>,
    /// The tap device in the pod's namespace that carries this interface's frames to and from the VM.
    pub tap_name: String,
}

/// A route of the pod's main table through one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// None for the default route.
    pub destination: Option<IpCidr>,
    pub gateway: Option<IpAddr>,
    /// Name of the interface the route goes out of.
    pub device: String,
    pub source: Option<IpAddr>,
    /// Installed by the kernel for an address (`proto kernel`): the guest kernel recreates it when the
    /// address is assigned, so an agent that adds routes on top of existing ones may skip it.
    pub kernel: bool,
}

/// A permanent neighbour (static ARP / NDP entry) of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetNeighbor {
    pub ip: IpAddr,
    pub mac: String,
    pub device: String,
}

/// The pod's network as the guest must recreate it. Routes are ordered so that each gateway is reachable
/// through an earlier route (link routes first).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PodNetwork {
    pub interfaces: Vec<NetInterface>,
    pub routes: Vec<NetRoute>,
    pub neighbors: Vec<NetNeighbor>,
}

impl From<IpCidr> for agent::IpNet {
    fn from(c: IpCidr) -> Self {
        agent::IpNet { addr: c.addr, prefix_len: c.prefix_len }
    }
}

impl From<&NetInterface> for agent::Interface {
    fn from(i: &NetInterface) -> Self {
        agent::Interface {
            name: i.name.clone(),
            mac: i.mac.clone(),
            mtu: i.mtu,
            addresses: i.addresses.iter().copied().map(Into::into).collect(),
            device_mac: String::new(),
        }
    }
}

impl From<&NetRoute> for agent::Route {
    fn from(r: &NetRoute) -> Self {
        agent::Route {
            destination: r.destination.map(Into::into),
            gateway: r.gateway,
            device: r.device.clone(),
            source: r.source,
        }
    }
}

impl From<&NetNeighbor> for agent::ArpNeighbor {
    fn from(n: &NetNeighbor) -> Self {
        agent::ArpNeighbor { ip: n.ip, mac: n.mac.clone(), device: n.device.clone() }
    }
}

/// `aa:bb:cc:dd:ee:ff`, lower case, as the agent and `ip link` write MACs.
pub(crate) fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Name of the tap device mirroring the `index`th pod interface, as Kata names it.
pub fn tap_name(index: usize) -> String {
    format!("tap{index}_kata")
}

/// Whether `name` is one of ours (see [`tap_name`]); teardown deletes exactly these.
pub fn is_tap_name(name: &str) -> bool {
    name.strip_prefix("tap")
        .and_then(|rest| rest.strip_suffix("_kata"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Link routes (no gateway) before gateway routes, so the guest can add them in order; stable otherwise.
pub(crate) fn order_routes(routes: &mut [NetRoute]) {
    routes.sort_by_key(|r| r.gateway.is_some());
}

/// Addresses the guest should not be given: IPv6 link-local ones are derived by the guest kernel from the MAC.
pub(crate) fn guest_address(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// Route destinations the guest should not be given: IPv6 link-local and multicast ones are the guest kernel's own.
pub(crate) fn guest_route_destination(dest: &Option<IpCidr>) -> bool {
    match dest {
        Some(IpCidr { addr: IpAddr::V6(v6), .. }) => (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_multicast(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_lower_case_colon_separated() {
        assert_eq!(format_mac(&[0x02, 0xAB, 0, 0x10, 0xff, 0x7]), "02:ab:00:10:ff:07");
    }

    #[test]
    fn tap_names_round_trip() {
        assert_eq!(tap_name(0), "tap0_kata");
        assert!(is_tap_name(&tap_name(12)));
        for other in ["eth0", "tap_kata", "tapx_kata", "tap0_kata0", "tap0", "vethtap0_kata"] {
            assert!(!is_tap_name(other), "{other}");
        }
    }

    #[test]
    fn link_routes_come_before_gateway_routes() {
        let route = |dest: Option<&str>, gw: Option<&str>| NetRoute {
            destination: dest.map(|d| {
                let (a, p) = d.split_once('/').unwrap_or((d, "32"));
                IpCidr { addr: a.parse().unwrap(), prefix_len: p.parse().unwrap() }
            }),
            gateway: gw.map(|g| g.parse().unwrap()),
            device: "eth0".into(),
            source: None,
            kernel: false,
        };
        let mut routes = vec![
            route(None, Some("10.0.0.1")),
            route(Some("10.0.0.0/24"), None),
            route(Some("192.168.0.0/16"), Some("10.0.0.1")),
            route(Some("10.0.1.0/24"), None),
        ];
        order_routes(&mut routes);
        let dests: Vec<_> = routes.iter().map(|r| r.destination.map(|d| d.to_string())).collect();
        assert_eq!(
            dests,
            [Some("10.0.0.0/24".to_string()), Some("10.0.1.0/24".into()), None, Some("192.168.0.0/16".into())]
        );
    }

    #[test]
    fn link_local_ipv6_stays_out_of_the_guest() {
        assert!(guest_address(&"10.1.2.3".parse().unwrap()));
        assert!(guest_address(&"fd00::5".parse().unwrap()));
        assert!(!guest_address(&"fe80::1".parse().unwrap()));
        let cidr = |s: &str, p| Some(IpCidr { addr: s.parse().unwrap(), prefix_len: p });
        assert!(guest_route_destination(&None));
        assert!(guest_route_destination(&cidr("fd00::", 64)));
        assert!(!guest_route_destination(&cidr("fe80::", 64)));
        assert!(!guest_route_destination(&cidr("ff00::", 8)));
    }

    #[test]
    fn maps_onto_agent_types_field_by_field() {
        let iface = NetInterface {
            name: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1450,
            addresses: vec![IpCidr { addr: "172.19.0.5".parse().unwrap(), prefix_len: 24 }],
            tap_name: "tap0_kata".into(),
        };
        let a = agent::Interface::from(&iface);
        assert_eq!(a.name, "eth0");
        assert_eq!(a.mac, "02:00:00:00:00:01");
        assert_eq!(a.mtu, 1450);
        assert_eq!(a.addresses, vec![agent::IpNet { addr: "172.19.0.5".parse().unwrap(), prefix_len: 24 }]);
        let r = agent::Route::from(&NetRoute {
            destination: None,
            gateway: Some("172.19.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
            kernel: false,
        });
        assert_eq!(r.destination, None);
        assert_eq!(r.gateway, Some("172.19.0.1".parse().unwrap()));
        let n = agent::ArpNeighbor::from(&NetNeighbor {
            ip: "172.19.0.1".parse().unwrap(),
            mac: "02:00:00:00:00:02".into(),
            device: "eth0".into(),
        });
        assert_eq!((n.mac.as_str(), n.device.as_str()), ("02:00:00:00:00:02", "eth0"));
    }

    #[test]
    fn serializes_as_plain_json() {
        let net = PodNetwork {
            interfaces: vec![],
            routes: vec![],
            neighbors: vec![NetNeighbor {
                ip: "10.0.0.1".parse().unwrap(),
                mac: "02:00:00:00:00:02".into(),
                device: "eth0".into(),
            }],
        };
        let json = serde_json::to_string(&net).unwrap();
        assert!(json.contains(r#""ip":"10.0.0.1""#), "{json}");
        assert_eq!(serde_json::from_str::<PodNetwork>(&json).unwrap(), net);
    }
}
