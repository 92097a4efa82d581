//! Onlining the CPUs and memory the host hot-plugged (q35, ACPI). The guest kernel adds them offline: a new CPU
//! as `cpu/cpuN` with `online` = 0, new memory as 128 MiB blocks `memory/memoryN` with `state` = `offline`.
//!
//! The host grows the VM first (its `resize` returns once the guest kernel acknowledged the devices), then asks
//! for them to be onlined, saying how many CPUs it expects. Only fixed paths under `/sys/devices/system` are
//! touched, nothing named by the request. The sysfs writes are synchronous on the agent's one runtime thread
//! (see `container.rs` for why there is no other): each takes milliseconds; between passes the task sleeps.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// Where the kernel lists CPUs (`cpu/`) and memory blocks (`memory/`).
pub const SYSTEM: &str = "/sys/devices/system";
/// How long the CPUs the host asked for get to appear and come online: the host has already seen the guest
/// kernel add them, so this is a margin, kept well below the host's call timeout.
pub const WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("cannot list {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot online {}", path.display())]
    Online {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{online} of {wanted} CPUs are online after {waited:?}")]
    CpusMissing {
        online: u32,
        wanted: u32,
        waited: Duration,
        /// The last CPU that would not come online, if one failed.
        #[source]
        failure: Option<Box<HotplugError>>,
    },
}

type Result<T> = std::result::Result<T, HotplugError>;

/// What one call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Onlined {
    /// CPUs online in the end.
    pub cpus_online: u32,
    /// CPUs this call brought online.
    pub cpus: u32,
    /// Memory blocks this call brought online.
    pub memory_blocks: u32,
}

/// Onlines every offline memory block and CPU under `system` (normally [`SYSTEM`]), again and again until at
/// least `vcpus` CPUs are online or `wait` has passed. Memory first: bringing up a CPU allocates memory.
pub async fn online_cpu_mem(system: &Path, vcpus: u32, wait: Duration) -> Result<Onlined> {
    let started = Instant::now();
    let mut done = Onlined::default();
    loop {
        let memory = online_memory(&system.join("memory"))?;
        done.memory_blocks += memory.onlined;
        let cpus = online_cpus(&system.join("cpu"))?;
        done.cpus += cpus.onlined;
        done.cpus_online = cpus.online;
        if cpus.online >= vcpus {
            // A block that would not come online is an error once the CPUs are in: the host asked for the memory.
            return match memory.failures.into_iter().next() {
                Some(failure) => Err(failure),
                None => Ok(done),
            };
        }
        if started.elapsed() >= wait {
            return Err(HotplugError::CpusMissing {
                online: cpus.online,
                wanted: vcpus,
                waited: wait,
                failure: cpus.failures.into_iter().last().map(Box::new),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One pass over a directory of CPUs or memory blocks.
#[derive(Debug, Default)]
struct Pass {
    /// Entries online after the pass.
    online: u32,
    /// Entries this pass brought online.
    onlined: u32,
    failures: Vec<HotplugError>,
}

/// The entries of `dir` named `<prefix><number>`, in numeric order.
fn numbered(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let list = |source| HotplugError::List { path: dir.to_path_buf(), source };
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(list)? {
        let entry = entry.map_err(list)?;
        let name = entry.file_name();
        let number = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|n| n.parse::<u32>().ok());
        if let Some(number) = number {
            found.push((number, entry.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

fn read_trimmed(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HotplugError::Read { path: path.to_path_buf(), source }),
    }
}

/// CPUs: `cpuN/online` holds 0 or 1; a CPU without the file (the boot CPU) cannot go offline, so it is online.
fn online_cpus(dir: &Path) -> Result<Pass> {
    let mut pass = Pass::default();
    for cpu in numbered(dir, "cpu")? {
        pass.take(online_cpu(&cpu.join("online")));
    }
    Ok(pass)
}

/// Whether this call brought the CPU online; `Ok(false)`: it already was.
fn online_cpu(file: &Path) -> Result<bool> {
    match read_trimmed(file)?.as_deref() {
        None | Some("1") => Ok(false),
        Some(_) => {
            std::fs::write(file, "1").map_err(|source| HotplugError::Online { path: file.to_path_buf(), source })?;
            Ok(true)
        }
    }
}

/// Memory blocks: `memoryN/state` is `online`, `offline` or `going-offline`. No `memory/` directory means a
/// kernel without memory hot-plug: nothing to do.
fn online_memory(dir: &Path) -> Result<Pass> {
    let mut pass = Pass::default();
    let blocks = match numbered(dir, "memory") {
        Ok(blocks) => blocks,
        Err(HotplugError::List { source, .. }) if source.kind() == ErrorKind::NotFound => return Ok(pass),
        Err(e) => return Err(e),
    };
    for block in blocks {
        pass.take(online_block(&block.join("state")));
    }
    Ok(pass)
}

/// Whether this call brought the block online; `Ok(false)`: it was not offline.
fn online_block(file: &Path) -> Result<bool> {
    if read_trimmed(file)?.as_deref() != Some("offline") {
        return Ok(false);
    }
    match std::fs::write(file, "online") {
        Ok(()) => Ok(true),
        // The kernel may have onlined it meanwhile (auto-online): then the write's EINVAL means nothing.
        Err(_) if read_trimmed(file)?.as_deref() == Some("online") => Ok(false),
        Err(source) => Err(HotplugError::Online { path: file.to_path_buf(), source }),
    }
}

impl Pass {
    /// Counts one entry's outcome; a failure does not stop the pass.
    fn take(&mut self, outcome: Result<bool>) {
        match outcome {
            Ok(onlined) => {
                self.online += 1;
                self.onlined += u32::from(onlined);
            }
            Err(failure) => self.failures.push(failure),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs look-alike: `cpus` as (number, `online` content or none), `blocks` as (number, state).
    fn system(cpus: &[(u32, Option<&str>)], blocks: &[(u32, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (n, online) in cpus {
            add_cpu(dir.path(), *n, *online);
        }
        for (n, state) in blocks {
            let block = dir.path().join(format!("memory/memory{n}"));
            std::fs::create_dir_all(&block).expect("block");
            std::fs::write(block.join("state"), state).expect("state");
        }
        std::fs::create_dir_all(dir.path().join("cpu/cpufreq")).expect("a directory that is no CPU");
        std::fs::write(dir.path().join("cpu/online"), "0").expect("a file that is no CPU");
        std::fs::write(dir.path().join("memory/block_size_bytes"), "8000000").ok();
        dir
    }

    fn add_cpu(system: &Path, n: u32, online: Option<&str>) {
        let cpu = system.join(format!("cpu/cpu{n}"));
        std::fs::create_dir_all(&cpu).expect("cpu");
        if let Some(online) = online {
            std::fs::write(cpu.join("online"), online).expect("online");
        }
    }

    fn read(system: &Path, file: &str) -> String {
        std::fs::read_to_string(system.join(file)).expect("read")
    }

    #[tokio::test]
    async fn onlines_offline_cpus_and_memory_blocks() {
        let dir = system(
            &[(0, None), (1, Some("1")), (2, Some("0")), (10, Some("0\n"))],
            &[(0, "online"), (1, "online\n"), (32, "offline\n"), (33, "offline")],
        );
        let done = online_cpu_mem(dir.path(), 4, Duration::from_secs(1)).await.expect("online");
        assert_eq!(done, Onlined { cpus_online: 4, cpus: 2, memory_blocks: 2 });
        assert_eq!(read(dir.path(), "cpu/cpu2/online"), "1");
        assert_eq!(read(dir.path(), "cpu/cpu10/online"), "1");
        assert_eq!(read(dir.path(), "memory/memory32/state"), "online");
        assert_eq!(read(dir.path(), "memory/memory1/state"), "online\n", "online blocks are left alone");
        assert_eq!(read(dir.path(), "cpu/online"), "0", "only cpuN entries are CPUs");
    }

    #[tokio::test]
    async fn zero_cpus_wanted_onlines_what_is_there_and_returns() {
        let dir = system(&[(0, None), (1, Some("0"))], &[]);
        let done = online_cpu_mem(dir.path(), 0, Duration::ZERO).await.expect("online");
        assert_eq!(done, Onlined { cpus_online: 2, cpus: 1, memory_blocks: 0 });
    }

    #[tokio::test]
    async fn no_memory_directory_means_nothing_to_online() {
        let dir = system(&[(0, None)], &[]);
        std::fs::remove_dir_all(dir.path().join("memory")).ok();
        assert_eq!(online_cpu_mem(dir.path(), 1, Duration::ZERO).await.expect("online").cpus_online, 1);
    }

    #[tokio::test]
    async fn waits_for_cpus_that_appear_late() {
        let dir = system(&[(0, None)], &[(0, "online")]);
        let path = dir.path().to_path_buf();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(120)).await;
            add_cpu(&path, 1, Some("0"));
            std::fs::create_dir_all(path.join("memory/memory8")).expect("block");
            std::fs::write(path.join("memory/memory8/state"), "offline").expect("state");
        });
        let done = online_cpu_mem(dir.path(), 2, Duration::from_secs(5)).await.expect("online");
        late.await.expect("late");
        assert_eq!(done, Onlined { cpus_online: 2, cpus: 1, memory_blocks: 1 });
    }

    #[tokio::test]
    async fn too_few_cpus_is_an_error_saying_how_many() {
        let dir = system(&[(0, None), (1, Some("0"))], &[]);
        let err = online_cpu_mem(dir.path(), 3, Duration::from_millis(120)).await.expect_err("only two CPUs");
        assert_eq!(crate::error_chain(&err), "2 of 3 CPUs are online after 120ms");
    }

    #[tokio::test]
    async fn a_cpu_that_will_not_come_online_is_named() {
        let dir = system(&[(0, None), (1, Some("0"))], &[]);
        // A directory in place of the file: writing fails, as a refused sysfs write would.
        std::fs::remove_file(dir.path().join("cpu/cpu1/online")).expect("rm");
        std::fs::create_dir(dir.path().join("cpu/cpu1/online")).expect("dir");
        let err = online_cpu_mem(dir.path(), 2, Duration::from_millis(60)).await.expect_err("cpu1 fails");
        let chain = crate::error_chain(&err);
        assert!(chain.starts_with("1 of 2 CPUs are online after 60ms: cannot read "), "{chain}");
        assert!(chain.contains("cpu/cpu1/online"), "{chain}");
    }

    #[tokio::test]
    async fn a_memory_block_that_will_not_come_online_is_named() {
        let dir = system(&[(0, None)], &[(3, "offline"), (4, "offline")]);
        let state = dir.path().join("memory/memory3/state");
        std::fs::remove_file(&state).expect("rm");
        std::fs::create_dir(&state).expect("dir");
        let err = online_cpu_mem(dir.path(), 1, Duration::ZERO).await.expect_err("block fails");
        let chain = crate::error_chain(&err);
        assert!(chain.starts_with("cannot read ") && chain.contains("memory/memory3/state"), "{chain}");
        assert_eq!(read(dir.path(), "memory/memory4/state"), "online", "the other blocks still come online");
    }
}
