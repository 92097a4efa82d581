//! OCI `linux.cgroupsPath` in both of its spellings, turned into a plain path below a hierarchy root.

use std::io::{Error, ErrorKind, Result};
use std::path::{Component, Path, PathBuf};

/// The path below a hierarchy root; `..`, `.` and empty paths are refused rather than resolved.
pub fn relative(path: &str) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(part) => rel.push(part),
            _ => return Err(invalid(format!("cgroup path {path:.200?} is not plain"))),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(invalid("the cgroup path is empty".to_string()));
    }
    Ok(rel)
}

/// A cgroupfs path (`/kubepods/pod1/abc`) as it is, or systemd's `slice:prefix:name`
/// (`kubepods-pod1.slice:cri-containerd:abc`) as the directories systemd makes for it
/// (`kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope`).
pub fn parse_cgroups_path(path: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = path.split(':').collect();
    match parts.as_slice() {
        [_] => relative(path),
        [slice, prefix, name] => {
            let plain = |s: &str| !s.contains('/') && s != "." && s != "..";
            if !plain(slice) || !plain(prefix) || !plain(name) || name.is_empty() {
                return Err(invalid(format!("systemd cgroup path {path:.200?} is not slice:prefix:name")));
            }
            let mut rel = expand_slice(slice)?;
            rel.push(match prefix.is_empty() {
                true => format!("{name}.scope"),
                false => format!("{prefix}-{name}.scope"),
            });
            Ok(rel)
        }
        _ => Err(invalid(format!("cgroup path {path:.200?} is neither a path nor slice:prefix:name"))),
    }
}

/// `a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice`; `` and `-.slice` are the root slice.
fn expand_slice(slice: &str) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    if slice.is_empty() || slice == "-.slice" {
        return Ok(rel);
    }
    let bad = || invalid(format!("systemd slice {slice:.200?} is not a valid slice name"));
    let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(bad());
    }
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        rel.push(format!("{prefix}.slice"));
    }
    Ok(rel)
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_must_be_plain() {
        assert_eq!(relative("/pods/p1").unwrap(), PathBuf::from("pods/p1"));
        assert_eq!(relative("pods/p1").unwrap(), PathBuf::from("pods/p1"));
        for bad in ["/pods/../../etc", "", "/", "./x", "a/../b"] {
            assert!(parse_cgroups_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn systemd_paths_expand_like_systemd() {
        let rel = parse_cgroups_path("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap();
        assert_eq!(
            rel,
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(parse_cgroups_path(":kata:x").unwrap(), PathBuf::from("kata-x.scope"));
        assert_eq!(parse_cgroups_path("-.slice::x").unwrap(), PathBuf::from("x.scope"));
        for bad in ["a.slice:p:", "a:p:x", "-a.slice:p:x", "a--b.slice:p:x", "a.slice:../..:x", "a.slice:p:x/..", "a:b"]
        {
            assert!(parse_cgroups_path(bad).is_err(), "{bad:?}");
        }
    }
}
