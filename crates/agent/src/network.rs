//! Guest network configuration through rtnetlink: links, addresses, routes and neighbours.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("invalid {what} '{value}'")]
    Invalid { what: &'static str, value: String },
    #[error("no interface named '{name}' or with MAC '{mac}'")]
    NoLink { name: String, mac: String },
    #[error("netlink request to {op} failed")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
}

pub use protocols::net::{ArpNeighbor, Interface, IpNet, Route};

pub fn parse_mac(s: &str) -> Result<[u8; 6], NetworkError> {
    let bad = || NetworkError::Invalid { what: "MAC address", value: s.to_string() };
    let parts: Vec<u8> =
        s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().map_err(|_| bad())?;
    parts.try_into().map_err(|_| bad())
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let op = op.into();
    move |source| NetworkError::Netlink { op, source }
}

async fn handle() -> Result<Handle, NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Finds the link by MAC (when given) or name, returns (index, current name).
async fn find_link(h: &Handle, name: &str, mac: &str) -> Result<(u32, String), NetworkError> {
    let want_mac = if mac.is_empty() { None } else { Some(parse_mac(mac)?) };
    let mut links = h.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(nl("list links"))? {
        let mut lname = String::new();
        let mut laddr = None;
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => lname = n.clone(),
                LinkAttribute::Address(m) => laddr = Some(m.clone()),
                _ => {}
            }
        }
        let hit = match want_mac {
            Some(m) => laddr.as_deref() == Some(&m[..]),
            None => lname == name,
        };
        if hit {
            return Ok((msg.header.index, lname));
        }
    }
    Err(NetworkError::NoLink { name: name.to_string(), mac: mac.to_string() })
}

async fn link_index(h: &Handle, name: &str) -> Result<u32, NetworkError> {
    Ok(find_link(h, name, "").await?.0)
}

/// Renames, sets the MTU (and the MAC, when found by `device_mac`), replaces the addresses of and brings up
/// one interface.
pub async fn update_interface(iface: &Interface) -> Result<Interface, NetworkError> {
    let h = handle().await?;
    let lookup = if iface.device_mac.is_empty() { &iface.mac } else { &iface.device_mac };
    let (index, current) = find_link(&h, &iface.name, lookup).await?;
    let mut msg = LinkUnspec::new_with_index(index).down();
    if !iface.device_mac.is_empty() && iface.device_mac != iface.mac {
        msg = msg.address(parse_mac(&iface.mac)?.to_vec());
    }
    if !iface.name.is_empty() && iface.name != current {
        msg = msg.name(iface.name.clone());
    }
    if iface.mtu > 0 {
        msg = msg.mtu(iface.mtu);
    }
    h.link().set(msg.build()).execute().await.map_err(nl(format!("configure link {current}")))?;
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(a) = addrs.try_next().await.map_err(nl("list addresses"))? {
        h.address().del(a).execute().await.map_err(nl("delete an old address"))?;
    }
    for a in &iface.addresses {
        h.address()
            .add(index, a.addr, a.prefix_len)
            .execute()
            .await
            .map_err(nl(format!("add {}/{}", a.addr, a.prefix_len)))?;
    }
    h.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.map_err(nl("bring the link up"))?;
    Ok(iface.clone())
}

/// Brings up `lo`, which a fresh kernel leaves down.
pub async fn loopback_up() -> Result<(), NetworkError> {
    let h = handle().await?;
    let index = link_index(&h, "lo").await?;
    h.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.map_err(nl("bring lo up"))
}

/// Adds the routes in order (so device routes can precede gateway routes); existing ones are replaced.
pub async fn update_routes(routes: &[Route]) -> Result<(), NetworkError> {
    let h = handle().await?;
    for r in routes {
        let index = if r.device.is_empty() { None } else { Some(link_index(&h, &r.device).await?) };
        let msg = match (r.destination.as_ref().map(|d| d.addr).or(r.gateway), r.destination.as_ref()) {
            (Some(IpAddr::V6(_)), dest) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new();
                if let Some(IpNet { addr: IpAddr::V6(a), prefix_len }) = dest {
                    b = b.destination_prefix(*a, *prefix_len);
                }
                if let Some(IpAddr::V6(g)) = r.gateway {
                    b = b.gateway(g);
                }
                if let Some(i) = index {
                    b = b.output_interface(i);
                }
                b.build()
            }
            (_, dest) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new();
                if let Some(IpNet { addr: IpAddr::V4(a), prefix_len }) = dest {
                    b = b.destination_prefix(*a, *prefix_len);
                }
                if let Some(IpAddr::V4(g)) = r.gateway {
                    b = b.gateway(g);
                }
                if let Some(IpAddr::V4(s)) = r.source {
                    b = b.pref_source(s);
                }
                if let Some(i) = index {
                    b = b.output_interface(i);
                }
                b.build()
            }
        };
        h.route().add(msg).replace().execute().await.map_err(nl(format!("add route {r:?}")))?;
    }
    Ok(())
}

pub async fn add_arp_neighbors(neighbors: &[ArpNeighbor]) -> Result<(), NetworkError> {
    let h = handle().await?;
    for n in neighbors {
        let mac = parse_mac(&n.mac)?;
        let index = link_index(&h, &n.device).await?;
        h.neighbours()
            .add(index, n.ip)
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add neighbour {}", n.ip)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:42:ac:11:00:02").ok(), Some([2, 0x42, 0xac, 0x11, 0, 2]));
        assert!(parse_mac("02:42").is_err());
        assert!(parse_mac("zz:42:ac:11:00:02").unwrap_err().to_string().contains("zz:42"));
    }
}
