//! The one place where runtime agent types become `protocols::agent` wire types and back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocols::agent as pb;

use super::types::*;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the agent sent an invalid {what}: '{value}'")]
    Invalid { what: &'static str, value: String },
}

pub fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn time(nanos: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

fn limit(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

pub fn sandbox_request(s: &SandboxSetup) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        sandbox_id: s.sandbox_id.clone(),
        hostname: s.hostname.clone(),
        dns: s.dns.clone(),
        shared_fs: s
            .shared_fs
            .as_ref()
            .map(|fs| pb::SharedFs {
                type_: match fs.fs_type {
                    SharedFsType::VirtioFs => pb::SharedFsType::SHARED_FS_TYPE_VIRTIOFS,
                    SharedFsType::NineP => pb::SharedFsType::SHARED_FS_TYPE_NINEP,
                }
                .into(),
                tag: fs.tag.clone(),
                mount_point: fs.mount_point.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                ..Default::default()
            })
            .into(),
        host_time_unix_nanos: s.host_time.map(nanos).unwrap_or(0),
        entropy: s.entropy.clone(),
        ..Default::default()
    }
}

pub fn version(v: pb::Version) -> AgentVersion {
    AgentVersion { agent_version: v.agent_version, protocol_version: v.protocol_version }
}

pub fn guest_details(d: pb::GuestDetails) -> GuestDetails {
    GuestDetails { kernel_release: d.kernel_release, agent_version: d.agent_version, boot_id: d.boot_id }
}

pub fn process_request(p: &ProcessRef) -> pb::ProcessRequest {
    pb::ProcessRequest {
        container_id: p.container_id.clone(),
        exec_id: p.exec_id.clone().unwrap_or_default(),
        ..Default::default()
    }
}

pub fn process_exit(e: pb::ProcessExit) -> ProcessExit {
    ProcessExit { status: e.exit_status, exited_at: time(e.exited_at_unix_nanos) }
}

pub fn stats(s: pb::ContainerStats) -> ContainerStats {
    let cpu = s.cpu.into_option().unwrap_or_default();
    let mem = s.memory.into_option().unwrap_or_default();
    let pids = s.pids.into_option().unwrap_or_default();
    let io = s.io.into_option().unwrap_or_default();
    ContainerStats {
        cpu: CpuStats { usage_usec: cpu.usage_usec, user_usec: cpu.user_usec, system_usec: cpu.system_usec },
        memory: MemoryStats { usage: mem.usage, limit: limit(mem.limit), stat: mem.stat },
        pids: PidsStats { current: pids.current, limit: limit(pids.limit) },
        io: IoStats { read_bytes: io.read_bytes, write_bytes: io.write_bytes },
    }
}

pub fn interface_request(i: &Interface) -> pb::Interface {
    pb::Interface {
        name: i.name.clone(),
        mac: i.mac.clone(),
        device_mac: i.device_mac.clone(),
        mtu: i.mtu,
        addresses: i
            .addresses
            .iter()
            .map(|a| pb::IpAddress {
                address: a.addr.to_string(),
                prefix_len: u32::from(a.prefix_len),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn interface(i: pb::Interface) -> Result<Interface, ConvertError> {
    let addresses = i
        .addresses
        .into_iter()
        .map(|a| {
            let addr =
                a.address.parse().map_err(|_| ConvertError::Invalid { what: "address", value: a.address.clone() })?;
            let prefix_len = u8::try_from(a.prefix_len)
                .map_err(|_| ConvertError::Invalid { what: "prefix length", value: a.prefix_len.to_string() })?;
            Ok(IpNet { addr, prefix_len })
        })
        .collect::<Result<_, ConvertError>>()?;
    Ok(Interface { name: i.name, mac: i.mac, mtu: i.mtu, addresses, device_mac: i.device_mac })
}

pub fn route(r: &Route) -> pb::Route {
    pb::Route {
        destination: r.destination.map(|d| d.to_string()).unwrap_or_default(),
        gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        device: r.device.clone(),
        source: r.source.map(|s| s.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

pub fn arp_neighbor(n: &ArpNeighbor) -> pb::ArpNeighbor {
    pb::ArpNeighbor { ip_address: n.ip.to_string(), mac: n.mac.clone(), device: n.device.clone(), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn sandbox_setup_converts() {
        let s = SandboxSetup {
            sandbox_id: "sb".into(),
            hostname: "pod".into(),
            dns: vec!["nameserver 1.1.1.1".into()],
            shared_fs: Some(SharedFsMount {
                fs_type: SharedFsType::NineP,
                tag: "kataShared".into(),
                mount_point: Some(PathBuf::from("/mnt")),
            }),
            host_time: Some(UNIX_EPOCH + Duration::from_secs(2)),
            entropy: vec![7; 32],
        };
        let r = sandbox_request(&s);
        assert_eq!(r.host_time_unix_nanos, 2_000_000_000);
        assert_eq!(r.entropy, vec![7; 32]);
        assert_eq!(r.shared_fs.type_.enum_value(), Ok(pb::SharedFsType::SHARED_FS_TYPE_NINEP));
        assert_eq!(r.shared_fs.mount_point, "/mnt");
        assert_eq!(sandbox_request(&SandboxSetup::default()).shared_fs.into_option(), None);
    }

    #[test]
    fn process_refs_and_exits_convert() {
        assert_eq!(process_request(&ProcessRef::init("c")).exec_id, "");
        assert_eq!(process_request(&ProcessRef::exec("c", "e")).exec_id, "e");
        let e = process_exit(pb::ProcessExit { exit_status: 137, exited_at_unix_nanos: 1_000, ..Default::default() });
        assert_eq!(e, ProcessExit { status: 137, exited_at: UNIX_EPOCH + Duration::from_nanos(1_000) });
    }

    #[test]
    fn zero_limits_mean_unlimited() {
        let p = pb::ContainerStats {
            memory: Some(pb::MemoryStats { usage: 5, limit: 0, ..Default::default() }).into(),
            pids: Some(pb::PidsStats { current: 1, limit: 10, ..Default::default() }).into(),
            ..Default::default()
        };
        let s = stats(p);
        assert_eq!(s.memory.limit, None);
        assert_eq!(s.pids.limit, Some(10));
    }

    #[test]
    fn network_round_trip() {
        let i = Interface {
            name: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            addresses: vec![IpNet { addr: "10.0.0.2".parse().expect("ip"), prefix_len: 24 }],
            device_mac: "02:6b:61:74:61:00".into(),
        };
        assert_eq!(interface(interface_request(&i)).expect("iface"), i);
        let r = Route {
            destination: Some(IpNet { addr: "10.1.0.0".parse().expect("ip"), prefix_len: 16 }),
            gateway: Some("10.0.0.1".parse().expect("ip")),
            device: "eth0".into(),
            source: None,
            kernel: false,
        };
        let p = route(&r);
        assert_eq!((p.destination.as_str(), p.gateway.as_str(), p.source.as_str()), ("10.1.0.0/16", "10.0.0.1", ""));
        let bad = pb::Interface {
            addresses: vec![pb::IpAddress { address: "nope".into(), ..Default::default() }],
            ..Default::default()
        };
        assert!(interface(bad).unwrap_err().to_string().contains("'nope'"));
    }
}
