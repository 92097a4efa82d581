//! Growing a running VM: vCPUs and DIMMs hot-plugged over QMP (q35 only; microvm has no hot-plug).
//!
//! Everything is read back from QEMU (`query-cpus-fast`, `query-memory-size-summary`,
//! `query-hotpluggable-cpus`, `query-memory-devices`), never from what this process remembers, so a VM found
//! again by `attach` in another process grows the same way. Device ids are derived from QEMU's state too:
//! `vcpu<n>` for the n-th CPU slot, `dimm<n>` with its backend `dimm<n>-mem` for the first unused n.
//!
//! Memory is plugged before CPUs, as one DIMM per resize. The guest kernel answers each device with an ACPI
//! `_OST` once it has taken it (QEMU keeps the last one per slot: `query-acpi-ospm-status`); `resize` returns
//! after every new device was acknowledged, so the agent called next finds the CPUs and memory blocks in sysfs
//! to online.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use crate::config::{MachineType, VmConfig, VmSize};
use crate::error::{Error, Result};
use crate::qmp::{QmpClient, QmpError};

/// DIMM slots of a q35 VM that may grow its memory (`-m <size>M,slots=8,...`). Each resize that adds memory
/// takes one, whatever its size. More would not help: every DIMM is also a memory region of each vhost-user
/// daemon, and vhost-device-vsock 0.3 and virtiofsd 1.14 take 8 regions in all, one of which the boot RAM
/// fills: a VM with either daemon grows its memory 7 times (QEMU then refuses the DIMM, and `resize` says so),
/// one without (9p and virtio-serial, as template clones have) 8 times.
pub const MEMORY_SLOTS: u32 = 8;

/// The guest kernel's memory block on x86 (RAM below 64 GiB): memory is added and onlined in whole blocks, and a
/// DIMM that is not a multiple of it (or not aligned to it) is refused by the guest. Every DIMM is a multiple, and
/// since hot-plugged memory starts block-aligned (QEMU's device memory region starts at a 1 GiB boundary), so is
/// where the next one lands.
pub const MEMORY_BLOCK_MIB: u32 = 128;

/// How long the guest kernel gets to acknowledge the devices of one resize. Under TCG on a busy host adding a
/// CPU takes about a second.
const GUEST_ACK_TIMEOUT: Duration = Duration::from_secs(20);
/// How often QEMU is asked whether the guest acknowledged.
const ACK_POLL: Duration = Duration::from_millis(20);
/// `_OST` source of a device the guest was told to add (ACPI "device check" notification).
const OST_SOURCE_INSERT: i64 = 1;

/// How far a VM may grow, as QEMU's command line gets it: `None` where it cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    /// `-smp <vcpus>,maxcpus=<this>`.
    pub max_vcpus: Option<u32>,
    /// `-m <size>M,slots=<MEMORY_SLOTS>,maxmem=<this>M`: the configured maximum, raised so that what can be
    /// added is a whole number of [`MEMORY_BLOCK_MIB`] blocks (a resize to the configured maximum then fits).
    pub max_memory_mib: Option<u32>,
}

impl Growth {
    pub fn of(config: &VmConfig) -> Self {
        if config.qemu.machine != MachineType::Q35 {
            return Growth { max_vcpus: None, max_memory_mib: None };
        }
        let max_vcpus = (config.max_vcpus > config.vcpus).then_some(config.max_vcpus);
        let max_memory_mib = (config.max_memory_mib > config.memory_mib).then(|| {
            let room = round_up(config.max_memory_mib - config.memory_mib, MEMORY_BLOCK_MIB);
            config.memory_mib.saturating_add(room)
        });
        Growth { max_vcpus, max_memory_mib }
    }

    pub fn any(&self) -> bool {
        self.max_vcpus.is_some() || self.max_memory_mib.is_some()
    }
}

fn round_up(value: u32, to: u32) -> u32 {
    value.div_ceil(to).saturating_mul(to)
}

const MIB: u64 = 1024 * 1024;

/// `query-memory-size-summary`.
#[derive(Debug, Deserialize)]
struct MemorySummary {
    #[serde(rename = "base-memory")]
    base: u64,
    #[serde(rename = "plugged-memory", default)]
    plugged: u64,
}

/// One entry of `query-hotpluggable-cpus`: a CPU slot, taken when it has a `qom-path`.
#[derive(Debug, Clone, Deserialize)]
struct CpuSlot {
    #[serde(rename = "type")]
    driver: String,
    #[serde(rename = "vcpus-count")]
    vcpus_count: u32,
    props: Map<String, Value>,
    #[serde(rename = "qom-path")]
    qom_path: Option<String>,
}

impl CpuSlot {
    /// Where the slot sits in the topology, outermost first, so CPUs are added in order.
    fn position(&self) -> Vec<i64> {
        ["node-id", "socket-id", "die-id", "cluster-id", "core-id", "thread-id"]
            .iter()
            .map(|key| self.props.get(*key).and_then(Value::as_i64).unwrap_or(-1))
            .collect()
    }
}

/// One entry of `query-memory-devices`.
#[derive(Debug, Deserialize)]
struct MemoryDevice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

/// One entry of `query-acpi-ospm-status`: the guest's last `_OST` for a slot.
#[derive(Debug, Deserialize)]
struct OstInfo {
    device: Option<String>,
    source: i64,
    status: u64,
}

fn reply<T: serde::de::DeserializeOwned>(command: &'static str, value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|source| Error::Qmp(QmpError::Reply { command, source }))
}

/// The VM's size as QEMU reports it.
pub async fn current_size(qmp: &QmpClient) -> Result<VmSize> {
    let cpus: Vec<Value> = reply("query-cpus-fast", qmp.execute("query-cpus-fast", None).await?)?;
    let memory: MemorySummary =
        reply("query-memory-size-summary", qmp.execute("query-memory-size-summary", None).await?)?;
    let mib = (memory.base + memory.plugged) / MIB;
    Ok(VmSize {
        vcpus: u32::try_from(cpus.len()).unwrap_or(u32::MAX),
        memory_mib: u32::try_from(mib).unwrap_or(u32::MAX),
    })
}

fn refuse<T>(reason: impl Into<String>) -> Result<T> {
    Err(Error::Resize { reason: reason.into() })
}

/// The message for a machine that cannot grow.
pub const MICROVM_CANNOT_GROW: &str =
    "microvm cannot hot-plug CPUs or memory: size the pod at start, or use machine_type = \"q35\"";

/// What one resize adds, decided before anything is plugged.
#[derive(Debug)]
struct Plan {
    memory_mib: u32,
    dimm: Option<u32>,
    cpus: Vec<(String, CpuSlot)>,
}

/// Grows the VM behind `qmp` (configured as `config`) to at least `want`; see [`crate::Vm::resize`]. The caller
/// serialises resizes of one VM.
pub async fn resize(qmp: &QmpClient, config: &VmConfig, want: VmSize) -> Result<VmSize> {
    let now = current_size(qmp).await?;
    let more_cpus = want.vcpus.saturating_sub(now.vcpus);
    let more_memory = want.memory_mib.saturating_sub(now.memory_mib);
    if more_cpus == 0 && more_memory == 0 {
        return Ok(now);
    }
    if config.qemu.machine == MachineType::Microvm {
        return refuse(MICROVM_CANNOT_GROW);
    }
    let status = qmp.query_status().await?;
    if status.status != "running" {
        return refuse(format!("it is {}; the guest must run to take new CPUs and memory", status.status));
    }
    let plan = plan(qmp, config, now, want, more_cpus, more_memory).await?;
    let mut added = Vec::new();
    let plugged = plug(qmp, &plan, &mut added).await;
    // Whatever was plugged is in the guest's hands now: wait for its answer also when a later device failed.
    let acknowledged = match added.is_empty() {
        true => Ok(()),
        false => wait_for_guest(qmp, &added).await,
    };
    plugged?;
    acknowledged?;
    let grown = current_size(qmp).await?;
    tracing::info!(vm = %config.name, from = ?now, to = ?grown, devices = ?added, "VM grown");
    Ok(grown)
}

/// Checks every limit and picks the slots, so a refused resize plugs nothing.
async fn plan(
    qmp: &QmpClient,
    config: &VmConfig,
    now: VmSize,
    want: VmSize,
    more_cpus: u32,
    more_memory: u32,
) -> Result<Plan> {
    let growth = Growth::of(config);
    let mut plan = Plan { memory_mib: 0, dimm: None, cpus: Vec::new() };
    if more_memory > 0 {
        let Some(max) = growth.max_memory_mib else {
            return refuse(format!(
                "{} MiB of memory asked for, but the VM was started with {} MiB and no room to grow \
                 (hypervisor.qemu.default_maxmemory is {} MiB; it must exceed the VM's memory)",
                want.memory_mib, config.memory_mib, config.max_memory_mib
            ));
        };
        if want.memory_mib > config.max_memory_mib {
            return refuse(format!(
                "{} MiB of memory asked for, more than hypervisor.qemu.default_maxmemory ({} MiB); the VM has {} MiB",
                want.memory_mib, config.max_memory_mib, now.memory_mib
            ));
        }
        let add = round_up(more_memory, MEMORY_BLOCK_MIB);
        if now.memory_mib.saturating_add(add) > max {
            return refuse(format!(
                "{add} MiB more memory do not fit: the VM has {} MiB of at most {max} MiB",
                now.memory_mib
            ));
        }
        let devices: Vec<MemoryDevice> =
            reply("query-memory-devices", qmp.execute("query-memory-devices", None).await?)?;
        let ids: HashSet<&str> = devices.iter().filter_map(|d| d.data.get("id").and_then(Value::as_str)).collect();
        let dimms = devices.iter().filter(|d| d.kind == "dimm").count();
        if dimms >= MEMORY_SLOTS as usize {
            return refuse(format!(
                "all {MEMORY_SLOTS} memory slots are taken (each growth of memory takes one); the VM has {} MiB",
                now.memory_mib
            ));
        }
        let free = (0..).find(|n| !ids.contains(dimm_id(*n).as_str())).unwrap_or(0);
        plan.memory_mib = add;
        plan.dimm = Some(free);
    }
    if more_cpus > 0 {
        let Some(max) = growth.max_vcpus else {
            return refuse(format!(
                "{} vCPUs asked for, but the VM was started with {} and no room to grow \
                 (hypervisor.qemu.default_maxvcpus is {}; it must exceed the VM's vCPUs)",
                want.vcpus, config.vcpus, config.max_vcpus
            ));
        };
        if want.vcpus > max {
            return refuse(format!(
                "{} vCPUs asked for, more than hypervisor.qemu.default_maxvcpus ({max}); the VM has {}",
                want.vcpus, now.vcpus
            ));
        }
        let mut slots: Vec<CpuSlot> =
            reply("query-hotpluggable-cpus", qmp.execute("query-hotpluggable-cpus", None).await?)?;
        slots.sort_by_key(CpuSlot::position);
        let free: Vec<(String, CpuSlot)> = slots
            .into_iter()
            .enumerate()
            .filter(|(_, slot)| slot.qom_path.is_none())
            .map(|(n, slot)| (format!("vcpu{n}"), slot))
            .collect();
        let mut needed = more_cpus;
        for (id, slot) in free {
            if needed == 0 {
                break;
            }
            needed = needed.saturating_sub(slot.vcpus_count.max(1));
            plan.cpus.push((id, slot));
        }
        if needed > 0 {
            return refuse(format!("no CPU slot left: the VM has {} vCPUs, {} asked for", now.vcpus, want.vcpus));
        }
    }
    Ok(plan)
}

fn dimm_id(n: u32) -> String {
    format!("dimm{n}")
}

/// Plugs the planned DIMM, then the CPUs, recording each device QEMU accepted in `added`.
async fn plug(qmp: &QmpClient, plan: &Plan, added: &mut Vec<String>) -> Result<()> {
    if let Some(n) = plan.dimm {
        let (id, memdev) = (dimm_id(n), format!("{}-mem", dimm_id(n)));
        // Shared, like the boot memory: vhost-user daemons (virtio-fs, vsock) map all guest memory.
        let backend = json!({
            "qom-type": "memory-backend-memfd",
            "id": memdev,
            "size": u64::from(plan.memory_mib) * MIB,
            "share": true,
        });
        qmp.execute("object-add", Some(backend)).await?;
        let dimm = json!({ "driver": "pc-dimm", "id": id, "memdev": memdev });
        if let Err(e) = qmp.execute("device_add", Some(dimm)).await {
            if let Err(cleanup) = qmp.execute("object-del", Some(json!({ "id": memdev }))).await {
                tracing::warn!(memdev, error = %cleanup, "cannot remove the memory backend of a DIMM QEMU refused");
            }
            return Err(match e {
                // Plugged nothing (memory goes first): a refusal with QEMU's reason, e.g. "a used vhost backend has
                // no free memory slots left" when a vhost-user daemon takes fewer memory regions than there are slots.
                QmpError::Command { desc, .. } => {
                    Error::Resize { reason: format!("QEMU refused another DIMM of {} MiB: {desc}", plan.memory_mib) }
                }
                other => other.into(),
            });
        }
        added.push(id);
    }
    for (id, slot) in &plan.cpus {
        let mut arguments = slot.props.clone();
        arguments.insert("driver".into(), Value::from(slot.driver.clone()));
        arguments.insert("id".into(), Value::from(id.clone()));
        qmp.execute("device_add", Some(Value::Object(arguments))).await?;
        added.push(id.clone());
    }
    Ok(())
}

/// Waits until the guest acknowledged every device in `ids` (ACPI `_OST`), at most [`GUEST_ACK_TIMEOUT`].
async fn wait_for_guest(qmp: &QmpClient, ids: &[String]) -> Result<()> {
    let deadline = Instant::now() + GUEST_ACK_TIMEOUT;
    loop {
        let infos: Vec<OstInfo> = reply("query-acpi-ospm-status", qmp.execute("query-acpi-ospm-status", None).await?)?;
        let mut waiting = Vec::new();
        let mut failed = Vec::new();
        for id in ids {
            let answer =
                infos.iter().find(|info| info.device.as_deref() == Some(id) && info.source == OST_SOURCE_INSERT);
            match answer {
                Some(info) if info.status == 0 => {}
                Some(info) => failed.push(format!("{id} (_OST status {:#x})", info.status)),
                None => waiting.push(id.as_str()),
            }
        }
        if !failed.is_empty() {
            return Err(Error::GuestRejected {
                devices: ids.join(", "),
                reason: format!("the guest kernel failed to add {}", failed.join(", ")),
            });
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::GuestRejected {
                devices: ids.join(", "),
                reason: format!(
                    "no ACPI acknowledgement for {} within {GUEST_ACK_TIMEOUT:?} (is the guest kernel built with \
                     ACPI CPU and memory hot-plug?)",
                    waiting.join(", ")
                ),
            });
        }
        tokio::time::sleep(ACK_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// How the fake guest answers hot-plugged devices.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Guest {
        Acknowledges,
        Fails,
        Silent,
    }

    /// The part of QEMU a resize talks to: CPU slots, memory, DIMMs, `_OST` answers, and every command seen.
    #[derive(Debug)]
    struct FakeQemu {
        status: &'static str,
        /// Slots in QEMU's (reverse) order; `true` when taken.
        cpus: Vec<(i64, bool)>,
        base_mib: u64,
        dimms: Vec<(String, u64)>,
        objects: Vec<(String, u64)>,
        ost: Vec<Value>,
        guest: Guest,
        refuse_dimm: bool,
        seen: Vec<Value>,
    }

    impl FakeQemu {
        fn new(cpus: usize, max_cpus: usize, base_mib: u64) -> Self {
            FakeQemu {
                status: "running",
                cpus: (0..max_cpus as i64).rev().map(|core| (core, (core as usize) < cpus)).collect(),
                base_mib,
                dimms: Vec::new(),
                objects: Vec::new(),
                ost: Vec::new(),
                guest: Guest::Acknowledges,
                refuse_dimm: false,
                seen: Vec::new(),
            }
        }

        fn answer(&mut self, request: &Value) -> Value {
            self.seen.push(request.clone());
            let args = &request["arguments"];
            let error = |desc: &str| json!({ "error": { "class": "GenericError", "desc": desc } });
            let ret = match request["execute"].as_str().unwrap_or_default() {
                "qmp_capabilities" => json!({}),
                "query-status" => json!({ "status": self.status, "running": self.status == "running" }),
                "query-cpus-fast" => Value::from(
                    self.cpus
                        .iter()
                        .filter(|(_, taken)| *taken)
                        .map(|(core, _)| json!({ "cpu-index": core }))
                        .collect::<Vec<_>>(),
                ),
                "query-hotpluggable-cpus" => Value::from(
                    self.cpus
                        .iter()
                        .map(|(core, taken)| {
                            let mut slot = json!({
                                "type": "max-x86_64-cpu", "vcpus-count": 1,
                                "props": { "core-id": core, "thread-id": 0, "node-id": 0, "socket-id": 0 },
                            });
                            if *taken {
                                slot["qom-path"] = json!(format!("/machine/cpu{core}"));
                            }
                            slot
                        })
                        .collect::<Vec<_>>(),
                ),
                "query-memory-size-summary" => json!({
                    "base-memory": self.base_mib * MIB,
                    "plugged-memory": self.dimms.iter().map(|(_, size)| size).sum::<u64>(),
                }),
                "query-memory-devices" => Value::from(
                    self.dimms
                        .iter()
                        .map(|(id, size)| json!({ "type": "dimm", "data": { "id": id, "size": size } }))
                        .collect::<Vec<_>>(),
                ),
                "query-acpi-ospm-status" => Value::from(self.ost.clone()),
                "object-add" => {
                    self.objects
                        .push((args["id"].as_str().unwrap_or_default().into(), args["size"].as_u64().unwrap_or(0)));
                    json!({})
                }
                "object-del" => {
                    self.objects.retain(|(id, _)| Some(id.as_str()) != args["id"].as_str());
                    json!({})
                }
                "device_add" => {
                    let id = args["id"].as_str().unwrap_or_default().to_string();
                    match args["driver"].as_str() {
                        Some("pc-dimm") if self.refuse_dimm => return error("Property 'memdev' is busy"),
                        Some("pc-dimm") => {
                            let size = self
                                .objects
                                .iter()
                                .find(|(o, _)| Some(o.as_str()) == args["memdev"].as_str())
                                .map(|(_, s)| *s);
                            self.dimms.push((id.clone(), size.unwrap_or(0)));
                        }
                        Some("max-x86_64-cpu") => {
                            let core = args["core-id"].as_i64();
                            let slot = self.cpus.iter_mut().find(|(c, taken)| Some(*c) == core && !taken);
                            match slot {
                                Some(slot) => slot.1 = true,
                                None => return error("CPU slot taken"),
                            }
                        }
                        _ => return error("unknown driver"),
                    }
                    match self.guest {
                        Guest::Acknowledges => self.ost.push(json!({ "device": id, "source": 1, "status": 0 })),
                        Guest::Fails => self.ost.push(json!({ "device": id, "source": 1, "status": 0x81 })),
                        Guest::Silent => {}
                    }
                    json!({})
                }
                other => return error(&format!("unexpected command {other}")),
            };
            json!({ "return": ret })
        }
    }

    /// Serves `fake` on a socket in `dir` and connects a client to it.
    async fn serve(dir: &std::path::Path, fake: Arc<Mutex<FakeQemu>>) -> QmpClient {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = fake.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    write.write_all(b"{\"QMP\": {}}\n").await.expect("greet");
                    while let Ok(Some(line)) = lines.next_line().await {
                        let request: Value = serde_json::from_str(&line).expect("json");
                        let mut answer = fake.lock().expect("fake").answer(&request);
                        answer["id"] = request["id"].clone();
                        write.write_all(format!("{answer}\n").as_bytes()).await.expect("answer");
                    }
                });
            }
        });
        QmpClient::connect(&path, Duration::from_secs(5)).await.expect("connect")
    }

    fn q35(vcpus: u32, memory_mib: u32, max_vcpus: u32, max_memory_mib: u32) -> VmConfig {
        let mut config = VmConfig::new("vm", "/k/vmlinux", "/run/vm");
        config.qemu.machine = MachineType::Q35;
        (config.vcpus, config.memory_mib, config.max_vcpus, config.max_memory_mib) =
            (vcpus, memory_mib, max_vcpus, max_memory_mib);
        config
    }

    fn size(vcpus: u32, memory_mib: u32) -> VmSize {
        VmSize { vcpus, memory_mib }
    }

    fn commands(fake: &Mutex<FakeQemu>) -> Vec<String> {
        let fake = fake.lock().expect("fake");
        fake.seen
            .iter()
            .filter_map(|r| r["execute"].as_str())
            .filter(|c| !c.starts_with("query"))
            .map(String::from)
            .collect()
    }

    #[tokio::test]
    async fn grows_memory_then_cpus_in_topology_order_and_waits_for_the_guest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Mutex::new(FakeQemu::new(1, 4, 256)));
        let qmp = serve(dir.path(), fake.clone()).await;
        let config = q35(1, 256, 4, 1024);
        assert_eq!(current_size(&qmp).await.expect("size"), size(1, 256));

        let grown = resize(&qmp, &config, size(3, 500)).await.expect("resize");
        // 244 MiB more, rounded up to two blocks.
        assert_eq!(grown, size(3, 512));
        assert_eq!(commands(&fake), ["qmp_capabilities", "object-add", "device_add", "device_add", "device_add"]);
        {
            let fake = fake.lock().expect("fake");
            let adds: Vec<&Value> = fake
                .seen
                .iter()
                .filter(|r| !r["execute"].as_str().unwrap_or_default().starts_with("query"))
                .map(|r| &r["arguments"])
                .collect();
            assert_eq!(
                adds[1],
                &json!({ "qom-type": "memory-backend-memfd", "id": "dimm0-mem", "size": 256 * MIB, "share": true })
            );
            assert_eq!(adds[2], &json!({ "driver": "pc-dimm", "id": "dimm0", "memdev": "dimm0-mem" }));
            assert_eq!(
                adds[3],
                &json!({ "driver": "max-x86_64-cpu", "id": "vcpu1", "core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0 })
            );
            assert_eq!(adds[4]["id"], "vcpu2");
            assert!(fake.seen.iter().any(|r| r["execute"] == "query-acpi-ospm-status"));
        }

        // A second growth takes the next DIMM id and the next CPU slot.
        assert_eq!(resize(&qmp, &config, size(4, 1024)).await.expect("resize"), size(4, 1024));
        let fake = fake.lock().expect("fake");
        assert_eq!(fake.dimms.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["dimm0", "dimm1"]);
    }

    #[tokio::test]
    async fn a_want_at_or_below_the_size_is_a_no_op_on_any_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Mutex::new(FakeQemu::new(2, 2, 512)));
        let qmp = serve(dir.path(), fake.clone()).await;
        let mut config = q35(2, 512, 0, 0);
        config.qemu.machine = MachineType::Microvm;
        for want in [size(2, 512), size(1, 128), size(0, 0)] {
            assert_eq!(resize(&qmp, &config, want).await.expect("no-op"), size(2, 512));
        }
        assert_eq!(commands(&fake), ["qmp_capabilities"], "nothing plugged");
    }

    #[tokio::test]
    async fn refusals_say_why_and_plug_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Mutex::new(FakeQemu::new(1, 4, 256)));
        let qmp = serve(dir.path(), fake.clone()).await;
        let mut microvm = q35(1, 256, 4, 1024);
        microvm.qemu.machine = MachineType::Microvm;
        let cases = [
            (microvm, size(2, 256), MICROVM_CANNOT_GROW.to_string()),
            (
                q35(1, 256, 4, 1024),
                size(5, 256),
                "5 vCPUs asked for, more than hypervisor.qemu.default_maxvcpus (4); the VM has 1".into(),
            ),
            (
                q35(1, 256, 4, 1024),
                size(1, 2048),
                "2048 MiB of memory asked for, more than hypervisor.qemu.default_maxmemory (1024 MiB); the VM has 256 MiB".into(),
            ),
            (q35(1, 256, 0, 1024), size(2, 256), "hypervisor.qemu.default_maxvcpus is 0".into()),
            (q35(1, 256, 4, 256), size(1, 512), "hypervisor.qemu.default_maxmemory is 256 MiB".into()),
            // Memory fits but CPUs do not: neither is plugged.
            (q35(1, 256, 4, 1024), size(8, 512), "default_maxvcpus (4)".into()),
        ];
        for (config, want, expected) in cases {
            let err = resize(&qmp, &config, want).await.expect_err("refused");
            assert!(matches!(err, Error::Resize { .. }), "{err:?}");
            assert!(err.to_string().starts_with("cannot grow the VM: "), "{err}");
            assert!(err.to_string().contains(&expected), "{err}\nexpected: {expected}");
        }
        assert_eq!(commands(&fake), ["qmp_capabilities"], "nothing plugged");
        assert!(!resize_allowed_when_paused(&qmp, &fake).await);
    }

    /// A paused guest cannot acknowledge: refused up front.
    async fn resize_allowed_when_paused(qmp: &QmpClient, fake: &Mutex<FakeQemu>) -> bool {
        fake.lock().expect("fake").status = "paused";
        let result = resize(qmp, &q35(1, 256, 4, 1024), size(2, 256)).await;
        fake.lock().expect("fake").status = "running";
        match result {
            Err(e) => {
                assert!(e.to_string().contains("it is paused"), "{e}");
                false
            }
            Ok(_) => true,
        }
    }

    #[tokio::test]
    async fn no_memory_slot_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Mutex::new(FakeQemu::new(1, 1, 256)));
        let qmp = serve(dir.path(), fake.clone()).await;
        let config = q35(1, 256, 0, 8192);
        for n in 1..=MEMORY_SLOTS {
            let want = size(1, 256 + n * MEMORY_BLOCK_MIB);
            assert_eq!(resize(&qmp, &config, want).await.expect("grows"), want);
        }
        let err = resize(&qmp, &config, size(1, 4096)).await.expect_err("no slot").to_string();
        assert!(err.contains("all 8 memory slots are taken"), "{err}");
    }

    #[tokio::test]
    async fn a_refused_dimm_leaves_no_backend_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Mutex::new(FakeQemu::new(1, 2, 256)));
        fake.lock().expect("fake").refuse_dimm = true;
        let qmp = serve(dir.path(), fake.clone()).await;
        let err = resize(&qmp, &q35(1, 256, 2, 1024), size(2, 512)).await.expect_err("refused").to_string();
        assert_eq!(err, "cannot grow the VM: QEMU refused another DIMM of 256 MiB: Property 'memdev' is busy");
        assert_eq!(commands(&fake), ["qmp_capabilities", "object-add", "device_add", "object-del"]);
        assert!(fake.lock().expect("fake").objects.is_empty());
    }

    #[tokio::test]
    async fn the_guest_failing_a_device_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Mutex::new(FakeQemu::new(1, 2, 256)));
        fake.lock().expect("fake").guest = Guest::Fails;
        let qmp = serve(dir.path(), fake.clone()).await;
        let err = resize(&qmp, &q35(1, 256, 2, 0), size(2, 256)).await.expect_err("guest failed").to_string();
        assert_eq!(
            err,
            "the guest did not take the hot-plugged vcpu1: the guest kernel failed to add vcpu1 (_OST status 0x81)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_guest_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(Mutex::new(FakeQemu::new(1, 2, 256)));
        fake.lock().expect("fake").guest = Guest::Silent;
        let qmp = serve(dir.path(), fake.clone()).await;
        let err = resize(&qmp, &q35(1, 256, 2, 1024), size(2, 384)).await.expect_err("silent guest").to_string();
        assert!(err.contains("no ACPI acknowledgement for dimm0, vcpu1 within 20s"), "{err}");
    }

    #[test]
    fn growth_follows_machine_and_maxima() {
        assert_eq!(Growth::of(&q35(1, 256, 4, 1024)), Growth { max_vcpus: Some(4), max_memory_mib: Some(1024) });
        assert_eq!(Growth::of(&q35(1, 256, 1, 200)), Growth { max_vcpus: None, max_memory_mib: None });
        assert_eq!(Growth::of(&q35(2, 256, 0, 257)).max_memory_mib, Some(384));
        let mut microvm = q35(1, 256, 4, 1024);
        microvm.qemu.machine = MachineType::Microvm;
        assert!(!Growth::of(&microvm).any());
    }
}
