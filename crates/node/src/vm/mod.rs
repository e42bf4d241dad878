//! Micro-VM instances (QEMU). This worktree's part: VFIO GPU passthrough.

pub mod passthrough;
