//! Micro-VM instances (issue 11).

pub mod seed;
pub mod template;
