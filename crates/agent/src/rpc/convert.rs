//! The one place where wire types of `protocols::agent` become agent types and back.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocols::agent as pb;

use crate::mount::SharedFsKind;
use crate::network::{self, ArpNeighbor, Interface, IpNet, NetworkError, Route};
use crate::reaper::ExitInfo;
use crate::sandbox::{GuestDetails, SandboxConfig, SharedFsConfig};
use crate::stats::ContainerStats;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("invalid {what} '{value}'")]
    Invalid { what: &'static str, value: String },
    #[error("shared_fs.type must be virtiofs or 9p")]
    SharedFsType,
    #[error(transparent)]
    Network(#[from] NetworkError),
}

fn invalid(what: &'static str, value: impl ToString) -> ConvertError {
    ConvertError::Invalid { what, value: value.to_string() }
}

pub fn time_from_nanos(nanos: i64) -> Option<SystemTime> {
    u64::try_from(nanos).ok().filter(|n| *n > 0).map(|n| UNIX_EPOCH + Duration::from_nanos(n))
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)).unwrap_or(0)
}

pub fn sandbox_config(req: pb::CreateSandboxRequest) -> Result<SandboxConfig, ConvertError> {
    let shared_fs = match req.shared_fs.into_option() {
        None => None,
        // An empty message: no shared filesystem, as when the field is absent.
        Some(fs) if fs.type_.enum_value() == Ok(pb::SharedFsType::SHARED_FS_TYPE_NONE) && fs.tag.is_empty() => None,
        Some(fs) => {
            let kind = match fs.type_.enum_value() {
                Ok(pb::SharedFsType::SHARED_FS_TYPE_VIRTIOFS) => SharedFsKind::VirtioFs,
                Ok(pb::SharedFsType::SHARED_FS_TYPE_NINEP) => SharedFsKind::NineP,
                _ => return Err(ConvertError::SharedFsType),
            };
            if fs.tag.is_empty() {
                return Err(invalid("shared_fs.tag", ""));
            }
            Some(SharedFsConfig { kind, tag: fs.tag, mount_point: PathBuf::from(fs.mount_point) })
        }
    };
    Ok(SandboxConfig {
        sandbox_id: req.sandbox_id,
        hostname: req.hostname,
        dns: req.dns,
        shared_fs,
        host_time: time_from_nanos(req.host_time_unix_nanos),
        entropy: req.entropy,
    })
}

pub fn guest_details(d: GuestDetails) -> pb::GuestDetails {
    pb::GuestDetails {
        kernel_release: d.kernel_release,
        agent_version: d.agent_version,
        boot_id: d.boot_id,
        ..Default::default()
    }
}

pub fn process_exit(e: ExitInfo) -> pb::ProcessExit {
    pb::ProcessExit { exit_status: e.status, exited_at_unix_nanos: nanos(e.at), ..Default::default() }
}

pub fn stats(s: ContainerStats) -> pb::ContainerStats {
    pb::ContainerStats {
        cpu: Some(pb::CpuStats {
            usage_usec: s.cpu.usage_usec,
            user_usec: s.cpu.user_usec,
            system_usec: s.cpu.system_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(pb::MemoryStats {
            usage: s.memory.usage,
            limit: s.memory.limit,
            stat: s.memory.stat,
            ..Default::default()
        })
        .into(),
        pids: Some(pb::PidsStats { current: s.pids.current, limit: s.pids.limit, ..Default::default() }).into(),
        io: Some(pb::IoStats { read_bytes: s.io.read_bytes, write_bytes: s.io.write_bytes, ..Default::default() })
            .into(),
        ..Default::default()
    }
}

fn ip(s: &str, what: &'static str) -> Result<IpAddr, ConvertError> {
    s.parse().map_err(|_| invalid(what, s))
}

fn ip_net(addr: &str, prefix_len: u32, what: &'static str) -> Result<IpNet, ConvertError> {
    let addr = ip(addr, what)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len =
        u8::try_from(prefix_len).ok().filter(|p| *p <= max).ok_or_else(|| invalid("prefix length", prefix_len))?;
    Ok(IpNet { addr, prefix_len })
}

pub fn interface(i: pb::Interface) -> Result<Interface, ConvertError> {
    let addresses =
        i.addresses.iter().map(|a| ip_net(&a.address, a.prefix_len, "interface address")).collect::<Result<_, _>>()?;
    for mac in [&i.mac, &i.device_mac] {
        if !mac.is_empty() {
            network::parse_mac(mac)?;
        }
    }
    if !i.device_mac.is_empty() && i.mac.is_empty() {
        return Err(invalid("interface: device_mac without mac", i.device_mac));
    }
    Ok(Interface { name: i.name, mac: i.mac, mtu: i.mtu, addresses, device_mac: i.device_mac })
}

pub fn interface_to_pb(i: Interface) -> pb::Interface {
    pb::Interface {
        name: i.name,
        mac: i.mac,
        device_mac: i.device_mac,
        mtu: i.mtu,
        addresses: i
            .addresses
            .into_iter()
            .map(|a| pb::IpAddress {
                address: a.addr.to_string(),
                prefix_len: u32::from(a.prefix_len),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn route(r: pb::Route) -> Result<Route, ConvertError> {
    let destination = if r.destination.is_empty() || r.destination == "default" {
        None
    } else {
        let (a, p) = r.destination.split_once('/').ok_or_else(|| invalid("route destination", &r.destination))?;
        let p: u32 = p.parse().map_err(|_| invalid("route destination", &r.destination))?;
        Some(ip_net(a, p, "route destination")?)
    };
    let opt_ip = |s: &str, what| if s.is_empty() { Ok(None) } else { ip(s, what).map(Some) };
    Ok(Route {
        destination,
        gateway: opt_ip(&r.gateway, "route gateway")?,
        device: r.device,
        source: opt_ip(&r.source, "route source")?,
        kernel: false,
    })
}

pub fn arp_neighbor(n: pb::ArpNeighbor) -> Result<ArpNeighbor, ConvertError> {
    let ip = ip(&n.ip_address, "neighbour address")?;
    network::parse_mac(&n.mac)?;
    Ok(ArpNeighbor { ip, mac: n.mac, device: n.device })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_request_converts() {
        let mut req = pb::CreateSandboxRequest {
            sandbox_id: "sb".into(),
            hostname: "h".into(),
            host_time_unix_nanos: 1_000_000_000,
            ..Default::default()
        };
        req.dns = vec!["nameserver 10.0.0.1".into()];
        req.shared_fs = Some(pb::SharedFs {
            type_: pb::SharedFsType::SHARED_FS_TYPE_NINEP.into(),
            tag: "kataShared".into(),
            ..Default::default()
        })
        .into();
        let cfg = sandbox_config(req).expect("config");
        assert_eq!(cfg.host_time, Some(UNIX_EPOCH + Duration::from_secs(1)));
        let fs = cfg.shared_fs.expect("fs");
        assert_eq!((fs.kind, fs.tag.as_str()), (SharedFsKind::NineP, "kataShared"));
        assert_eq!(cfg.dns, vec!["nameserver 10.0.0.1"]);
    }

    #[test]
    fn shared_fs_without_tag_is_rejected() {
        let req = pb::CreateSandboxRequest {
            shared_fs: Some(pb::SharedFs {
                type_: pb::SharedFsType::SHARED_FS_TYPE_VIRTIOFS.into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        assert!(sandbox_config(req).unwrap_err().to_string().contains("shared_fs.tag"));
    }

    #[test]
    fn an_empty_shared_fs_means_none_and_type_none_with_a_tag_is_refused() {
        let with = |fs: pb::SharedFs| pb::CreateSandboxRequest { shared_fs: Some(fs).into(), ..Default::default() };
        assert_eq!(sandbox_config(with(pb::SharedFs::default())).expect("no fs").shared_fs, None);
        let none_tagged = pb::SharedFs { tag: "kataShared".into(), ..Default::default() };
        assert!(matches!(sandbox_config(with(none_tagged)), Err(ConvertError::SharedFsType)));
    }

    #[test]
    fn exit_and_stats_convert() {
        let e = process_exit(ExitInfo { status: 137, at: UNIX_EPOCH + Duration::from_nanos(5) });
        assert_eq!((e.exit_status, e.exited_at_unix_nanos), (137, 5));
        let mut s = ContainerStats::default();
        s.memory.stat.insert("anon".into(), 7);
        s.cpu.usage_usec = 9;
        let p = stats(s);
        assert_eq!(p.memory.stat.get("anon"), Some(&7));
        assert_eq!(p.cpu.usage_usec, 9);
    }

    #[test]
    fn network_types_convert_and_validate() {
        let i = pb::Interface {
            name: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            addresses: vec![pb::IpAddress { address: "10.0.0.2".into(), prefix_len: 24, ..Default::default() }],
            ..Default::default()
        };
        let conv = interface(i.clone()).expect("iface");
        assert_eq!(conv.addresses[0].prefix_len, 24);
        assert_eq!(interface_to_pb(conv), i);
        let bad = pb::IpAddress { address: "10.0.0.2".into(), prefix_len: 33, ..Default::default() };
        assert!(interface(pb::Interface { addresses: vec![bad], ..Default::default() }).is_err());
        let cloned = pb::Interface { device_mac: "02:6b:61:74:61:00".into(), ..i.clone() };
        assert_eq!(interface_to_pb(interface(cloned.clone()).expect("clone's iface")), cloned);
        let no_mac = pb::Interface { mac: String::new(), ..cloned };
        assert!(interface(no_mac).unwrap_err().to_string().contains("device_mac without mac"));
        let r = route(pb::Route { destination: "10.0.0.0/8".into(), gateway: "10.0.0.1".into(), ..Default::default() })
            .expect("route");
        assert_eq!(r.destination.map(|d| d.prefix_len), Some(8));
        assert!(route(pb::Route { destination: "default".into(), ..Default::default() })
            .expect("default")
            .destination
            .is_none());
        assert!(arp_neighbor(pb::ArpNeighbor { ip_address: "x".into(), ..Default::default() })
            .unwrap_err()
            .to_string()
            .contains("'x'"));
        let bad_mac = pb::ArpNeighbor { ip_address: "10.0.0.1".into(), mac: "02:42".into(), ..Default::default() };
        assert!(arp_neighbor(bad_mac).unwrap_err().to_string().contains("'02:42'"));
        let n = pb::ArpNeighbor {
            ip_address: "10.0.0.1".into(),
            mac: "0a:58:00:00:00:01".into(),
            device: "eth0".into(),
            ..Default::default()
        };
        assert_eq!(arp_neighbor(n).expect("neighbour").mac, "0a:58:00:00:00:01");
    }
}
