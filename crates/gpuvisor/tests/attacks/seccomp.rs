//! Attacks: seccomp (filled in by its owner).
