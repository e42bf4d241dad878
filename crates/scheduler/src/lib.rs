//! Placeholder: the scheduler crate (issue 4).
