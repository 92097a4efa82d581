//! Dependencies point one way (README, "Workspace"): every workspace crate's dependencies on other workspace
//! crates (normal, dev and build) are checked against [`LAYERS`], as `cargo metadata` reports them.

use std::process::Command;

/// A workspace crate (its package name), its rank (lowest first) and the workspace crates it may use.
struct Layer {
    name: &'static str,
    rank: u8,
    /// `None`: anything. A list only names crates of lower rank (checked below).
    may_use: Option<&'static [&'static str]>,
}

const LAYERS: &[Layer] = &[
    Layer { name: "types", rank: 0, may_use: Some(&[]) },
    Layer { name: "protocols", rank: 0, may_use: Some(&[]) },
    Layer { name: "testutil", rank: 0, may_use: Some(&[]) },
    // A VMM crate knows nothing of the agent or its protocol.
    Layer { name: "hypervisor", rank: 1, may_use: Some(&["types"]) },
    // The guest agent shares only the protocol and the types with the host.
    Layer { name: "kata-agent", rank: 1, may_use: Some(&["protocols", "types"]) },
    Layer { name: "runtime", rank: 2, may_use: Some(&["hypervisor", "types", "protocols"]) },
    // The shim reaches the VM only through runtime.
    Layer { name: "containerd-shim-kata-v2", rank: 3, may_use: Some(&["runtime", "types"]) },
    // Like the shim: VMs only through runtime.
    Layer { name: "kata-runtime", rank: 3, may_use: Some(&["runtime", "types"]) },
    Layer { name: "e2e", rank: 4, may_use: None },
    Layer { name: "bench", rank: 4, may_use: None },
];

/// Any crate may take this one as a dev-dependency.
const TEST_SUPPORT: &str = "testutil";

/// Edges that break the rules today: (crate, dependency). Each goes with the change that fixes it, and the test
/// fails while a listed edge is gone, so the list cannot outlive the fix.
const KNOWN_VIOLATIONS: &[(&str, &str)] = &[];

/// One dependency of a workspace crate on another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edge {
    from: String,
    to: String,
    /// "normal", "dev" or "build".
    kind: String,
}

fn layer(name: &str) -> Option<&'static Layer> {
    LAYERS.iter().find(|l| l.name == name)
}

/// The workspace's crates and their dependencies on each other, from `cargo metadata`.
fn workspace() -> (Vec<String>, Vec<Edge>) {
    let root = testutil::package_dir().join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let names: Vec<String> = packages.iter().map(|p| p["name"].as_str().expect("package name").to_string()).collect();
    let mut edges = Vec::new();
    for package in packages {
        for dep in package["dependencies"].as_array().expect("dependencies") {
            let to = dep["name"].as_str().expect("dependency name");
            // A path dependency on a workspace crate; a registry crate may share a name with one.
            if dep["path"].is_string() && names.iter().any(|n| n == to) {
                edges.push(Edge {
                    from: package["name"].as_str().expect("package name").to_string(),
                    to: to.to_string(),
                    kind: dep["kind"].as_str().unwrap_or("normal").to_string(),
                });
            }
        }
    }
    (names, edges)
}

/// What is wrong with `edge`, naming the crate, the dependency and the rule; `None` when it is allowed.
fn violation(edge: &Edge) -> Option<String> {
    let Edge { from, to, kind } = edge;
    if to == TEST_SUPPORT && kind == "dev" {
        return None;
    }
    let (Some(user), Some(used)) = (layer(from), layer(to)) else {
        return Some(format!("{from} -> {to} ({kind}): a crate without a layer; add it to LAYERS"));
    };
    match user.may_use {
        None => None,
        Some(allowed) if allowed.contains(&used.name) => None,
        Some(allowed) => Some(format!(
            "{from} (rank {}) depends on {to} (rank {}, {kind} dependency), but may use only [{}]{}",
            user.rank,
            used.rank,
            allowed.join(", "),
            if to == TEST_SUPPORT { ", and testutil only as a dev-dependency" } else { "" },
        )),
    }
}

#[test]
fn every_workspace_crate_has_a_layer() {
    let (names, _) = workspace();
    let missing: Vec<&String> = names.iter().filter(|n| layer(n).is_none()).collect();
    assert!(missing.is_empty(), "workspace crates missing from LAYERS: {missing:?}");
    let stale: Vec<&str> = LAYERS.iter().map(|l| l.name).filter(|l| !names.iter().any(|n| n == l)).collect();
    assert!(stale.is_empty(), "LAYERS names crates the workspace does not have: {stale:?}");
}

#[test]
fn layers_only_allow_lower_ranks() {
    for user in LAYERS {
        for used in user.may_use.unwrap_or_default() {
            let rank = layer(used).map(|l| l.rank);
            assert!(
                rank.is_some_and(|r| r < user.rank),
                "{} (rank {}) may use {used} (rank {rank:?}): only lower ranks",
                user.name,
                user.rank
            );
        }
    }
}

#[test]
fn dependencies_point_down() {
    let (_, edges) = workspace();
    let mut known = Vec::new();
    let mut problems = Vec::new();
    for edge in &edges {
        let Some(problem) = violation(edge) else { continue };
        if KNOWN_VIOLATIONS.contains(&(edge.from.as_str(), edge.to.as_str())) {
            known.push((edge.from.as_str(), edge.to.as_str()));
        } else {
            problems.push(problem);
        }
    }
    for (from, to) in KNOWN_VIOLATIONS.iter().filter(|k| !known.contains(k)) {
        problems.push(format!("{from} no longer depends on {to} against the rules: remove it from KNOWN_VIOLATIONS"));
    }
    assert!(problems.is_empty(), "dependencies against the layering:\n{}", problems.join("\n"));
}

#[test]
fn the_rules_catch_what_they_should() {
    let edge = |from: &str, to: &str, kind: &str| Edge { from: from.into(), to: to.into(), kind: kind.into() };
    let allowed = [
        edge("runtime", "hypervisor", "normal"),
        edge("hypervisor", "testutil", "dev"),
        edge("e2e", "testutil", "normal"),
        edge("bench", "e2e", "normal"),
        edge("kata-runtime", "runtime", "normal"),
    ];
    for e in &allowed {
        assert_eq!(violation(e), None, "{e:?}");
    }
    let refused = [
        (edge("containerd-shim-kata-v2", "hypervisor", "normal"), "may use only [runtime, types]"),
        (edge("kata-runtime", "hypervisor", "normal"), "may use only [runtime, types]"),
        (edge("hypervisor", "runtime", "dev"), "hypervisor (rank 1) depends on runtime (rank 2, dev dependency)"),
        (edge("hypervisor", "protocols", "normal"), "may use only [types]"),
        (edge("kata-agent", "runtime", "build"), "may use only [protocols, types]"),
        (edge("runtime", "testutil", "normal"), "testutil only as a dev-dependency"),
        (edge("types", "newcomer", "normal"), "add it to LAYERS"),
    ];
    for (e, expected) in &refused {
        let problem = violation(e).unwrap_or_default();
        assert!(problem.contains(expected), "{e:?}: {problem:?}");
    }
}
