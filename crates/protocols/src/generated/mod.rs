// @generated
#![cfg_attr(rustfmt, rustfmt::skip)]

pub mod agent;
pub mod agent_ttrpc;
