//! A running VM's vCPUs and memory changed in place (`instance scale`, issue 14 item 3).
//!
//! A VM boots with room to grow ([`Sizes`], `<run>/size.json`): `-smp N,maxcpus=M` and
//! `-m R,maxmem=R+H` with a virtio-mem device of `H` bytes that plugs none at boot.
//! - vCPUs up: `device_add` of the free CPU slots `query-hotpluggable-cpus` lists, the guest
//!   agent onlines them (`guest-set-vcpus`; a guest without an agent sees them offline until
//!   it onlines them), the cgroup's cpuset grows and every vCPU thread is pinned again. Down:
//!   refused live (a CPU unplug needs the guest's consent; the engine offers a restart).
//! - Memory up to `R`: the balloon deflates; above `R`: virtio-mem's `requested-size` (the
//!   guest onlines the blocks itself, movable so that they can be taken back:
//!   `memhp_default_state=online_movable`). Down: virtio-mem gives
//!   back what it plugged, the balloon inflates below `R`. The cgroup's limit is raised first
//!   and lowered last.
//! - Past `M` vCPUs or `R + H` bytes: refused with the maximum; the engine offers a restart.
//!
//! What the guest gives back it gives back as it can: the balloon and virtio-mem move towards
//! their targets; `instance get` shows the guest's memory as the balloon sees it.

use super::qemu::{self, RunPaths};
use super::qmp::{Agent, Monitor};
use super::VmError;
use crate::HostRoot;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// A VM's sizes: what it booted with, its maximums, and what it has now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    pub boot_vcpus: u32,
    pub boot_memory: u64,
    pub max_vcpus: u32,
    pub max_memory: u64,
    pub vcpus: u32,
    pub memory: u64,
}

/// The sizes' file in the run dir.
pub const SIZES: &str = "size.json";

impl Sizes {
    fn path(run_dir: &Path) -> std::path::PathBuf {
        run_dir.join(SIZES)
    }

    /// Into the VM's run dir.
    pub fn write(&self, run_dir: &Path) -> Result<(), VmError> {
        super::write_json(&Self::path(run_dir), self)
    }

    pub fn read(run_dir: &Path) -> Result<Self, VmError> {
        super::read_json(&Self::path(run_dir))
    }

    /// Changed since boot (a snapshot of the running state would not load into a VM started
    /// at the stored size).
    pub fn resized(&self) -> bool {
        self.vcpus != self.boot_vcpus || self.memory != self.boot_memory
    }
}

/// The most a VM of this host can grow to: every online CPU, all of the host's RAM (whole
/// 128 MiB), within [`MAX_VCPUS`] and [`MAX_MEMORY`]. Never below what it boots with.
pub fn host_maximums(root: &HostRoot, vcpus: u32, memory: u64) -> (u32, u64) {
    let cpus = root
        .online_cpus()
        .map_or(0, |c| c.len() as u32)
        .min(MAX_VCPUS);
    let mem = root
        .mem_total()
        .map_or(0, |m| m.min(MAX_MEMORY) >> 27 << 27);
    (cpus.max(vcpus), mem.max(memory))
}

/// Most vCPUs a VM grows to: q35 without an IOMMU addresses at most 255 APIC ids, and every
/// possible CPU costs the guest per-CPU memory.
pub const MAX_VCPUS: u32 = 240;
/// Most RAM a VM grows to (the guest's physical address space, also under TCG).
pub const MAX_MEMORY: u64 = 1 << 40;

fn refuse(id: &str, why: String) -> VmError {
    VmError::Refused {
        id: id.to_string(),
        why,
    }
}

/// Resizes the running VM (QEMU `pid`) to `pins.vcpus` (one vCPU each, pinned in order, its
/// other threads on `pins.emulator`) and `memory` bytes.
pub fn resize(
    root: &HostRoot,
    id: &str,
    run: &RunPaths,
    pid: i32,
    pins: &qemu::CpuPins,
    memory: u64,
    overhead: u64,
) -> Result<(), VmError> {
    let cpus = &pins.vcpus[..];
    let mut sizes = Sizes::read(&run.dir)?;
    let want = u32::try_from(cpus.len()).unwrap_or(u32::MAX).max(1);
    if want < sizes.vcpus {
        return Err(refuse(
            id,
            format!(
                "a running VM's vCPUs cannot be taken away ({} now, {want} asked)",
                sizes.vcpus
            ),
        ));
    }
    if want > sizes.max_vcpus {
        return Err(refuse(
            id,
            format!(
                "{want} vCPUs is more than the {} this VM can grow to while it runs",
                sizes.max_vcpus
            ),
        ));
    }
    let hotplug = sizes.max_memory.saturating_sub(sizes.boot_memory);
    let plugged = memory.saturating_sub(sizes.boot_memory);
    if memory > sizes.max_memory || plugged > hotplug {
        return Err(refuse(
            id,
            format!(
                "{} MiB is more than the {} MiB this VM can grow to while it runs",
                memory >> 20,
                sizes.max_memory >> 20
            ),
        ));
    }
    if plugged > 0 && (plugged & ((128 << 20) - 1)) != 0 {
        return Err(refuse(
            id,
            format!(
                "memory above the {} MiB the VM booted with is added in steps of 128 MiB",
                sizes.boot_memory >> 20
            ),
        ));
    }
    let mut mon = Monitor::connect(&run.qmp(), Duration::from_secs(5))?;
    // Room first: the cpuset and the larger of the two limits.
    let limit = memory.max(sizes.memory).saturating_add(overhead);
    drop(qemu::make_cgroup(root, id, pins, limit)?);
    if want > sizes.vcpus {
        mon.add_vcpus(want - sizes.vcpus)?;
    }
    if hotplug > 0 {
        mon.set_virtio_mem(plugged)?;
    }
    mon.set_balloon(memory.min(sizes.boot_memory))?;
    let vcpus = mon.vcpus()?;
    qemu::pin_vcpus(root, pid, &vcpus, cpus)?;
    if want > sizes.vcpus {
        // QEMU's monitor serves one client: free while the guest catches up.
        drop(mon);
        online_vcpus(&run.agent(), want as usize);
        mon = Monitor::connect(&run.qmp(), Duration::from_secs(5))?;
    }
    if memory < sizes.memory {
        let targets = (memory.min(sizes.boot_memory), plugged, hotplug > 0);
        if !lower_limit(
            &mut mon,
            root,
            id,
            pins,
            memory.saturating_add(overhead),
            targets,
        ) {
            // Not given back: put the targets back as they were and say so; the VM keeps its
            // size (and its limit), so the store never holds a size the host does not.
            let was = sizes.memory.saturating_sub(sizes.boot_memory);
            if hotplug > 0 {
                let _ = mon.set_virtio_mem(was);
            }
            let _ = mon.set_balloon(sizes.memory.min(sizes.boot_memory));
            sizes.vcpus = want;
            sizes.write(&run.dir)?;
            return Err(refuse(id, format!(
                "the guest did not give {} MiB back within {} s (its balloon or memory hot-unplug did not comply): its memory stays {} MiB",
                (sizes.memory - memory) >> 20,
                SHRINK_WAIT.as_secs(),
                sizes.memory >> 20
            )));
        }
    }
    sizes.vcpus = want;
    sizes.memory = memory;
    sizes.write(&run.dir)?;
    tracing::info!(id, vcpus = want, memory, "VM resized while running");
    Ok(())
}

/// How long a shrinking VM's guest has to give its memory back before the limit is lowered.
const SHRINK_WAIT: Duration = Duration::from_secs(20);

/// Lowers the cgroup's memory limit to `limit` once the guest has given the memory back (the
/// balloon at its target, virtio-mem down to what stays plugged: `targets`) and QEMU's
/// anonymous memory fits under it (QEMU discards what the guest gave back). A limit under
/// what QEMU holds, or one the guest can still grow past, would have the kernel kill QEMU: if
/// the guest has not complied in time, the limit stays where it was and this says `false`.
fn lower_limit(
    mon: &mut Monitor,
    root: &HostRoot,
    id: &str,
    pins: &qemu::CpuPins,
    limit: u64,
    (balloon, plugged, virtio_mem): (u64, u64, bool),
) -> bool {
    let deadline = std::time::Instant::now() + SHRINK_WAIT;
    loop {
        let given = mon.guest_memory().is_ok_and(|m| m.actual <= balloon)
            && (!virtio_mem || mon.virtio_mem_size().is_ok_and(|s| s <= plugged));
        let anon = crate::telemetry::cgroup_anon(root, id);
        if given && anon.is_some_and(|a| a <= limit) {
            if let Err(e) = qemu::make_cgroup(root, id, pins, limit) {
                tracing::warn!(id, error = %e, "cannot lower a resized VM's memory limit");
            }
            return true;
        }
        if std::time::Instant::now() > deadline {
            tracing::warn!(
                id,
                limit,
                anon,
                given,
                "the guest has not given its memory back in time: the shrink is undone"
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long the guest has to see hot-plugged vCPUs (its ACPI handler runs on its own time,
/// slow under TCG on a busy host) before they are left for the guest to online.
const VCPU_WAIT: Duration = Duration::from_secs(30);

/// Onlines every offline vCPU through the guest agent, once the guest knows of all `want` of
/// them: a hot-plugged vCPU appears in the guest only when its kernel has handled the ACPI
/// event, and an agent asked before that finds nothing to online. A guest without an agent
/// (no answer at once), or one that never sees them in time, is left to do it (logged).
fn online_vcpus(agent: &Path, want: usize) {
    let deadline = std::time::Instant::now() + VCPU_WAIT;
    let mut a = match Agent::connect(agent, Duration::from_secs(3)).and_then(|mut a| {
        a.sync()?;
        Ok(a)
    }) {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(error = %e, "no guest agent to online the new vCPUs: the guest must");
            return;
        }
    };
    loop {
        let why = match a.online_vcpus() {
            Ok((known, true)) if known >= want => {
                tracing::debug!(known, "guest vCPUs online");
                return;
            }
            Ok((known, _)) => format!("the guest knows of {known} of {want} vCPUs, not all online"),
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() > deadline {
            tracing::info!(error = %why, "the guest agent did not online the new vCPUs: the guest must");
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
