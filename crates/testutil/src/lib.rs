//! One way for a test to skip when the machine lacks a part it needs (root, QEMU, a guest kernel, containerd,
//! ...): it says why and returns. Under CI (`CI=true`), where every part is installed on purpose, a missing part
//! fails the test instead, so a broken set-up cannot pass as a row of skips.

use std::fmt::Display;

/// Reports that `test` cannot run because of `reason`: prints `SKIP {test}: {reason}` to stderr and returns, or,
/// under `CI=true`, panics. The caller then returns, or goes on without the part; [`skip_unless!`] does both.
#[track_caller]
pub fn skip(test: &str, reason: impl Display) {
    skip_given(std::env::var("CI").ok().as_deref(), test, &reason);
}

/// [`skip`] with the value of `CI` passed in, so both outcomes can be tested without touching the environment.
#[track_caller]
fn skip_given(ci: Option<&str>, test: &str, reason: &dyn Display) {
    if ci == Some("true") {
        panic!("{test}: cannot run: {reason} (CI=true: a missing part is a failure, not a skip)");
    }
    eprintln!("SKIP {test}: {reason}");
}

/// Returns from the calling test through [`skip`] when `$requirement` is not met. `$requirement` is either an
/// `Option` of the reason the test cannot run (`None`: it can), or a `Result` whose error is that reason, in
/// which case the macro evaluates to the `Ok` value. The test's name is the one `cargo test` shows.
///
/// ```no_run
/// fn needs_busybox() {
///     testutil::skip_unless!((!std::path::Path::new("/bin/busybox").exists()).then_some("busybox is missing"));
///     let kernel = testutil::skip_unless!(std::env::var("KATA_TEST_KERNEL").map_err(|_| "no kernel"));
/// }
/// ```
#[macro_export]
macro_rules! skip_unless {
    ($requirement:expr) => {
        match $crate::Requirement::met($requirement) {
            Ok(found) => found,
            Err(reason) => {
                fn here() {}
                $crate::skip($crate::test_name(::std::any::type_name_of_val(&here)), reason);
                return;
            }
        }
    };
}

/// What [`skip_unless!`] takes: `Option<reason>` or `Result<T, reason>`.
pub trait Requirement {
    /// What the test gets when the requirement is met: `()`, or the `Ok` value.
    type Found;
    /// The found value, or why the test cannot run.
    fn met(self) -> Result<Self::Found, String>;
}

impl<R: Display> Requirement for Option<R> {
    type Found = ();
    fn met(self) -> Result<(), String> {
        self.map_or(Ok(()), |reason| Err(reason.to_string()))
    }
}

impl<T, R: Display> Requirement for Result<T, R> {
    type Found = T;
    fn met(self) -> Result<T, String> {
        self.map_err(|reason| reason.to_string())
    }
}

/// The name `cargo test` shows for the test whose body declares the item of type name `here`:
/// `crate::module::test::{{closure}}::here` (the closure of an async test) becomes `module::test`.
#[doc(hidden)]
pub fn test_name(here: &'static str) -> &'static str {
    let mut path = here.strip_suffix("::here").unwrap_or(here);
    while let Some(outer) = path.strip_suffix("::{{closure}}") {
        path = outer;
    }
    path.split_once("::").map_or(path, |(_crate, in_crate)| in_crate)
}

/// The directory of the package under test, in the tree `cargo test` runs in: cargo's run-time
/// `CARGO_MANIFEST_DIR`. Not the compile-time one: a test binary built from another checkout of the same
/// tree (a shared target directory) would read that checkout's files, or fail where it no longer exists.
pub fn package_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .expect("CARGO_MANIFEST_DIR is not set: run the tests with cargo test")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "boot::t: cannot run: no kernel (CI=true: a missing part is a failure, not a skip)")]
    fn under_ci_a_missing_part_fails() {
        skip_given(Some("true"), "boot::t", &"no kernel");
    }

    #[test]
    fn outside_ci_a_missing_part_skips() {
        for ci in [None, Some(""), Some("false"), Some("1")] {
            skip_given(ci, "boot::t", &"no kernel");
        }
    }

    #[test]
    fn test_names_are_the_ones_cargo_shows() {
        assert_eq!(test_name("boot::microvm_boots::here"), "microvm_boots");
        assert_eq!(test_name("boot::microvm_boots::{{closure}}::here"), "microvm_boots");
        assert_eq!(test_name("e2e::image::tests::real_busybox::here"), "image::tests::real_busybox");
    }

    fn name_seen_by_the_macro() -> &'static str {
        fn here() {}
        test_name(std::any::type_name_of_val(&here))
    }

    #[test]
    fn the_macro_finds_the_enclosing_function() {
        assert_eq!(name_seen_by_the_macro(), "tests::name_seen_by_the_macro");
    }

    /// Records what it got past the macro in `ran`; `return` leaves it `None`.
    fn guarded<Q: Requirement<Found = u32>>(requirement: Q, ran: &mut Option<u32>) {
        let found = skip_unless!(requirement);
        *ran = Some(found);
    }

    fn guarded_by_reason(reason: Option<&str>, ran: &mut bool) {
        skip_unless!(reason);
        *ran = true;
    }

    #[test]
    fn the_macro_goes_on_when_the_requirement_is_met() {
        let mut ran = None;
        guarded(Ok::<u32, String>(7), &mut ran);
        assert_eq!(ran, Some(7));
        let mut ran = false;
        guarded_by_reason(None, &mut ran);
        assert!(ran);
    }

    /// Whether the macro skipped or failed depends on this process's `CI`, which the test reads but never sets.
    #[test]
    fn the_macro_returns_early_or_fails_under_ci() {
        let under_ci = std::env::var("CI").as_deref() == Ok("true");
        let mut ran = None;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guarded(Err("no kernel"), &mut ran)));
        assert_eq!(outcome.is_err(), under_ci, "panics exactly under CI=true");
        assert_eq!(ran, None, "the test body after the macro did not run");
        let mut ran = false;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guarded_by_reason(Some("x"), &mut ran)));
        assert_eq!(outcome.is_err(), under_ci, "panics exactly under CI=true");
        assert!(!ran, "the test body after the macro did not run");
    }
}
