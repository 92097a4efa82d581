//! Pod networking against the real kernel: needs root (network namespaces, veth, tap, tc). Skips otherwise.
//!
//! Every test builds its own namespaces (`kt-<pid>-<n>`, the "pod", and `kt-<pid>-<n>p`, the "peer" that plays
//! the node's side of the veth pair), so no frame ever leaves them; a guard deletes them even on failure, and
//! with them every veth and tap they hold.

// The helpers below are test code too (clippy only exempts `#[test]` functions): a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::libc;
use runtime::network::{self, NetworkError, VNET_HDR_LEN};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One test at a time. A process forked by one test (`ip`, `tc`) holds a copy of every fd of this process until it
/// execs, a tap's included; a test that closes its tap and attaches to it again would find it busy meanwhile.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why these tests cannot run here, or `None`.
fn missing_root() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root to create network namespaces, veth pairs and taps");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing");
    }
    None
}

/// A network namespace of ours, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Netns {
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n NAME args...`, which must succeed.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME cmd args...`, which must succeed.
    fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn link_exists(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", name])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn mac(&self, dev: &str) -> String {
        let json: serde_json::Value = serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", dev])).unwrap();
        json[0]["address"].as_str().unwrap().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The pod namespace with CNI's work done (`eth0`, 10.250.N.2/24, MTU 1400, default route via .1, a permanent
/// neighbour) and the peer namespace holding the other end, `hveth`, with 10.250.N.1/24.
struct Pod {
    n: u32,
    // Field order is drop order: the pod namespace goes first, then the peer.
    pod: Netns,
    peer: Netns,
}

fn cni_pod() -> Pod {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let base = format!("kt-{}-{n}", std::process::id());
    let pod = Netns::new(base.clone());
    let peer = Netns::new(format!("{base}p"));
    pod.ip(&[
        "link", "add", "name", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "hveth", "netns", &peer.name,
    ]);
    pod.ip(&["addr", "add", &format!("10.250.{n}.2/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", &format!("10.250.{n}.1")]);
    peer.ip(&["link", "set", "hveth", "mtu", "1400"]);
    peer.ip(&["addr", "add", &format!("10.250.{n}.1/24"), "dev", "hveth"]);
    peer.ip(&["link", "set", "hveth", "up"]);
    let peer_mac = peer.mac("hveth");
    pod.ip(&["neigh", "add", &format!("10.250.{n}.1"), "lladdr", &peer_mac, "dev", "eth0", "nud", "permanent"]);
    Pod { n, pod, peer }
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(s.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

/// An AF_PACKET socket bound to `dev` inside `netns`: sees every frame the device receives and sends frames out
/// of it. Opened on a throwaway thread, since sockets belong to the namespace of the thread that opens them.
fn packet_socket(netns: &Netns, dev: &str) -> OwnedFd {
    let ns = File::open(netns.path()).unwrap();
    let dev = CString::new(dev).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh socket owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: dev is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        assert!(ifindex > 0, "if_nametoindex: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain old data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a valid sockaddr_ll of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        fd
    })
    .join()
    .unwrap()
}

fn write_all(fd: &OwnedFd, buf: &[u8]) {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    assert_eq!(n, buf.len() as isize, "write: {}", std::io::Error::last_os_error());
}

/// Reads frames from `fd` (skipping `skip` leading bytes of each) until `want` accepts one or 5 s pass.
fn read_until(fd: &OwnedFd, skip: usize, mut want: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: pfd is one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "read: {}", std::io::Error::last_os_error());
        let frame = &buf[skip.min(n as usize)..n as usize];
        if want(frame) {
            return Some(frame.to_vec());
        }
    }
    None
}

/// A frame of the local experimental ethertype 0x88b5 carrying `payload`.
fn test_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// An ARP request "who has `target`? tell `sender_ip`" from `sender_mac`, broadcast.
fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcfilter_wires_the_veth_to_a_tap_and_back() {
    testutil::skip_unless!(missing_root());
    let _serial = SERIAL.lock().await;
    let Pod { n, pod, peer } = cni_pod();
    let eth0_mac = pod.mac("eth0");
    let peer_mac = peer.mac("hveth");

    let setup = network::setup_pod_network(&pod.path()).await.unwrap();

    // What the guest is told.
    let net = &setup.network;
    assert_eq!(net.interfaces.len(), 1, "{net:?}");
    let iface = &net.interfaces[0];
    assert_eq!((iface.name.as_str(), iface.mac.as_str(), iface.mtu), ("eth0", eth0_mac.as_str(), 1400));
    let addrs: Vec<String> = iface.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(addrs, [format!("10.250.{n}.2/24")]);
    let default = net.routes.iter().find(|r| r.destination.is_none()).expect("a default route");
    assert_eq!(default.gateway, Some(format!("10.250.{n}.1").parse().unwrap()));
    assert_eq!(default.device, "eth0");
    let subnet =
        net.routes.iter().position(|r| r.destination.map(|d| d.to_string()) == Some(format!("10.250.{n}.0/24")));
    let subnet = subnet.expect("the subnet route");
    assert!(net.routes[subnet].kernel);
    assert!(subnet < net.routes.iter().position(|r| r.destination.is_none()).unwrap(), "link routes first");
    assert_eq!(net.neighbors.len(), 1, "{:?}", net.neighbors);
    assert_eq!(net.neighbors[0].ip, format!("10.250.{n}.1").parse::<std::net::IpAddr>().unwrap());
    assert_eq!((net.neighbors[0].mac.as_str(), net.neighbors[0].device.as_str()), (peer_mac.as_str(), "eth0"));
    assert_eq!(setup.taps.len(), 1);
    assert_eq!((setup.taps[0].name.as_str(), setup.taps[0].interface.as_str()), ("tap0_kata", "eth0"));

    // The tap: in the pod's namespace, up, same MTU, a single-queue persistent tap with a vnet header, root's.
    let tap: serde_json::Value =
        serde_json::from_str(&pod.ip(&["-d", "-j", "link", "show", "dev", "tap0_kata"])).unwrap();
    let tap = &tap[0];
    assert_eq!(tap["mtu"], 1400);
    assert!(tap["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{tap}");
    let info = &tap["linkinfo"];
    assert_eq!(info["info_kind"], "tun", "{tap}");
    let data = &info["info_data"];
    assert_eq!((&data["type"], &data["pi"], &data["vnet_hdr"]), (&"tap".into(), &false.into(), &true.into()), "{tap}");
    assert_eq!((&data["multi_queue"], &data["persist"], &data["user"]), (&false.into(), &true.into(), &"root".into()));

    // The tc plumbing, as `tc` itself reads it back.
    for (dev, to) in [("eth0", "tap0_kata"), ("tap0_kata", "eth0")] {
        let qdiscs = pod.exec("tc", &["qdisc", "show", "dev", dev]);
        assert!(qdiscs.contains("qdisc ingress ffff:"), "{dev}: {qdiscs}");
        let filters = pod.exec("tc", &["filter", "show", "dev", dev, "ingress"]);
        assert!(filters.contains("protocol all pref 49153 u32"), "{dev}: {filters}");
        assert!(filters.contains("match 00000000/00000000 at 0"), "{dev}: {filters}");
        assert!(filters.contains(&format!("mirred (Egress Redirect to device {to}) stolen")), "{dev}: {filters}");
    }

    // Frames, unchanged, both ways: tap -> eth0 -> hveth, and hveth -> eth0 -> tap.
    let tap_fd = &setup.taps[0].fd;
    let sniffer = packet_socket(&peer, "hveth");
    let (guest, node) = (parse_mac(&eth0_mac), parse_mac(&peer_mac));

    let out = test_frame(node, guest, format!("kata-rs guest to node {n}").as_bytes());
    let mut with_hdr = vec![0u8; VNET_HDR_LEN];
    with_hdr.extend_from_slice(&out);
    write_all(tap_fd, &with_hdr);
    let seen = read_until(&sniffer, 0, |f| f.len() >= 14 && f[12..14] == [0x88, 0xb5]);
    assert_eq!(seen.as_deref(), Some(&out[..]), "the frame written into the tap reached the node's end unchanged");

    let back = test_frame(guest, node, format!("kata-rs node to guest {n}").as_bytes());
    write_all(&sniffer, &back);
    let seen = read_until(tap_fd, VNET_HDR_LEN, |f| f.len() >= 14 && f[12..14] == [0x88, 0xb5]);
    assert_eq!(seen.as_deref(), Some(&back[..]), "the frame sent to eth0 came out of the tap unchanged");

    // A real exchange with the node's kernel: the "guest" asks for the gateway's MAC through the tap.
    write_all(
        tap_fd,
        &[vec![0u8; VNET_HDR_LEN], arp_request(guest, [10, 250, n as u8, 2], [10, 250, n as u8, 1])].concat(),
    );
    let reply = read_until(tap_fd, VNET_HDR_LEN, |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == [10, 250, n as u8, 1]
    })
    .expect("an ARP reply from the node's side, through eth0 and the tap");
    assert_eq!(&reply[0..6], &guest, "addressed to the guest's (the veth's) MAC");
    assert_eq!(&reply[22..28], &node, "announcing the node's MAC");
    // The pod namespace's own stack never saw the request: ingress on eth0 goes straight to the tap.
    let neigh = pod.ip(&["neigh", "show", "dev", "eth0"]);
    assert!(!neigh.contains("REACHABLE"), "{neigh}");

    // Teardown: tap, qdiscs and filters gone; CNI's veth untouched; a second teardown is a no-op.
    drop(sniffer);
    drop(setup);
    network::teardown_pod_network(&pod.path()).await.unwrap();
    assert!(!pod.link_exists("tap0_kata"));
    assert_eq!(pod.exec("tc", &["filter", "show", "dev", "eth0", "ingress"]).trim(), "");
    assert!(!pod.exec("tc", &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    assert!(pod.ip(&["addr", "show", "dev", "eth0"]).contains(&format!("10.250.{n}.2/24")));
    assert_eq!(pod.mac("eth0"), eth0_mac);
    network::teardown_pod_network(&pod.path()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_twice_then_teardown_leaves_one_redirect_and_then_none() {
    testutil::skip_unless!(missing_root());
    let _serial = SERIAL.lock().await;
    let Pod { pod, peer: _peer, .. } = cni_pod();
    let first = network::setup_pod_network(&pod.path()).await.unwrap();
    // A single-queue tap takes one fd: while the first one (a running VM) holds it, a second setup fails...
    let busy = network::setup_pod_network(&pod.path()).await.unwrap_err();
    assert!(busy.to_string().contains("tap0_kata"), "{busy}");
    // ...without undoing the first one's work on its way out.
    assert!(pod.link_exists("tap0_kata"));
    assert!(pod.exec("tc", &["filter", "show", "dev", "eth0", "ingress"]).contains("mirred"));
    // A retried setup once the holder is gone (a shim restarting after QEMU died) attaches to the same tap
    // instead of stacking filters.
    let first_network = first.network.clone();
    drop(first);
    let second = network::setup_pod_network(&pod.path()).await.unwrap();
    assert_eq!(first_network, second.network);
    let filters = pod.exec("tc", &["filter", "show", "dev", "eth0", "ingress"]);
    assert_eq!(filters.matches("mirred").count(), 1, "{filters}");
    drop(second);
    network::teardown_pod_network(&pod.path()).await.unwrap();
    assert!(!pod.link_exists("tap0_kata"));
    assert_eq!(pod.exec("tc", &["filter", "show", "dev", "eth0", "ingress"]).trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_keeps_filters_that_are_not_ours() {
    testutil::skip_unless!(missing_root());
    let _serial = SERIAL.lock().await;
    let Pod { pod, peer: _peer, .. } = cni_pod();
    let setup = network::setup_pod_network(&pod.path()).await.unwrap();
    // Someone else's filter on the same ingress qdisc (pref 10, classifies ICMP).
    pod.exec(
        "tc",
        &[
            "filter", "add", "dev", "eth0", "ingress", "pref", "10", "protocol", "ip", "u32", "match", "ip",
            "protocol", "1", "0xff", "flowid", "1:1",
        ],
    );
    drop(setup);
    network::teardown_pod_network(&pod.path()).await.unwrap();
    let filters = pod.exec("tc", &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.contains("pref 10"), "{filters}");
    assert!(!filters.contains("mirred"), "{filters}");
    assert!(pod.exec("tc", &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_with_only_loopback_gives_an_empty_network() {
    testutil::skip_unless!(missing_root());
    let _serial = SERIAL.lock().await;
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let ns = Netns::new(format!("kt-{}-{n}", std::process::id()));
    let setup = network::setup_pod_network(&ns.path()).await.unwrap();
    assert_eq!(setup.network, network::PodNetwork::default());
    assert!(setup.taps.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_namespace_fails_setup_and_passes_teardown() {
    testutil::skip_unless!(missing_root());
    let _serial = SERIAL.lock().await;
    let path = PathBuf::from(format!("/var/run/netns/kt-{}-missing", std::process::id()));
    let err = network::setup_pod_network(&path).await.unwrap_err();
    assert!(matches!(err, NetworkError::Netns { .. }), "{err}");
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    network::teardown_pod_network(&path).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_setup_removes_what_it_added_and_nothing_else() {
    testutil::skip_unless!(missing_root());
    let _serial = SERIAL.lock().await;
    let Pod { pod, peer, .. } = cni_pod();
    // A second CNI interface whose tap name is taken by something that is not a tap: setup wires eth0 first,
    // then fails on eth1.
    pod.ip(&["link", "add", "name", "eth1", "type", "veth", "peer", "name", "hveth1", "netns", &peer.name]);
    pod.ip(&["link", "add", "name", "tap1_kata", "type", "veth", "peer", "name", "squatter"]);
    let err = network::setup_pod_network(&pod.path()).await.unwrap_err();
    assert!(err.to_string().contains("tap1_kata"), "{err}");
    assert!(!pod.link_exists("tap0_kata"));
    assert!(pod.link_exists("tap1_kata"), "the squatting veth is not ours");
    assert_eq!(pod.exec("tc", &["filter", "show", "dev", "eth0", "ingress"]).trim(), "");
    assert!(!pod.exec("tc", &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
}
