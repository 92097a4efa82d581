//! types crate (work in progress).
