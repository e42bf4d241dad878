//! Attacks: limiter (filled in by its owner).
