//! The guest network as both sides describe it: what `UpdateInterface`, `UpdateRoutes` and `AddArpNeighbors`
//! carry, as plain types. The host describes the pod's network with these; each side still parses the wire
//! strings into them in its own `convert` module, with its own errors.

use std::fmt;
use std::net::IpAddr;

/// An address with its prefix length, e.g. 172.19.0.5/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A guest NIC, found by `mac` (or `name`), and what it should carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    /// The name in the pod's namespace (e.g. `eth0`); the guest NIC is renamed to it.
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`: the guest NIC takes the pod interface's MAC, so peers' ARP caches stay right.
    pub mac: String,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
    /// The MAC the guest NIC has now, when it is not `mac` yet (a VM cloned from a template); empty otherwise.
    pub device_mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// None for the default route.
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    /// Name of the interface the route goes out of.
    pub device: String,
    pub source: Option<IpAddr>,
    /// Installed by the kernel for an address (`proto kernel`): the guest kernel makes it again when the
    /// address is assigned, so the host does not send it and the wire does not carry it (always false in the
    /// agent).
    pub kernel: bool,
}

/// A permanent neighbour (static ARP / NDP entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpNeighbor {
    pub ip: IpAddr,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub device: String,
}
