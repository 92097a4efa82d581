//! The host's TSC frequency, for the guest kernel argument `tsc_early_khz`.
//!
//! Under TCG the guest's TSC ticks at the host's TSC rate, but the guest cannot calibrate it reliably against an
//! emulated PIT, and microvm guests can hang at "Marking TSC unstable". Telling the kernel the frequency up front
//! avoids the calibration entirely.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The host TSC frequency in kHz, measured once per process. `None` when it cannot be determined (non-x86 hosts).
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| from_sysfs(Path::new("/sys/devices/system/cpu/cpu0/tsc_freq_khz")).or_else(calibrate))
}

/// Some kernels (and out-of-tree patches) export the exact frequency.
fn from_sysfs(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|&khz| khz > 0)
}

/// Counts TSC ticks over a short wall-clock interval. Accurate to well under 1%, which is all the guest needs.
#[cfg(target_arch = "x86_64")]
fn calibrate() -> Option<u32> {
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC has no memory effects and is available on every x86_64 CPU.
        #[allow(unused_unsafe)]
        unsafe {
            core::arch::x86_64::_rdtsc()
        }
    }
    let interval = Duration::from_millis(40);
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(interval);
    let (c1, t1) = (rdtsc(), Instant::now());
    let nanos = t1.duration_since(t0).as_nanos();
    if nanos == 0 || c1 <= c0 {
        return None;
    }
    let khz = u128::from(c1 - c0) * 1_000_000 / nanos;
    u32::try_from(khz).ok().filter(|&khz| khz > 0)
}

#[cfg(not(target_arch = "x86_64"))]
fn calibrate() -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_value_is_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tsc_freq_khz");
        std::fs::write(&file, "2596140\n").expect("write");
        assert_eq!(from_sysfs(&file), Some(2_596_140));
        assert_eq!(from_sysfs(&dir.path().join("missing")), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn calibration_is_plausible() {
        let khz = calibrate().expect("x86_64 has a TSC");
        assert!((100_000..10_000_000).contains(&khz), "implausible TSC frequency {khz} kHz");
    }
}
