//! Micro-VM instances (issue 11).

pub mod passthrough;
pub mod seed;
pub mod template;
