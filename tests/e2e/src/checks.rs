//! How long tests run many checks against one expensive fixture (a pod VM): soft assertions that are all
//! reported at the end ([`Checks`]), timed steps ([`step`]) and waiting for an eventual state ([`poll`]).

use std::time::{Duration, Instant};

/// Soft assertions: every check of a shared fixture runs and all failures are reported together, so one
/// broken feature does not hide the state of the others (or skip the teardown checks).
#[derive(Debug, Default)]
pub struct Checks {
    passed: Vec<&'static str>,
    failed: Vec<String>,
}

impl Checks {
    /// Records check `name`; `detail` says what was seen when it fails.
    pub fn check(&mut self, name: &'static str, ok: bool, detail: impl FnOnce() -> String) {
        if ok {
            eprintln!("PASS {name}");
            self.passed.push(name);
        } else {
            let detail = detail();
            eprintln!("FAIL {name}: {detail}");
            self.failed.push(format!("{name}: {detail}"));
        }
    }

    /// Panics listing every failed check, if any.
    pub fn finish(self) {
        eprintln!("{} checks passed, {} failed", self.passed.len(), self.failed.len());
        assert!(self.failed.is_empty(), "failed checks:\n{}", self.failed.join("\n"));
    }
}

/// Runs `f` and prints how long `what` took.
pub fn step<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = f();
    eprintln!("{what}: {:?}", started.elapsed());
    value
}

/// Polls `f` every 200 ms until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops `containerd` (the test's pods removed and its CRI client dropped before) and checks that it
/// had nothing left to kill or clean up.
pub fn check_clean_stop(containerd: crate::Containerd, checks: &mut Checks) {
    let report = step("containerd stopped", || containerd.stop());
    checks.check(
        "containerd shut down with nothing to clean",
        report.killed_processes.is_empty() && report.remaining.is_empty(),
        || format!("{report:?}"),
    );
}

/// A failure message must show the cause (e.g. the gRPC status behind a CRI call).
pub use protocols::error_chain;
