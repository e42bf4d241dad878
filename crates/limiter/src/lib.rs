//! Placeholder: the limiter crate (issue 3).
