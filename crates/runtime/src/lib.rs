//! runtime crate (work in progress).
