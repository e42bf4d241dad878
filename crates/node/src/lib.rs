//! The node layer: the only code in gpuvisor that touches the host (/sys, /dev, /proc, cgroups,
//! mounts, loop devices, netlink, processes). The control layer above it decides *what* should
//! exist; this crate makes it exist and can list what exists, so the reconciler can adopt it or
//! remove it.
//!
//! Every host object created here carries the instance id in its name or path (cgroup
//! `gpuvisor/<id>`, mount points under `<data>/instances/<id>`, loop devices backed by
//! `<data>/disks/<id>.img`, veth `gvh<id>`, netns `gv-<id>`, runc container `<id>`), which is what
//! makes orphan sweeps after a crash possible. All read-only host paths go through [`HostRoot`] so
//! tests run against fixture trees.

pub mod cgroup;
pub mod cmd;
pub mod console;
pub mod container;
pub mod disk;
pub mod gpu;
pub mod host;
pub mod hostcheck;
pub mod image;
pub mod instance;
pub mod ipam;
pub mod keys;
pub mod ksm;
pub mod limiter;
pub mod logs;
pub mod mig;
pub mod net;
pub mod oci;
pub mod reap;
pub mod registry;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod telemetry;
#[cfg(any(test, feature = "testfx"))]
pub mod testfx;
pub mod vfio;
pub mod vm;
pub mod webhook;

pub use host::HostRoot;
pub use instance::{InstancePlan, Node, NodeConfig, NodeError};
