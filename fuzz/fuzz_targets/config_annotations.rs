//! Configuration files and pod annotations: `LoadedConfig::from_sources`, `apply_annotations`, `validate`.
//!
//! Input: `<configuration text> NUL <annotation bytes>`. The text picks the sources:
//! - empty: the shipped configuration alone, so the fuzzed annotations meet the real allow-lists;
//! - starting with `#drop-in`: the shipped configuration plus the text as a drop-in;
//! - anything else: the text alone.
//!
//! The annotation bytes are decoded with `arbitrary`: names are mostly drawn from the real annotation names (and
//! Kata's names kata-rs must refuse), so the fuzzer does not have to guess them; a flag adds a drop-in that opens
//! every gate, so values reach type parsing and the binary allow-lists.
//!
//! Another flag gives the host's memory and CPU count (`apply_annotations_with`) instead of this host's
//! (`apply_annotations`), so the bounds are reached from both sides.
//!
//! Besides "never panics", it checks what the annotation code promises: a refused set changes nothing; the
//! allow-lists and QEMU's sandbox never change through annotations; an annotated binary stays inside its glob;
//! annotated sizes and the dial timeout stay within their bounds; and with the shipped configuration alone, only
//! the annotations it enables take effect.

#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use types::config::{
    HostLimits, LoadedConfig, Origin, ANNOTATION_PREFIX, DEFAULT_CONFIGURATION, MAX_ANNOTATED_DIAL_TIMEOUT_SECS,
    MIN_MEMORY_MIB,
};

/// Names after `io.katacontainers.config.`: the ones kata-rs honours, then Kata's that it must refuse
/// (allow-lists, keys kata-rs ignores, sections without annotations).
const NAMES: &[&str] = &[
    "hypervisor.path",
    "hypervisor.kernel",
    "hypervisor.initrd",
    "hypervisor.image",
    "hypervisor.machine_type",
    "hypervisor.kernel_params",
    "hypervisor.default_vcpus",
    "hypervisor.default_max_vcpus",
    "hypervisor.default_memory",
    "hypervisor.shared_fs",
    "hypervisor.virtio_fs_daemon",
    "hypervisor.virtio_fs_extra_args",
    "hypervisor.vsock_daemon",
    "agent.debug",
    "agent.dial_timeout",
    "runtime.enable_debug",
    "runtime.experimental",
    "runtime.internetworking_model",
    "runtime.sandbox_cgroup_only",
    "hypervisor.enable_annotations",
    "hypervisor.valid_hypervisor_paths",
    "hypervisor.valid_virtio_fs_daemon_paths",
    "hypervisor.valid_vsock_daemon_paths",
    "hypervisor.default_maxmemory",
    "hypervisor.tcg_tb_size",
    "hypervisor.accel",
    "hypervisor.seccompsandbox",
    "agent.kernel_modules",
    "runtime.disable_guest_seccomp",
    "factory.enable_template",
    "factory.template_path",
];

/// Values the schema gives meaning to.
const WORDS: &[&str] = &[
    "true",
    "false",
    " true ",
    "0",
    "1",
    "2",
    "63",
    "64",
    "120",
    "121",
    "-1",
    "4294967296",
    "18446744073709551616",
    "virtio-fs",
    "virtio-9p",
    "tcfilter",
    "macvtap",
    "none",
    "microvm",
    "q35",
    "kvm",
    "tcg",
    "auto",
    "",
];

/// Binaries an open configuration allows: an annotated binary must stay a direct child of this directory.
const OPEN_DIR: &str = "/opt/fuzz/";

/// Opens every gate. Later sources override earlier ones key by key.
const OPEN_DROP_IN: &str = r#"
[hypervisor.qemu]
enable_annotations = [".*"]
valid_hypervisor_paths = ["/opt/fuzz/*"]
valid_virtio_fs_daemon_paths = ["/opt/fuzz/*"]
valid_vsock_daemon_paths = ["/opt/fuzz/*"]
"#;

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Prefixed(String),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Int(i64),
    Uint(u64),
    Word(u8),
    /// Under the open allow-list: the part after [`OPEN_DIR`] is fuzzed (`..`, `/`, globs...).
    OpenPath(String),
    List {
        json: bool,
        items: Vec<String>,
    },
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct Annotations {
    open: bool,
    /// `(memory_mib, cpus)` of a made-up host; `None`: this host, through `apply_annotations`.
    host: Option<(u64, u32)>,
    items: Vec<(Name, Value)>,
}

/// The keys the shipped configuration's `enable_annotations` opens.
const SHIPPED_ANNOTATABLE: &[&str] =
    &["hypervisor.qemu.kernel_params", "hypervisor.qemu.default_memory", "hypervisor.qemu.default_vcpus"];

fn this_host() -> HostLimits {
    static HOST: OnceLock<HostLimits> = OnceLock::new();
    *HOST.get_or_init(|| HostLimits::detect().expect("this host's memory and CPUs"))
}

fn annotated(loaded: &LoadedConfig, key: &str) -> bool {
    matches!(loaded.origin(key), Origin::Annotation { .. })
}

/// What `check_annotated_limits` promises for the values annotations set.
fn assert_bounded(loaded: &LoadedConfig, host: &HostLimits) {
    let hv = &loaded.config.hypervisor;
    let max = |configured: u32, host: u64| if configured == 0 { host } else { host.min(u64::from(configured)) };
    if annotated(loaded, "hypervisor.qemu.default_memory") {
        let v = hv.default_memory;
        assert!(
            v >= MIN_MEMORY_MIB && u64::from(v) <= max(hv.default_maxmemory, host.memory_mib),
            "default_memory {v} accepted, {host:?}"
        );
    }
    if annotated(loaded, "hypervisor.qemu.default_vcpus") {
        let v = hv.default_vcpus;
        assert!(
            v >= 1 && u64::from(v) <= max(hv.default_maxvcpus, u64::from(host.cpus)),
            "default_vcpus {v} accepted, {host:?}"
        );
    }
    if annotated(loaded, "hypervisor.qemu.default_maxvcpus") {
        assert!(hv.default_maxvcpus <= host.cpus, "default_maxvcpus {} accepted, {host:?}", hv.default_maxvcpus);
    }
    if annotated(loaded, "agent.kata.dial_timeout") {
        let v = loaded.config.agent.dial_timeout;
        assert!((1..=MAX_ANNOTATED_DIAL_TIMEOUT_SECS).contains(&v), "dial_timeout {v} accepted");
    }
}

fn name(n: &Name) -> String {
    match n {
        Name::Known(i) => format!("{ANNOTATION_PREFIX}{}", NAMES[usize::from(*i) % NAMES.len()]),
        Name::Prefixed(s) => format!("{ANNOTATION_PREFIX}{s}"),
        Name::Raw(s) => s.clone(),
    }
}

fn value(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::Uint(u) => u.to_string(),
        Value::Word(i) => WORDS[usize::from(*i) % WORDS.len()].to_owned(),
        Value::OpenPath(rest) => format!("{OPEN_DIR}{rest}"),
        Value::List { json: true, items } => serde_json::to_string(items).unwrap_or_default(),
        Value::List { json: false, items } => items.join(" "),
        Value::Text(s) => s.clone(),
    }
}

/// An annotated binary (one that differs from what the files set) must be a direct child of [`OPEN_DIR`] when the
/// open drop-in is the only allow-list; `.` may follow (it names the directory itself, not a way out).
fn assert_inside_open_dir(key: &str, before: &str, after: &str) {
    if before == after {
        return;
    }
    let rest = after.strip_prefix(OPEN_DIR);
    assert!(
        rest.is_some_and(|r| !r.contains('/') && r != ".."),
        "{key}: annotation set {after:?}, outside the allow-list {OPEN_DIR}*"
    );
}

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    // Files are read with `read_to_string`: text that is not UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Ok(annotations) = Annotations::arbitrary_take_rest(Unstructured::new(rest)) else { return };

    let shipped_alone = text.is_empty() && !annotations.open;
    let mut sources = Vec::new();
    if text.is_empty() || text.starts_with("#drop-in") {
        sources.push((PathBuf::from("configuration.toml"), DEFAULT_CONFIGURATION.to_owned()));
    }
    if !text.is_empty() {
        let path = if sources.is_empty() { "c.toml" } else { "config.d/50-fuzz.toml" };
        sources.push((PathBuf::from(path), text.to_owned()));
    }
    if annotations.open {
        sources.push((PathBuf::from("config.d/99-open.toml"), OPEN_DROP_IN.to_owned()));
    }

    let mut loaded = match LoadedConfig::from_sources(&sources) {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = loaded.validate().map_err(|e| e.to_string());
    let _ = loaded.settings();

    let map: BTreeMap<String, String> = annotations.items.iter().map(|(n, v)| (name(n), value(v))).collect();
    let before = loaded.clone();
    let host = match annotations.host {
        Some((memory_mib, cpus)) => HostLimits { memory_mib, cpus },
        None => this_host(),
    };
    let applied = match annotations.host {
        Some(_) => loaded.apply_annotations_with(&map, &host),
        None => loaded.apply_annotations(&map),
    };
    match applied {
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(loaded, before, "a refused annotation set changed the configuration");
        }
        Ok(()) => {
            let (b, a) = (&before.config.hypervisor, &loaded.config.hypervisor);
            assert_eq!(a.enable_annotations, b.enable_annotations, "an annotation changed enable_annotations");
            assert_eq!(a.valid_hypervisor_paths, b.valid_hypervisor_paths, "an annotation changed an allow-list");
            assert_eq!(
                a.valid_virtio_fs_daemon_paths, b.valid_virtio_fs_daemon_paths,
                "an annotation changed an allow-list"
            );
            assert_eq!(a.valid_vsock_daemon_paths, b.valid_vsock_daemon_paths, "an annotation changed an allow-list");
            assert_eq!(a.seccompsandbox, b.seccompsandbox, "an annotation changed QEMU's sandbox");
            assert_bounded(&loaded, &host);
            if shipped_alone {
                for (key, origin) in &loaded.origins {
                    if matches!(origin, Origin::Annotation { .. }) {
                        assert!(
                            SHIPPED_ANNOTATABLE.contains(&key.as_str()),
                            "{key} annotated under the shipped configuration"
                        );
                    }
                }
            }
            if annotations.open {
                assert_inside_open_dir("hypervisor.qemu.path", &b.path, &a.path);
                assert_inside_open_dir("hypervisor.qemu.virtio_fs_daemon", &b.virtio_fs_daemon, &a.virtio_fs_daemon);
                assert_inside_open_dir("hypervisor.qemu.vsock_daemon", &b.vsock_daemon, &a.vsock_daemon);
            }
            let _ = loaded.validate().map_err(|e| e.to_string());
            let _ = loaded.settings();
            let _ = loaded.vm_annotated();
        }
    }
});
