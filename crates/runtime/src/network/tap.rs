//! Tap devices through `/dev/net/tun` (tun/tap cannot be created over rtnetlink).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::libc;

/// Length of the `virtio_net_hdr` that precedes every frame read from or written to a tap fd, until someone
/// (QEMU does, for virtio 1.0) changes it with `TUNSETVNETHDRSZ`.
pub const VNET_HDR_LEN: usize = 10;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
nix::ioctl_write_int_bad!(tun_set_owner, libc::TUNSETOWNER);

/// Creates (or attaches to) the persistent tap `name` in the calling thread's network namespace, owned by root,
/// single queue, without packet information and with a `virtio_net_hdr` on every frame (QEMU probes that flag on
/// `-netdev tap,fd=N` and then offloads checksums and GSO to the guest). The fd is close-on-exec.
pub(crate) fn create_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface names have 1 to 15 bytes"));
    }
    let tun = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is an open /dev/net/tun and `req` a valid ifreq that outlives the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &req) }?;
    // SAFETY: TUNSETOWNER takes the uid by value.
    unsafe { tun_set_owner(tun.as_raw_fd(), 0) }?;
    // SAFETY: TUNSETPERSIST takes a flag by value.
    unsafe { tun_set_persist(tun.as_raw_fd(), 1) }?;
    Ok(tun.into())
}
