//! Provenance of effective settings, printed by `kata-runtime env`.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Origin {
    /// Built-in default (Kata's, unless documented otherwise).
    Default,
    /// A configuration file or drop-in, at the line of the value.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A pod or container annotation.
    Annotation {
        /// Full annotation name, e.g. `io.katacontainers.config.hypervisor.default_memory`.
        name: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("(default)"),
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Annotation { name } => write!(f, "annotation {name}"),
        }
    }
}

/// One effective setting: dotted TOML key, value and origin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setting {
    /// Dotted key, e.g. `hypervisor.qemu.kernel`.
    pub key: String,
    /// The effective value as JSON (strings, numbers, booleans, arrays of strings).
    pub value: serde_json::Value,
    /// Where the value came from.
    pub origin: Origin,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_and_serializes() {
        let file = Origin::File { path: "/etc/k.toml".into(), line: 7 };
        assert_eq!(file.to_string(), "/etc/k.toml:7");
        assert_eq!(Origin::Default.to_string(), "(default)");
        let json = serde_json::to_string(&file).expect("serializable");
        assert_eq!(json, r#"{"source":"file","path":"/etc/k.toml","line":7}"#);
        let json = serde_json::to_string(&Origin::Default).expect("serializable");
        assert_eq!(json, r#"{"source":"default"}"#);
    }
}
