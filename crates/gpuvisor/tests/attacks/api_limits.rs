//! Attacks: api_limits (filled in by its owner).
