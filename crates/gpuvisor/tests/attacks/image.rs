//! Attacks: image (filled in by its owner).
