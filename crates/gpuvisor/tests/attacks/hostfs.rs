//! Attacks: hostfs (filled in by its owner).
