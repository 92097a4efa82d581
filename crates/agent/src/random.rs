//! Reseeding the guest's random number generator from the host.
//!
//! A VM cloned from a template resumes with the template's kernel random state, so without this every clone
//! would hand out the same "random" bytes until the kernel's next periodic reseed.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// At most this many bytes are credited; more adds nothing to a 256-bit generator.
const MAX_BYTES: usize = 512;

/// Credits `bytes` to the input pool (as full entropy: they come from the host's generator) and makes the
/// kernel reseed its generator from it at once.
pub fn reseed(bytes: &[u8]) -> std::io::Result<()> {
    let bytes = &bytes[..bytes.len().min(MAX_BYTES)];
    let random = OpenOptions::new().write(true).open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: `info` is a valid rand_pool_info whose buf_size matches the bytes that follow; the kernel only
    // reads it during the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
