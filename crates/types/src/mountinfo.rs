//! The mount table as `/proc/<pid>/mountinfo` shows it (proc(5)), parsed once for the runtime, the agent,
//! `kata-runtime check` and the end-to-end tests' leak finder.
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)      (6)      (7)  (8) (9)    (10)         (11)
//! ```
//!
//! (7) is zero or more optional fields, ended by the single field `-` (8). The kernel writes space, tab,
//! newline and backslash in paths and names as octal escapes (`\040`, `\011`, `\012`, `\134`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// The mount table of the calling process.
pub const SELF_MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo. Paths and names are unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The directory of the filesystem that forms the root of this mount (`/` unless a bind mount).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,relatime`).
    pub options: String,
    pub fs_type: String,
    /// The filesystem's source (`/dev/vda1`, `overlay`, `none`).
    pub source: String,
    /// Per-superblock options (`rw,lowerdir=...`).
    pub super_options: String,
}

/// Every well-formed line of a mountinfo text, in order (mount order: a later mount over the same point
/// hides an earlier one). Malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

/// Reads and parses [`SELF_MOUNTINFO`].
pub fn read_self() -> std::io::Result<Vec<MountInfo>> {
    std::fs::read_to_string(SELF_MOUNTINFO).map(|text| parse(&text))
}

/// One mountinfo line, or `None` when it is malformed.
pub fn parse_line(line: &str) -> Option<MountInfo> {
    let mut fields = line.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let _major_minor = fields.next()?;
    let root = fields.next()?;
    let mount_point = fields.next()?;
    let options = fields.next()?;
    // Optional fields (`shared:1`, `master:2`, ...) until the separator.
    fields.by_ref().find(|f| *f == "-")?;
    let fs_type = fields.next()?;
    let source = fields.next()?;
    let super_options = fields.next()?;
    if [root, mount_point, fs_type].iter().any(|f| f.is_empty()) {
        return None;
    }
    Some(MountInfo {
        mount_id,
        parent_id,
        root: unescape_path(root),
        mount_point: unescape_path(mount_point),
        options: options.to_owned(),
        fs_type: unescape(fs_type),
        source: unescape(source),
        super_options: unescape(super_options),
    })
}

/// A field with its `\ooo` octal escapes decoded; bytes that are not UTF-8 are replaced.
pub fn unescape(field: &str) -> String {
    String::from_utf8_lossy(&unescape_bytes(field)).into_owned()
}

/// A path field decoded byte for byte: a path need not be UTF-8.
fn unescape_path(field: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape_bytes(field)))
}

fn unescape_bytes(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|d| (b'0'..=b'7').contains(d)));
        let value = octal.and_then(|d| u8::try_from(d.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'))).ok());
        match (b, value) {
            (b'\\', Some(value)) => {
                out.push(value);
                i += 4;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_line_with_optional_fields_is_parsed() {
        let line = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue";
        assert_eq!(
            parse_line(line),
            Some(MountInfo {
                mount_id: 36,
                parent_id: 35,
                root: PathBuf::from("/mnt1"),
                mount_point: PathBuf::from("/mnt2"),
                options: "rw,noatime".to_owned(),
                fs_type: "ext3".to_owned(),
                source: "/dev/root".to_owned(),
                super_options: "rw,errors=continue".to_owned(),
            })
        );
    }

    #[test]
    fn a_line_without_optional_fields_is_parsed() {
        let m = parse_line("22 1 0:21 / /proc rw,nosuid - proc proc rw").unwrap();
        assert_eq!((m.mount_point, m.fs_type, m.source), (PathBuf::from("/proc"), "proc".into(), "proc".into()));
    }

    #[test]
    fn escapes_are_decoded() {
        let line =
            "36 35 98:0 /a\\134b /mnt/with\\040space\\011tab\\012nl rw - overlay my\\040src rw,lowerdir=/x\\040y";
        let m = parse_line(line).unwrap();
        assert_eq!(m.root, PathBuf::from("/a\\b"));
        assert_eq!(m.mount_point, PathBuf::from("/mnt/with space\ttab\nnl"));
        assert_eq!(m.source, "my src");
        assert_eq!(m.super_options, "rw,lowerdir=/x y");
    }

    #[test]
    fn a_backslash_that_is_not_an_escape_is_kept() {
        assert_eq!(unescape("a\\b\\04"), "a\\b\\04");
        assert_eq!(unescape("\\777"), "\\777", "beyond a byte");
    }

    #[test]
    fn a_path_that_is_not_utf8_is_kept_byte_for_byte() {
        let m = parse_line("1 0 0:1 / /mnt/\\377 rw - tmpfs tmpfs rw").unwrap();
        assert_eq!(m.mount_point, PathBuf::from(OsString::from_vec(b"/mnt/\xff".to_vec())));
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let text = "\n\
            garbage\n\
            x 1 0:1 / / rw - ext4 /dev/vda rw\n\
            1 0 0:1 / / rw ext4 /dev/vda rw\n\
            1 0 0:1 / / rw - ext4 /dev/vda\n\
            2 1 0:2 / /ok rw - tmpfs tmpfs rw\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        assert_eq!(mounts[0].mount_point, PathBuf::from("/ok"));
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let mounts = read_self().unwrap();
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")), "{mounts:?}");
    }
}
