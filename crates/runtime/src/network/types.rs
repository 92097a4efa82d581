//! The pod's network as the guest must recreate it, in the protocol's own terms (`protocols::net`, which
//! the agent client sends as they are), and the naming and filtering rules setup applies to it.

use std::net::IpAddr;

use protocols::net::{ArpNeighbor, Interface, IpNet, Route};

/// The pod's network as the guest must recreate it: one [`Interface`] per CNI interface of the pod (its guest
/// NIC takes the interface's name, MAC, MTU and addresses), the routes of the pod's main table through them,
/// and its permanent neighbours. Routes are ordered so that each gateway is reachable through an earlier
/// route (link routes first). Host-only facts (the tap behind each interface) are in [`super::TapDevice`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodNetwork {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbors: Vec<ArpNeighbor>,
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
pub(crate) fn order_routes(routes: &mut [Route]) {
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
pub(crate) fn guest_route_destination(dest: &Option<IpNet>) -> bool {
    match dest {
        Some(IpNet { addr: IpAddr::V6(v6), .. }) => (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_multicast(),
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
        let route = |dest: Option<&str>, gw: Option<&str>| Route {
            destination: dest.map(|d| {
                let (a, p) = d.split_once('/').unwrap_or((d, "32"));
                IpNet { addr: a.parse().unwrap(), prefix_len: p.parse().unwrap() }
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
        let cidr = |s: &str, p| Some(IpNet { addr: s.parse().unwrap(), prefix_len: p });
        assert!(guest_route_destination(&None));
        assert!(guest_route_destination(&cidr("fd00::", 64)));
        assert!(!guest_route_destination(&cidr("fe80::", 64)));
        assert!(!guest_route_destination(&cidr("ff00::", 8)));
    }
}
