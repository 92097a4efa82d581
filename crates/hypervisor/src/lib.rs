//! hypervisor crate (work in progress).
