//! Attacks: tenancy (filled in by its owner).
