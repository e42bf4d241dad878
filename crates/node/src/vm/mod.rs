//! Micro-VM instances (issue 11).

pub mod passthrough;
pub mod qcow2;
pub mod seed;
pub mod template;
