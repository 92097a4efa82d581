//! One configuration file -> flat list of (dotted key, value, line), before any policy.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::keys::TOP_SECTIONS;
use super::ConfigError;

/// A value as written in one file.
#[derive(Debug, Clone)]
pub(crate) struct RawEntry {
    /// Dotted key as written (aliases not yet resolved).
    pub key: String,
    pub value: toml::Value,
    /// 1-based line of the value.
    pub line: usize,
}

type RawSection = BTreeMap<String, Spanned<toml::Value>>;

/// The document with a span on every key we may need to report. Sections are read with the
/// shape `TOP_SECTIONS` gives them, so values inside keep their own spans.
#[derive(Default)]
struct RawDoc {
    nested: Vec<(String, BTreeMap<String, Spanned<RawSection>>)>,
    flat: Vec<(String, RawSection)>,
    other: Vec<(String, Spanned<toml::Value>)>,
}

impl<'de> Deserialize<'de> for RawDoc {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RawDocVisitor)
    }
}

struct RawDocVisitor;

impl<'de> Visitor<'de> for RawDocVisitor {
    type Value = RawDoc;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a configuration table")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawDoc, A::Error> {
        let mut doc = RawDoc::default();
        while let Some(name) = map.next_key::<String>()? {
            match TOP_SECTIONS.iter().find(|(section, _)| *section == name) {
                Some((_, true)) => doc.nested.push((name, map.next_value()?)),
                Some((_, false)) => doc.flat.push((name, map.next_value()?)),
                None => doc.other.push((name, map.next_value()?)),
            }
        }
        Ok(doc)
    }
}

/// 1-based line of byte offset `offset` in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
}

/// Parses `text` (the contents of `path`) into entries in file order.
pub(crate) fn parse_file(path: &Path, text: &str) -> Result<Vec<RawEntry>, ConfigError> {
    let doc: RawDoc = toml::from_str(text).map_err(|err| ConfigError::Syntax {
        path: path.to_owned(),
        line: err.span().map(|span| line_of(text, span.start)),
        message: err.message().trim().replace('\n', ", "),
    })?;
    let entry = |key: String, value: Spanned<toml::Value>| RawEntry {
        key,
        line: line_of(text, value.span().start),
        value: value.into_inner(),
    };
    let mut entries = Vec::new();
    for (section, tables) in doc.nested {
        for (name, table) in tables {
            let line = line_of(text, table.span().start);
            let supported = match section.as_str() {
                "hypervisor" => Some(("qemu", "only qemu is supported")),
                "agent" => Some(("kata", "only the kata agent is supported")),
                _ => None,
            };
            if let Some((only, reason)) = supported {
                if name != only {
                    return Err(ConfigError::UnsupportedSection {
                        path: path.to_owned(),
                        line,
                        section: format!("{section}.{name}"),
                        reason,
                    });
                }
            }
            for (key, value) in table.into_inner() {
                entries.push(entry(format!("{section}.{name}.{key}"), value));
            }
        }
    }
    for (section, table) in doc.flat {
        for (key, value) in table {
            entries.push(entry(format!("{section}.{key}"), value));
        }
    }
    for (key, value) in doc.other {
        entries.push(entry(key, value));
    }
    entries.sort_by_key(|e| e.line);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_sections_with_lines() {
        let text = "[hypervisor.qemu]\npath = \"/q\"\n\n[runtime]\nexperimental = [\n  \"a\",\n]\n\
                    [netmon]\nenable = true\n";
        let entries = parse_file(Path::new("c.toml"), text).expect("valid");
        let got: Vec<(&str, usize)> = entries.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(got, [("hypervisor.qemu.path", 2), ("runtime.experimental", 5), ("netmon.enable", 9)]);
    }

    #[test]
    fn other_hypervisors_are_refused() {
        let err =
            parse_file(Path::new("c.toml"), "[hypervisor.qemu]\n[hypervisor.clh]\npath = \"x\"\n").expect_err("clh");
        assert_eq!(err.to_string(), "c.toml:2: [hypervisor.clh]: only qemu is supported");
    }
}
