//! The host's TSC frequency, for the guest kernel argument `tsc_early_khz`.
//!
//! Under TCG the guest's TSC ticks at the host's TSC rate, but the guest cannot calibrate it reliably against an
//! emulated PIT, and microvm guests can hang at "Marking TSC unstable". Telling the kernel the frequency up front
//! avoids the calibration entirely.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the measured frequency is kept until the host reboots, so that only the first VM after a boot waits for
/// the measurement: every pod's shim is a new process, and measuring took 40 ms of each pod's start. The
/// runtime's root directory (root-owned, see `runtime::paths::DEFAULT_ROOT`).
const CACHE: &str = "/run/kata-rs/host-tsc-khz";

/// Changes with every boot of the host; the cache holds the one it was measured in.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Frequencies outside this range (kHz) are not believed, from the cache or a measurement.
const PLAUSIBLE_KHZ: std::ops::Range<u32> = 100_000..10_000_000;

/// The host TSC frequency in kHz, looked up once per process. `None` when it cannot be determined (non-x86 hosts).
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        from_sysfs(Path::new("/sys/devices/system/cpu/cpu0/tsc_freq_khz"))
            .or_else(|| measured_this_boot(Path::new(CACHE), Path::new(BOOT_ID), calibrate))
    })
}

/// The frequency `cache` holds for this boot, else `measure`'s, which is then saved in `cache` (when its
/// directory exists). The cache is never followed through a symlink and is replaced by a rename, so nothing in
/// its place is written through.
fn measured_this_boot(cache: &Path, boot_id: &Path, measure: impl FnOnce() -> Option<u32>) -> Option<u32> {
    let boot = std::fs::read_to_string(boot_id).ok().map(|b| b.trim().to_owned()).filter(|b| !b.is_empty());
    if let Some(khz) = boot.as_deref().and_then(|b| read_cache(cache, b)) {
        return Some(khz);
    }
    let khz = measure().filter(|khz| PLAUSIBLE_KHZ.contains(khz))?;
    if let Some(boot) = &boot {
        if let Err(err) = save_cache(cache, boot, khz) {
            tracing::debug!(cache = %cache.display(), %err, "cannot keep the host TSC frequency");
        }
    }
    Some(khz)
}

fn read_cache(cache: &Path, boot: &str) -> Option<u32> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(cache).ok()?;
    let mut text = String::new();
    file.take(256).read_to_string(&mut text).ok()?;
    let (saved_boot, khz) = text.trim().split_once(' ')?;
    let khz: u32 = khz.parse().ok()?;
    (saved_boot == boot && PLAUSIBLE_KHZ.contains(&khz)).then_some(khz)
}

fn save_cache(cache: &Path, boot: &str, khz: u32) -> std::io::Result<()> {
    let name = cache.file_name().and_then(|n| n.to_str()).unwrap_or("tsc");
    let temp = cache.with_file_name(format!(".{name}.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&temp)?;
    let written = file.write_all(format!("{boot} {khz}\n").as_bytes()).and_then(|()| std::fs::rename(&temp, cache));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
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
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sysfs_value_is_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tsc_freq_khz");
        std::fs::write(&file, "2596140\n").expect("write");
        assert_eq!(from_sysfs(&file), Some(2_596_140));
        assert_eq!(from_sysfs(&dir.path().join("missing")), None);
    }

    /// A boot id file and a cache path in a fresh directory.
    fn boot(id: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let boot_id = dir.path().join("boot_id");
        std::fs::write(&boot_id, format!("{id}\n")).expect("write");
        let cache = dir.path().join("host-tsc-khz");
        (dir, boot_id, cache)
    }

    #[test]
    fn a_measurement_is_kept_for_the_rest_of_the_boot() {
        let (_dir, boot_id, cache) = boot("b1");
        assert_eq!(measured_this_boot(&cache, &boot_id, || Some(2_600_000)), Some(2_600_000));
        assert_eq!(std::fs::read_to_string(&cache).expect("saved"), "b1 2600000\n");
        let mode = std::fs::metadata(&cache).expect("cache").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = measured_this_boot(&cache, &boot_id, || panic!("measured again within the same boot"));
        assert_eq!(again, Some(2_600_000));
    }

    #[test]
    fn another_boot_or_a_bad_value_is_measured_again() {
        let (_dir, boot_id, cache) = boot("b2");
        for stale in ["b1 2600000\n", "b2 12\n", "b2 lots\n", "garbage"] {
            std::fs::write(&cache, stale).expect("write");
            assert_eq!(measured_this_boot(&cache, &boot_id, || Some(3_000_000)), Some(3_000_000), "{stale:?}");
            assert_eq!(std::fs::read_to_string(&cache).expect("saved"), "b2 3000000\n");
        }
        std::fs::remove_file(&cache).expect("remove");
        assert_eq!(measured_this_boot(&cache, &boot_id, || Some(5)), None, "an implausible measurement");
        assert!(!cache.exists());
    }

    #[test]
    fn a_symlink_in_the_cache_place_is_neither_read_nor_written_through() {
        let (dir, boot_id, cache) = boot("b3");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "b3 1234567\n").expect("write");
        std::os::unix::fs::symlink(&target, &cache).expect("symlink");
        assert_eq!(measured_this_boot(&cache, &boot_id, || Some(2_000_000)), Some(2_000_000));
        assert_eq!(std::fs::read_to_string(&target).expect("target"), "b3 1234567\n", "written through");
        assert!(!std::fs::symlink_metadata(&cache).expect("cache").file_type().is_symlink(), "replaced by a file");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers.len(), 3, "boot_id, elsewhere, the cache: {leftovers:?}");
    }

    #[test]
    fn no_cache_directory_still_measures() {
        let (dir, boot_id, _) = boot("b4");
        let cache = dir.path().join("absent").join("host-tsc-khz");
        assert_eq!(measured_this_boot(&cache, &boot_id, || Some(2_000_000)), Some(2_000_000));
        assert!(!dir.path().join("absent").exists());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn calibration_is_plausible() {
        let khz = calibrate().expect("x86_64 has a TSC");
        assert!((100_000..10_000_000).contains(&khz), "implausible TSC frequency {khz} kHz");
    }
}
