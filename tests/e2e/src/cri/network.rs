//! [`CniNetwork`]: the how-to's bridge network in a private CNI configuration directory, with a bridge
//! name, subnet and IPAM state directory of its own, removed again when the test ends.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::CriError;
use crate::process::output_with_timeout;

/// The how-to's bridge network (`10-mynet.conf`) as JSON, with the bridge name, subnet and host-local
/// state directory given: `cniVersion` 0.2.0, name `mynet`, `isGateway`, `ipMasq`, a default route.
pub fn bridge_conf(bridge: &str, subnet: &str, ipam_data_dir: Option<&Path>) -> serde_json::Value {
    let mut ipam = serde_json::json!({
        "type": "host-local",
        "subnet": subnet,
        "routes": [{ "dst": "0.0.0.0/0" }],
    });
    if let Some(dir) = ipam_data_dir {
        ipam["dataDir"] = serde_json::Value::from(dir.to_string_lossy().into_owned());
    }
    serde_json::json!({
        "cniVersion": "0.2.0",
        "name": "mynet",
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": true,
        "ipam": ipam,
    })
}

/// The how-to's loopback network (`99-loopback.conf`).
pub fn loopback_conf() -> serde_json::Value {
    serde_json::json!({ "cniVersion": "0.2.0", "name": "lo", "type": "loopback" })
}

/// Why the test CNI network cannot be set up here (a plugin or `ip` missing), or `None`.
pub fn cni_skip_reason() -> Option<String> {
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists() {
            return Some(format!("/usr/lib/cni/{plugin} is missing (Debian package containernetworking-plugins)"));
        }
    }
    if crate::find_in_path("ip".as_ref()).is_none() {
        return Some("ip is not installed (Debian package iproute2)".to_owned());
    }
    None
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A private CNI configuration directory holding the how-to's bridge network with a bridge name and a
/// `172.19.x.0/24` subnet no other interface or route on this host uses, and the host-local IPAM state
/// inside the directory. Dropping it deletes the bridge (`ip link del`), puts `net.ipv4.ip_forward`
/// back (the bridge plugin turns it on for `isGateway`; tests only talk host-to-pod, which needs no
/// forwarding) and removes the directory.
#[derive(Debug)]
pub struct CniNetwork {
    dir: tempfile::TempDir,
    bridge: String,
    subnet: String,
    gateway: Ipv4Addr,
    ip_forward_before: Option<String>,
}

impl CniNetwork {
    /// Picks a free bridge name (`kt<pid>x<n>`) and subnet and writes `10-mynet.conf` and
    /// `99-loopback.conf` into a new private directory.
    pub fn create() -> Result<Self, CriError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let taken = host_ipv4_prefixes();
        let start = (pid as usize).wrapping_mul(7);
        let mut choice = None;
        for attempt in 0..256usize {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let bridge = format!("kt{pid}x{n}");
            let octet = u8::try_from((start + attempt) % 256).unwrap_or_default();
            let subnet_base = Ipv4Addr::new(172, 19, octet, 0);
            if bridge.len() <= 15
                && !Path::new("/sys/class/net").join(&bridge).exists()
                && !taken.iter().any(|&(net, len)| overlaps(net, len, subnet_base, 24))
            {
                choice = Some((bridge, octet));
                break;
            }
        }
        let (bridge, octet) = choice.ok_or(CriError::NoFreeNetwork)?;
        Self::with(&bridge, &format!("172.19.{octet}.0/24"))
    }

    /// The network with this bridge name and subnet (`A.B.C.0/24` style; the gateway is `.1`).
    pub fn with(bridge: &str, subnet: &str) -> Result<Self, CriError> {
        let dir = tempfile::Builder::new()
            .prefix("kata-e2e-cni-")
            .tempdir()
            .map_err(|source| CriError::Write { path: std::env::temp_dir(), source })?;
        let base: Ipv4Addr =
            subnet.split('/').next().and_then(|a| a.parse().ok()).ok_or_else(|| CriError::Command {
                command: "CniNetwork::with".to_owned(),
                detail: format!("subnet {subnet:?} is not A.B.C.D/N"),
            })?;
        let gateway = Ipv4Addr::from(u32::from(base) + 1);
        let ipam_dir = dir.path().join("ipam");
        let write = |name: &str, value: serde_json::Value| {
            let path = dir.path().join(name);
            let text = serde_json::to_string_pretty(&value).unwrap_or_default();
            fs::write(&path, text + "\n").map_err(|source| CriError::Write { path, source })
        };
        write("10-mynet.conf", bridge_conf(bridge, subnet, Some(&ipam_dir)))?;
        write("99-loopback.conf", loopback_conf())?;
        Ok(Self {
            dir,
            bridge: bridge.to_owned(),
            subnet: subnet.to_owned(),
            gateway,
            ip_forward_before: fs::read_to_string(IP_FORWARD).ok(),
        })
    }

    /// The directory to give containerd as CNI `conf_dir`.
    pub fn conf_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// The bridge's address, which the plugin gives the host side.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & 0xffff_ff00 == u32::from(self.gateway) & 0xffff_ff00
    }

    pub fn bridge_exists(&self) -> bool {
        Path::new("/sys/class/net").join(&self.bridge).exists()
    }

    /// Deletes the bridge and restores `ip_forward`; the directory goes when `self` is dropped.
    pub fn remove(&mut self) -> Result<(), CriError> {
        self.restore_ip_forward();
        if !self.bridge_exists() {
            return Ok(());
        }
        let mut cmd = Command::new("ip");
        cmd.args(["link", "del", &self.bridge]);
        let out = output_with_timeout(&mut cmd, Duration::from_secs(10)).map_err(|e| CriError::Command {
            command: format!("ip link del {}", self.bridge),
            detail: e.to_string(),
        })?;
        if !out.status.success() && self.bridge_exists() {
            return Err(CriError::Command {
                command: format!("ip link del {}", self.bridge),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    fn restore_ip_forward(&mut self) {
        if let Some(before) = self.ip_forward_before.take() {
            if fs::read_to_string(IP_FORWARD).ok().as_deref() != Some(before.as_str()) {
                let _ = fs::write(IP_FORWARD, before);
            }
        }
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("e2e: could not remove CNI bridge {}: {e}", self.bridge);
        }
    }
}

/// IPv4 prefixes of the host's routes (main table) and interface addresses.
fn host_ipv4_prefixes() -> Vec<(Ipv4Addr, u8)> {
    let mut out = Vec::new();
    for args in [&["-4", "-o", "route", "show", "table", "all"][..], &["-4", "-o", "addr", "show"][..]] {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        let Ok(o) = output_with_timeout(&mut cmd, Duration::from_secs(5)) else {
            continue;
        };
        for word in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let (addr, len) = word.split_once('/').unwrap_or((word, "32"));
            if let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u8>()) {
                // Default routes (0.0.0.0/0) would overlap everything: only real prefixes count.
                if len > 0 && len <= 32 {
                    out.push((addr, len));
                }
            }
        }
    }
    out
}

fn overlaps(a: Ipv4Addr, a_len: u8, b: Ipv4Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_conf_is_the_howtos_with_our_names() {
        let conf = bridge_conf("kt1", "172.19.5.0/24", Some(Path::new("/t/ipam")));
        assert_eq!(conf["name"], "mynet");
        assert_eq!(conf["type"], "bridge");
        assert_eq!(conf["bridge"], "kt1");
        assert_eq!(conf["isGateway"], true);
        assert_eq!(conf["ipMasq"], true);
        assert_eq!(conf["ipam"]["type"], "host-local");
        assert_eq!(conf["ipam"]["subnet"], "172.19.5.0/24");
        assert_eq!(conf["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(conf["ipam"]["dataDir"], "/t/ipam");
    }

    #[test]
    fn prefixes_overlap_by_the_shorter_mask() {
        let a = Ipv4Addr::new(172, 19, 0, 0);
        assert!(overlaps(a, 24, Ipv4Addr::new(172, 19, 0, 1), 32));
        assert!(overlaps(Ipv4Addr::new(172, 16, 0, 0), 12, a, 24));
        assert!(!overlaps(a, 24, Ipv4Addr::new(172, 19, 1, 0), 24));
    }

    #[test]
    fn network_files_are_written() {
        let net = CniNetwork::with("kttest0", "172.19.250.0/24").expect("network");
        assert_eq!(net.gateway(), Ipv4Addr::new(172, 19, 250, 1));
        assert!(net.contains(Ipv4Addr::new(172, 19, 250, 9)));
        assert!(!net.contains(Ipv4Addr::new(172, 19, 251, 9)));
        let text = fs::read_to_string(net.conf_dir().join("10-mynet.conf")).expect("conf");
        let conf: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(conf["bridge"], "kttest0");
        assert!(net.conf_dir().join("99-loopback.conf").exists());
    }
}
