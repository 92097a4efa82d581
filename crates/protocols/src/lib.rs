//! protocols crate (work in progress).
