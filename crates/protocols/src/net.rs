//! The guest network as both sides describe it: what `UpdateInterface` and `UpdateRoutes` carry, as plain
//! types. Each side still parses the wire strings into these in its own `convert` module, with its own errors.

use std::net::IpAddr;

/// An address with its prefix length, e.g. 172.19.0.5/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A guest NIC, found by `mac` (or `name`), and what it should carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    pub name: String,
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
    pub device: String,
    pub source: Option<IpAddr>,
}
