//! Syntax of `hypervisor.qemu.seccompsandbox`: QEMU's `-sandbox` option as QEMU parses it
//! (`system/qemu-seccomp.c`), so a typo is a load error with file and line rather than a QEMU that
//! refuses to start for every pod.

/// `-sandbox` sub-options and the values QEMU accepts for each.
const OPTIONS: &[(&str, &[&str])] = &[
    ("obsolete", &["allow", "deny"]),
    ("elevateprivileges", &["allow", "deny", "children"]),
    ("spawn", &["allow", "deny"]),
    ("resourcecontrol", &["allow", "deny"]),
];

/// Checks `value`: empty (no sandbox), or `on`/`off` followed by `,option=value` items, each
/// option at most once.
pub(crate) fn check(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    let mut items = value.split(',');
    if !matches!(items.next(), Some("on" | "off")) {
        return Err(format!("{value:?} must start with on or off"));
    }
    let mut seen = Vec::new();
    for item in items {
        let (name, setting) = item.split_once('=').unwrap_or((item, ""));
        let Some((_, allowed)) = OPTIONS.iter().find(|(option, _)| *option == name) else {
            let names: Vec<&str> = OPTIONS.iter().map(|(option, _)| *option).collect();
            return Err(format!("{value:?}: {name:?} is not a -sandbox option ({})", names.join(", ")));
        };
        if !allowed.contains(&setting) {
            return Err(format!("{value:?}: {name} must be {}", one_of(allowed)));
        }
        if seen.contains(&name) {
            return Err(format!("{value:?}: {name} is given twice"));
        }
        seen.push(name);
    }
    Ok(())
}

/// `a, b or c`.
fn one_of(words: &[&str]) -> String {
    match words.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::DEFAULT_SECCOMP_SANDBOX;

    #[test]
    fn accepts_what_qemu_accepts() {
        for ok in [
            "",
            "on",
            "off",
            DEFAULT_SECCOMP_SANDBOX,
            "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
            "on,elevateprivileges=children",
            "on,obsolete=allow,elevateprivileges=allow,spawn=allow,resourcecontrol=allow",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_the_rest_with_the_reason() {
        let cases = [
            ("deny", "\"deny\" must start with on or off"),
            (" on", "\" on\" must start with on or off"),
            ("spawn=deny", "\"spawn=deny\" must start with on or off"),
            (
                "on,fork=deny",
                "\"on,fork=deny\": \"fork\" is not a -sandbox option \
                 (obsolete, elevateprivileges, spawn, resourcecontrol)",
            ),
            (
                "on,",
                "\"on,\": \"\" is not a -sandbox option \
                 (obsolete, elevateprivileges, spawn, resourcecontrol)",
            ),
            ("on,spawn=children", "\"on,spawn=children\": spawn must be allow or deny"),
            ("on,spawn", "\"on,spawn\": spawn must be allow or deny"),
            (
                "on,elevateprivileges=no",
                "\"on,elevateprivileges=no\": elevateprivileges must be allow, deny or children",
            ),
            ("on,spawn=deny,spawn=allow", "\"on,spawn=deny,spawn=allow\": spawn is given twice"),
        ];
        for (value, message) in cases {
            assert_eq!(check(value), Err(message.to_owned()), "{value}");
        }
    }
}
