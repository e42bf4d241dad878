//! MIG (Multi-Instance GPU) partitions: list a GPU's GPU-instance profiles and placements, create
//! and destroy GPU instances (GIs) and their compute instances (CIs).
//!
//! Why a trait: MIG changes are disruptive and need an Ampere-or-newer GPU in MIG mode, so they
//! are never exercised against a real GPU in tests; [`MigControl`] has an NVML implementation
//! ([`NvmlMig`]) and an in-memory one ([`SimulatedMig`]) that the tests (and simulated hosts) use.
//!
//! Key decisions:
//! - nvml-wrapper 0.13 covers MIG mode and profile info only (its placement query returns an empty
//!   list: it never sets the vector's length), so GI/CI queries, creation and destruction call the
//!   NVML entry points directly through nvml-wrapper-sys's `NvmlLib` in [`ffi`]. Each symbol is
//!   looked up as a `Result` first, so an old driver without one is an error, not a panic.
//! - `create` makes a GI and one CI spanning it (the common "one slice = one device" layout, what
//!   `nvidia-smi mig -cgi <p> -C` does); `destroy` removes a GI's CIs first, as NVML requires.
//! - Profiles are named as nvidia-smi names them (`1g.10gb`, `3g.40gb`, `1g.10gb+me`): the memory
//!   figure follows NVIDIA's rounding (fraction of the GPU's memory rounded up to eighths, times
//!   the GPU's memory in whole GiB).
//! - Changing MIG mode itself is out of scope: it needs a GPU reset, which is the operator's call.

use std::sync::Mutex;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MigError {
    #[error("nvml: {0}")]
    Nvml(String),
    #[error("no GPU {0:?} (give an index, UUID or PCI address)")]
    NoGpu(String),
    #[error(
        "GPU {0} is not in MIG mode: enable it with `nvidia-smi -i {0} -mig 1` and reset the GPU"
    )]
    NotEnabled(String),
    #[error("GPU {gpu} has no MIG profile {profile:?} (see `gpuvisor gpu mig list {gpu}`)")]
    NoProfile { gpu: String, profile: String },
    #[error("no room for a {profile} GPU instance on GPU {gpu}: destroy one first")]
    NoCapacity { gpu: String, profile: String },
    #[error("GPU {gpu} has no GPU instance {gi}")]
    NoInstance { gpu: String, gi: u32 },
    #[error("this driver lacks {0}: MIG needs driver R470 or newer")]
    MissingSymbol(&'static str),
}

pub use gpuvisor_wire::mig::{ComputeInstance, GiProfile, GpuInstance, MigState, Placement};

/// A MIG device (one compute instance) as the driver names it: what the inventory schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigDevice {
    /// `MIG-xxxxxxxx-...`.
    pub uuid: String,
    pub gi: u32,
    pub ci: u32,
    /// Bytes of memory of its GPU instance.
    pub memory: u64,
}

/// What gpuvisor needs from MIG. `gpu` is an NVML index, a UUID or a PCI address.
pub trait MigControl: Send + Sync {
    fn enabled(&self, gpu: &str) -> Result<bool, MigError>;
    fn profiles(&self, gpu: &str) -> Result<Vec<GiProfile>, MigError>;
    fn gpu_instances(&self, gpu: &str) -> Result<Vec<GpuInstance>, MigError>;
    /// Creates a GI of NVML profile index `profile`; returns its id.
    fn create_gpu_instance(&self, gpu: &str, profile: u32) -> Result<u32, MigError>;
    /// Creates a CI of CI profile index `ci_profile` in GI `gi`; returns its id.
    fn create_compute_instance(&self, gpu: &str, gi: u32, ci_profile: u32)
        -> Result<u32, MigError>;
    fn destroy_compute_instance(&self, gpu: &str, gi: u32, ci: u32) -> Result<(), MigError>;
    fn destroy_gpu_instance(&self, gpu: &str, gi: u32) -> Result<(), MigError>;
    /// The MIG devices (one per compute instance) of a GPU in MIG mode, with their UUIDs.
    fn mig_devices(&self, gpu: &str) -> Result<Vec<MigDevice>, MigError>;
}

/// NVIDIA's name for a profile: `<slices>g.<GiB>gb` plus a suffix for media-engine variants.
pub fn profile_name(profile: u32, slices: u32, memory_mib: u64, gpu_memory: u64) -> String {
    let gb = if gpu_memory == 0 {
        memory_mib.div_ceil(1024)
    } else {
        let frac = (memory_mib as f64 * (1u64 << 20) as f64) / gpu_memory as f64;
        let frac = (frac * 8.0).ceil() / 8.0;
        let total_gb = gpu_memory.div_ceil(1 << 30) as f64;
        (frac * total_gb).round() as u64
    };
    let suffix = match profile {
        7 => "+me",
        10..=12 => "+gfx",
        13 | 14 => "-me",
        15 | 16 => "+me.all",
        _ => "",
    };
    format!("{slices}g.{gb}gb{suffix}")
}

/// The whole MIG state of a GPU.
pub fn state(ctl: &dyn MigControl, gpu: &str) -> Result<MigState, MigError> {
    let enabled = ctl.enabled(gpu)?;
    let profiles = ctl.profiles(gpu)?;
    let instances = if enabled {
        ctl.gpu_instances(gpu)?
    } else {
        vec![]
    };
    Ok(MigState {
        gpu: gpu.to_string(),
        enabled,
        profiles,
        instances,
    })
}

/// Finds a profile by name (`1g.10gb`), NVML id or index (`id:9`, `9`).
fn find_profile(profiles: &[GiProfile], want: &str) -> Option<GiProfile> {
    let want = want.trim();
    profiles
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(want))
        .or_else(|| {
            let n: u32 = want.strip_prefix("id:").unwrap_or(want).parse().ok()?;
            profiles.iter().find(|p| p.id == n)
        })
        .cloned()
}

/// Creates a GI of `profile` and one CI spanning it. Refuses when MIG is off or the profile
/// does not fit; if the CI cannot be made the GI is destroyed again, so nothing half-made stays.
pub fn create(ctl: &dyn MigControl, gpu: &str, profile: &str) -> Result<GpuInstance, MigError> {
    if !ctl.enabled(gpu)? {
        return Err(MigError::NotEnabled(gpu.to_string()));
    }
    let profiles = ctl.profiles(gpu)?;
    let p = find_profile(&profiles, profile).ok_or_else(|| MigError::NoProfile {
        gpu: gpu.to_string(),
        profile: profile.to_string(),
    })?;
    if p.free == 0 {
        return Err(MigError::NoCapacity {
            gpu: gpu.to_string(),
            profile: p.name,
        });
    }
    let gi = ctl.create_gpu_instance(gpu, p.profile)?;
    // CI profile indices mirror GI slice counts: 1 slice → 0, 2 → 1, 3 → 2, 4 → 3, 7 → 4.
    let ci_profile = match p.slices {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        7 => 4,
        8 => 5,
        6 => 6,
        _ => 0,
    };
    if let Err(e) = ctl.create_compute_instance(gpu, gi, ci_profile) {
        let _ = ctl.destroy_gpu_instance(gpu, gi);
        return Err(e);
    }
    ctl.gpu_instances(gpu)?
        .into_iter()
        .find(|g| g.id == gi)
        .ok_or(MigError::NoInstance {
            gpu: gpu.to_string(),
            gi,
        })
}

/// Destroys GI `gi` and its compute instances.
pub fn destroy(ctl: &dyn MigControl, gpu: &str, gi: u32) -> Result<GpuInstance, MigError> {
    let inst = ctl
        .gpu_instances(gpu)?
        .into_iter()
        .find(|g| g.id == gi)
        .ok_or(MigError::NoInstance {
            gpu: gpu.to_string(),
            gi,
        })?;
    for ci in &inst.compute_instances {
        ctl.destroy_compute_instance(gpu, gi, ci.id)?;
    }
    ctl.destroy_gpu_instance(gpu, gi)?;
    Ok(inst)
}

// --- simulated ---------------------------------------------------------------------------------

/// An in-memory MIG GPU for tests and simulated hosts: the A100-40GB / H100-80GB profile layout
/// (7 compute slices over 8 memory slices) with NVML's placement rules.
#[derive(Debug)]
pub struct SimulatedMig {
    gpus: Vec<SimGpu>,
    inner: Mutex<SimState>,
    /// Where the layout is kept across daemon restarts (like the driver keeps it), if anywhere.
    state_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
struct SimGpu {
    uuid: String,
    memory: u64,
    enabled: bool,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SimState {
    next_id: u32,
    /// (gpu index, instance).
    gis: Vec<(usize, GpuInstance)>,
    /// Fail the next compute-instance creation (to test the clean-up path).
    #[serde(skip)]
    fail_next_ci: bool,
    /// (inode, length, mtime) of the state file when last read or written: another writer
    /// (a second process, as `nvidia-smi mig` is for the real driver) is noticed and re-read.
    #[serde(skip)]
    seen: Option<(u64, u64, std::time::SystemTime)>,
}

fn file_stamp(file: &std::path::Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(file).ok()?;
    Some((md.ino(), md.len(), md.modified().ok()?))
}

/// (profile index, id, slices, memory fraction in eighths, SMs, allowed placement starts).
type SimProfile = (u32, u32, u32, u64, u32, &'static [u32]);
const SIM_PROFILES: &[SimProfile] = &[
    (0, 19, 1, 1, 16, &[0, 1, 2, 3, 4, 5, 6]),
    (7, 20, 1, 1, 16, &[0, 1, 2, 3, 4, 5, 6]),
    (9, 15, 1, 2, 16, &[0, 2, 4, 6]),
    (1, 14, 2, 2, 32, &[0, 2, 4]),
    (2, 9, 3, 4, 48, &[0, 4]),
    (3, 5, 4, 4, 64, &[0]),
    (4, 0, 7, 8, 112, &[0]),
];

impl SimulatedMig {
    /// GPUs as (UUID, memory bytes, MIG enabled).
    pub fn new(gpus: &[(&str, u64, bool)]) -> Self {
        Self {
            gpus: gpus
                .iter()
                .map(|(u, m, e)| SimGpu {
                    uuid: u.to_string(),
                    memory: *m,
                    enabled: *e,
                })
                .collect(),
            inner: Mutex::new(SimState {
                next_id: 1,
                ..Default::default()
            }),
            state_file: None,
        }
    }

    /// Like [`SimulatedMig::new`], keeping the layout in `file` (read now if it exists, written
    /// after every change), so GPU instances outlive a daemon restart as they do on a real GPU.
    pub fn persistent(
        gpus: &[(&str, u64, bool)],
        file: std::path::PathBuf,
    ) -> Result<Self, MigError> {
        let mut mig = Self::new(gpus);
        if let Some(st) = Self::load(&file)? {
            *mig.lock() = st;
        }
        mig.state_file = Some(file);
        Ok(mig)
    }

    /// The layout in `file`, `None` when there is no file yet.
    fn load(file: &std::path::Path) -> Result<Option<SimState>, MigError> {
        let stamp = file_stamp(file);
        match std::fs::read(file) {
            Ok(bytes) => {
                let mut st: SimState = serde_json::from_slice(&bytes).map_err(|e| {
                    MigError::Nvml(format!("simulated MIG state {}: {e}", file.display()))
                })?;
                st.seen = stamp;
                Ok(Some(st))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(MigError::Nvml(format!("{}: {e}", file.display()))),
        }
    }

    /// Writes the layout to the state file (atomically), where there is one.
    fn save(&self, st: &mut SimState) -> Result<(), MigError> {
        let Some(file) = &self.state_file else {
            return Ok(());
        };
        let err = |e: std::io::Error| MigError::Nvml(format!("{}: {e}", file.display()));
        let tmp = file.with_extension("tmp");
        let bytes = serde_json::to_vec(st).map_err(|e| MigError::Nvml(e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, file).map_err(err)?;
        st.seen = file_stamp(file);
        Ok(())
    }

    /// A stable `MIG-` UUID for compute instance `ci` of GI `gi` on `parent`.
    fn slice_uuid(parent: &str, gi: u32, ci: u32) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(format!("{parent}/gi{gi}/ci{ci}").as_bytes());
        let hex: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!(
            "MIG-{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }

    /// Makes the next compute-instance creation fail.
    pub fn fail_next_compute_instance(&self) {
        self.lock().fail_next_ci = true;
    }

    /// The layout, re-read first when another writer changed the state file.
    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = &self.state_file {
            let stamp = file_stamp(file);
            if stamp.is_some() && stamp != st.seen {
                match Self::load(file) {
                    Ok(Some(fresh)) => {
                        let fail = st.fail_next_ci;
                        *st = fresh;
                        st.fail_next_ci = fail;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "simulated MIG state not re-read"),
                }
            }
        }
        st
    }

    fn gpu(&self, gpu: &str) -> Result<(usize, &SimGpu), MigError> {
        self.gpus
            .iter()
            .enumerate()
            .find(|(i, g)| g.uuid == gpu || i.to_string() == gpu)
            .ok_or_else(|| MigError::NoGpu(gpu.to_string()))
    }

    /// Memory-slice span of a profile: a 3-slice GI takes 4 memory slices, like the hardware.
    fn span(slices: u32, eighths: u64) -> u32 {
        (eighths as u32).max(slices.min(1))
    }

    fn profile(&self, g: &SimGpu, idx: usize, used: &[Placement]) -> GiProfile {
        let (profile, id, slices, eighths, sms, starts) = SIM_PROFILES[idx];
        let size = Self::span(slices, eighths);
        let placements: Vec<Placement> = starts
            .iter()
            .map(|&start| Placement { start, size })
            .collect();
        let free = placements
            .iter()
            .filter(|p| p.start + p.size <= 8 && !used.iter().any(|u| u.overlaps(p)))
            .count() as u32;
        let memory_mib = g.memory / (1 << 20) * eighths / 8;
        GiProfile {
            profile,
            id,
            name: profile_name(profile, slices, memory_mib, g.memory),
            slices,
            memory_mib,
            multiprocessors: sms,
            max_instances: placements.len() as u32,
            free,
            placements,
        }
    }

    fn used(st: &SimState, gi: usize) -> Vec<Placement> {
        st.gis
            .iter()
            .filter(|(g, _)| *g == gi)
            .map(|(_, i)| i.placement)
            .collect()
    }
}

impl MigControl for SimulatedMig {
    fn enabled(&self, gpu: &str) -> Result<bool, MigError> {
        Ok(self.gpu(gpu)?.1.enabled)
    }

    fn profiles(&self, gpu: &str) -> Result<Vec<GiProfile>, MigError> {
        let (i, g) = self.gpu(gpu)?;
        let used = Self::used(&self.lock(), i);
        Ok((0..SIM_PROFILES.len())
            .map(|p| self.profile(g, p, &used))
            .collect())
    }

    fn gpu_instances(&self, gpu: &str) -> Result<Vec<GpuInstance>, MigError> {
        let (i, _) = self.gpu(gpu)?;
        Ok(self
            .lock()
            .gis
            .iter()
            .filter(|(g, _)| *g == i)
            .map(|(_, gi)| gi.clone())
            .collect())
    }

    fn create_gpu_instance(&self, gpu: &str, profile: u32) -> Result<u32, MigError> {
        let (i, g) = self.gpu(gpu)?;
        if !g.enabled {
            return Err(MigError::NotEnabled(gpu.to_string()));
        }
        let idx = SIM_PROFILES
            .iter()
            .position(|p| p.0 == profile)
            .ok_or_else(|| MigError::NoProfile {
                gpu: gpu.to_string(),
                profile: profile.to_string(),
            })?;
        let mut st = self.lock();
        let used = Self::used(&st, i);
        let p = self.profile(g, idx, &used);
        let place = p
            .placements
            .iter()
            .find(|c| c.start + c.size <= 8 && !used.iter().any(|u| u.overlaps(c)))
            .copied()
            .ok_or_else(|| MigError::NoCapacity {
                gpu: gpu.to_string(),
                profile: p.name.clone(),
            })?;
        let id = st.next_id;
        st.next_id += 1;
        st.gis.push((
            i,
            GpuInstance {
                id,
                profile_id: p.id,
                profile: p.name,
                placement: place,
                compute_instances: vec![],
            },
        ));
        self.save(&mut st)?;
        Ok(id)
    }

    fn create_compute_instance(
        &self,
        gpu: &str,
        gi: u32,
        ci_profile: u32,
    ) -> Result<u32, MigError> {
        let (i, _) = self.gpu(gpu)?;
        let mut st = self.lock();
        if std::mem::take(&mut st.fail_next_ci) {
            return Err(MigError::Nvml("Insufficient resources".into()));
        }
        let inst = st
            .gis
            .iter_mut()
            .find(|(g, x)| *g == i && x.id == gi)
            .map(|(_, x)| x)
            .ok_or(MigError::NoInstance {
                gpu: gpu.to_string(),
                gi,
            })?;
        let id = inst.compute_instances.len() as u32;
        inst.compute_instances.push(ComputeInstance {
            id,
            profile_id: ci_profile,
        });
        self.save(&mut st)?;
        Ok(id)
    }

    fn destroy_compute_instance(&self, gpu: &str, gi: u32, ci: u32) -> Result<(), MigError> {
        let (i, _) = self.gpu(gpu)?;
        let mut st = self.lock();
        let inst = st
            .gis
            .iter_mut()
            .find(|(g, x)| *g == i && x.id == gi)
            .map(|(_, x)| x)
            .ok_or(MigError::NoInstance {
                gpu: gpu.to_string(),
                gi,
            })?;
        inst.compute_instances.retain(|c| c.id != ci);
        self.save(&mut st)
    }

    fn destroy_gpu_instance(&self, gpu: &str, gi: u32) -> Result<(), MigError> {
        let (i, _) = self.gpu(gpu)?;
        let mut st = self.lock();
        let before = st.gis.len();
        let busy = st
            .gis
            .iter()
            .any(|(g, x)| *g == i && x.id == gi && !x.compute_instances.is_empty());
        if busy {
            // NVML answers "in use" for a GI that still has compute instances.
            return Err(MigError::Nvml("In use by another client".into()));
        }
        st.gis.retain(|(g, x)| !(*g == i && x.id == gi));
        if st.gis.len() == before {
            return Err(MigError::NoInstance {
                gpu: gpu.to_string(),
                gi,
            });
        }
        self.save(&mut st)
    }

    fn mig_devices(&self, gpu: &str) -> Result<Vec<MigDevice>, MigError> {
        let (i, g) = self.gpu(gpu)?;
        if !g.enabled {
            return Ok(Vec::new());
        }
        let st = self.lock();
        let mut out = Vec::new();
        for (_, gi) in st.gis.iter().filter(|(x, _)| *x == i) {
            let eighths = SIM_PROFILES
                .iter()
                .find(|p| p.1 == gi.profile_id)
                .map_or(1, |p| p.3);
            for ci in &gi.compute_instances {
                out.push(MigDevice {
                    uuid: Self::slice_uuid(&g.uuid, gi.id, ci.id),
                    gi: gi.id,
                    ci: ci.id,
                    memory: g.memory / (1 << 20) * eighths / 8 * (1 << 20),
                });
            }
        }
        Ok(out)
    }
}

// --- NVML --------------------------------------------------------------------------------------

/// MIG through the NVIDIA driver.
pub struct NvmlMig {
    nvml: nvml_wrapper::Nvml,
}

impl std::fmt::Debug for NvmlMig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlMig").finish_non_exhaustive()
    }
}

impl NvmlMig {
    /// Loads NVML; `Err` where the driver is missing.
    pub fn init() -> Result<Self, MigError> {
        Ok(Self {
            nvml: nvml_wrapper::Nvml::init().map_err(|e| MigError::Nvml(e.to_string()))?,
        })
    }

    fn device(&self, gpu: &str) -> Result<nvml_wrapper::Device<'_>, MigError> {
        let g = gpu.trim();
        let dev = if let Ok(i) = g.parse::<u32>() {
            self.nvml.device_by_index(i)
        } else if g.starts_with("GPU-") || g.starts_with("MIG-") {
            self.nvml.device_by_uuid(g)
        } else {
            let pci = crate::gpu::normalise_pci_address(g)
                .ok_or_else(|| MigError::NoGpu(gpu.to_string()))?;
            // NVML wants its own spelling of the bus id.
            self.nvml
                .device_by_pci_bus_id(format!("0000{pci}").to_ascii_uppercase())
        };
        dev.map_err(|_| MigError::NoGpu(gpu.to_string()))
    }
}

fn nv(e: nvml_wrapper::error::NvmlError) -> MigError {
    MigError::Nvml(e.to_string())
}

impl MigControl for NvmlMig {
    fn enabled(&self, gpu: &str) -> Result<bool, MigError> {
        match self.device(gpu)?.mig_mode() {
            Ok(m) => Ok(m.current == 1),
            Err(nvml_wrapper::error::NvmlError::NotSupported) => Ok(false),
            Err(e) => Err(nv(e)),
        }
    }

    fn profiles(&self, gpu: &str) -> Result<Vec<GiProfile>, MigError> {
        let dev = self.device(gpu)?;
        let memory = dev.memory_info().map(|m| m.total).unwrap_or(0);
        let lib = self.nvml.lib();
        // SAFETY: the handle comes from a live `Device` of `self.nvml`, which outlives this call.
        let handle = unsafe { dev.handle() };
        let mut out = Vec::new();
        for profile in 0..nvml_wrapper_sys::bindings::NVML_GPU_INSTANCE_PROFILE_COUNT {
            let Ok(info) = dev.profile_info(profile) else {
                continue; // not supported on this GPU
            };
            let placements = ffi::placements(lib, handle, info.id)?;
            let free = ffi::remaining(lib, handle, info.id)?;
            out.push(GiProfile {
                profile,
                id: info.id,
                name: profile_name(profile, info.slice_count, info.memory_size_mb, memory),
                slices: info.slice_count,
                memory_mib: info.memory_size_mb,
                multiprocessors: info.multiprocessor_count,
                max_instances: info.instance_count,
                free,
                placements,
            });
        }
        Ok(out)
    }

    fn gpu_instances(&self, gpu: &str) -> Result<Vec<GpuInstance>, MigError> {
        let profiles = self.profiles(gpu)?;
        let dev = self.device(gpu)?;
        // SAFETY: as in `profiles`.
        let handle = unsafe { dev.handle() };
        let lib = self.nvml.lib();
        let mut out = Vec::new();
        for p in &profiles {
            for (id, placement, cis) in ffi::gpu_instances(lib, handle, p.id)? {
                out.push(GpuInstance {
                    id,
                    profile_id: p.id,
                    profile: p.name.clone(),
                    placement,
                    compute_instances: cis
                        .into_iter()
                        .map(|(id, profile_id)| ComputeInstance { id, profile_id })
                        .collect(),
                });
            }
        }
        out.sort_by_key(|g| g.id);
        Ok(out)
    }

    fn create_gpu_instance(&self, gpu: &str, profile: u32) -> Result<u32, MigError> {
        let dev = self.device(gpu)?;
        let info = dev.profile_info(profile).map_err(nv)?;
        // SAFETY: as in `profiles`.
        let handle = unsafe { dev.handle() };
        ffi::create_gpu_instance(self.nvml.lib(), handle, info.id)
    }

    fn create_compute_instance(
        &self,
        gpu: &str,
        gi: u32,
        ci_profile: u32,
    ) -> Result<u32, MigError> {
        let dev = self.device(gpu)?;
        // SAFETY: as in `profiles`.
        let handle = unsafe { dev.handle() };
        ffi::create_compute_instance(self.nvml.lib(), handle, gi, ci_profile)
    }

    fn destroy_compute_instance(&self, gpu: &str, gi: u32, ci: u32) -> Result<(), MigError> {
        let dev = self.device(gpu)?;
        // SAFETY: as in `profiles`.
        let handle = unsafe { dev.handle() };
        ffi::destroy_compute_instance(self.nvml.lib(), handle, gi, ci)
    }

    fn destroy_gpu_instance(&self, gpu: &str, gi: u32) -> Result<(), MigError> {
        let dev = self.device(gpu)?;
        // SAFETY: as in `profiles`.
        let handle = unsafe { dev.handle() };
        ffi::destroy_gpu_instance(self.nvml.lib(), handle, gi)
    }

    fn mig_devices(&self, gpu: &str) -> Result<Vec<MigDevice>, MigError> {
        if !self.enabled(gpu)? {
            return Ok(Vec::new());
        }
        let dev = self.device(gpu)?;
        let max = dev.mig_device_count().map_err(nv)?;
        let mut out = Vec::new();
        for i in 0..max {
            let mig = match dev.mig_device_by_index(i) {
                Ok(m) => m,
                // Indices without a compute instance behind them are holes, not errors.
                Err(nvml_wrapper::error::NvmlError::NotFound)
                | Err(nvml_wrapper::error::NvmlError::InvalidArg) => continue,
                Err(e) => return Err(nv(e)),
            };
            // SAFETY: the handle comes from a live MIG `Device` of `self.nvml`.
            let handle = unsafe { mig.handle() };
            let (gi, ci) = ffi::mig_ids(self.nvml.lib(), handle)?;
            out.push(MigDevice {
                uuid: mig.uuid().map_err(nv)?,
                gi,
                ci,
                memory: mig.memory_info().map(|m| m.total).unwrap_or(0),
            });
        }
        Ok(out)
    }
}

/// The NVML MIG calls nvml-wrapper does not wrap. Every function takes a device handle that the
/// caller got from a live `Device` and calls one driver entry point with pointers to locals.
mod ffi {
    use super::{MigError, Placement};
    use nvml_wrapper::error::nvml_try;
    use nvml_wrapper_sys::bindings::{
        nvmlComputeInstanceInfo_t, nvmlComputeInstanceProfileInfo_t, nvmlComputeInstance_t,
        nvmlDevice_t, nvmlGpuInstanceInfo_t, nvmlGpuInstancePlacement_t, nvmlGpuInstance_t,
        NvmlLib, NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, NVML_COMPUTE_INSTANCE_PROFILE_COUNT,
    };
    use std::os::raw::c_uint;

    fn check(code: nvml_wrapper_sys::bindings::nvmlReturn_t) -> Result<(), MigError> {
        nvml_try(code).map_err(super::nv)
    }

    macro_rules! sym {
        ($lib:expr, $name:ident) => {
            $lib.$name
                .as_ref()
                .map_err(|_| MigError::MissingSymbol(stringify!($name)))?
        };
    }

    /// Most GIs or CIs a GPU can hold (7 slices; 8 leaves headroom for future parts).
    const MAX: usize = 8;

    pub(super) fn placements(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        profile_id: u32,
    ) -> Result<Vec<Placement>, MigError> {
        let f = sym!(lib, nvmlDeviceGetGpuInstancePossiblePlacements_v2);
        let mut buf = [nvmlGpuInstancePlacement_t { start: 0, size: 0 }; MAX];
        let mut count: c_uint = MAX as c_uint;
        // SAFETY: `buf` has room for `count` placements and both outlive the call; `dev` is a
        // valid handle (see the module doc).
        check(unsafe { f(dev, profile_id, buf.as_mut_ptr(), &mut count) })?;
        Ok(buf[..(count as usize).min(MAX)]
            .iter()
            .map(|p| Placement {
                start: p.start,
                size: p.size,
            })
            .collect())
    }

    /// (GI id, CI id) of a MIG device handle.
    pub(super) fn mig_ids(lib: &NvmlLib, mig: nvmlDevice_t) -> Result<(u32, u32), MigError> {
        let gi_of = sym!(lib, nvmlDeviceGetGpuInstanceId);
        let ci_of = sym!(lib, nvmlDeviceGetComputeInstanceId);
        let (mut gi, mut ci): (c_uint, c_uint) = (0, 0);
        // SAFETY: `mig` is a valid MIG device handle; `gi` and `ci` are locals.
        check(unsafe { gi_of(mig, &mut gi) })?;
        // SAFETY: as above.
        check(unsafe { ci_of(mig, &mut ci) })?;
        Ok((gi, ci))
    }

    pub(super) fn remaining(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        profile_id: u32,
    ) -> Result<u32, MigError> {
        let f = sym!(lib, nvmlDeviceGetGpuInstanceRemainingCapacity);
        let mut count: c_uint = 0;
        // SAFETY: `count` is a local that outlives the call; `dev` is valid.
        check(unsafe { f(dev, profile_id, &mut count) })?;
        Ok(count)
    }

    fn gi_handles(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        profile_id: u32,
    ) -> Result<Vec<nvmlGpuInstance_t>, MigError> {
        let f = sym!(lib, nvmlDeviceGetGpuInstances);
        let mut buf: [nvmlGpuInstance_t; MAX] = [std::ptr::null_mut(); MAX];
        let mut count: c_uint = MAX as c_uint;
        // SAFETY: `buf` has room for `count` handles; NVML writes at most that many.
        check(unsafe { f(dev, profile_id, buf.as_mut_ptr(), &mut count) })?;
        Ok(buf[..(count as usize).min(MAX)].to_vec())
    }

    /// (GI id, placement, [(CI id, CI profile id)]) of every GI of one profile.
    #[allow(clippy::type_complexity)]
    pub(super) fn gpu_instances(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        profile_id: u32,
    ) -> Result<Vec<(u32, Placement, Vec<(u32, u32)>)>, MigError> {
        let get_info = sym!(lib, nvmlGpuInstanceGetInfo);
        let ci_profile_info = sym!(lib, nvmlGpuInstanceGetComputeInstanceProfileInfo);
        let get_cis = sym!(lib, nvmlGpuInstanceGetComputeInstances);
        let ci_info = sym!(lib, nvmlComputeInstanceGetInfo_v2);
        let mut out = Vec::new();
        for gi in gi_handles(lib, dev, profile_id)? {
            // SAFETY: all-zero is a valid value of this plain C struct (pointers null).
            let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `gi` was just returned by NVML for this device; `info` is a local.
            check(unsafe { get_info(gi, &mut info) })?;
            let mut cis = Vec::new();
            for cp in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
                // SAFETY: as above: a zeroed plain C struct.
                let mut pinfo: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: `gi` is valid; `pinfo` is a local.
                let ok = unsafe {
                    ci_profile_info(
                        gi,
                        cp,
                        NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                        &mut pinfo,
                    )
                };
                if check(ok).is_err() {
                    continue; // profile not supported in this GI
                }
                let mut handles: [nvmlComputeInstance_t; MAX] = [std::ptr::null_mut(); MAX];
                let mut count: c_uint = MAX as c_uint;
                // SAFETY: `handles` has room for `count` entries.
                check(unsafe { get_cis(gi, pinfo.id, handles.as_mut_ptr(), &mut count) })?;
                for ci in &handles[..(count as usize).min(MAX)] {
                    // SAFETY: zeroed plain C struct.
                    let mut cinfo: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
                    // SAFETY: `ci` was just returned by NVML; `cinfo` is a local.
                    check(unsafe { ci_info(*ci, &mut cinfo) })?;
                    cis.push((cinfo.id, cinfo.profileId));
                }
            }
            out.push((
                info.id,
                Placement {
                    start: info.placement.start,
                    size: info.placement.size,
                },
                cis,
            ));
        }
        Ok(out)
    }

    fn gi_by_id(lib: &NvmlLib, dev: nvmlDevice_t, gi: u32) -> Result<nvmlGpuInstance_t, MigError> {
        let f = sym!(lib, nvmlDeviceGetGpuInstanceById);
        let mut h: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: `h` is a local out-parameter; `dev` is valid.
        check(unsafe { f(dev, gi, &mut h) })?;
        Ok(h)
    }

    pub(super) fn create_gpu_instance(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        profile_id: u32,
    ) -> Result<u32, MigError> {
        let create = sym!(lib, nvmlDeviceCreateGpuInstance);
        let get_info = sym!(lib, nvmlGpuInstanceGetInfo);
        let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
        // SAFETY: `gi` is a local out-parameter; `dev` is valid.
        check(unsafe { create(dev, profile_id, &mut gi) })?;
        // SAFETY: zeroed plain C struct.
        let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `gi` was just created by NVML; `info` is a local.
        check(unsafe { get_info(gi, &mut info) })?;
        Ok(info.id)
    }

    pub(super) fn create_compute_instance(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        gi: u32,
        ci_profile: u32,
    ) -> Result<u32, MigError> {
        let profile_info = sym!(lib, nvmlGpuInstanceGetComputeInstanceProfileInfo);
        let create = sym!(lib, nvmlGpuInstanceCreateComputeInstance);
        let ci_info = sym!(lib, nvmlComputeInstanceGetInfo_v2);
        let gi = gi_by_id(lib, dev, gi)?;
        // SAFETY: zeroed plain C struct.
        let mut pinfo: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `gi` is a valid handle from NVML; `pinfo` is a local.
        check(unsafe {
            profile_info(
                gi,
                ci_profile,
                NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                &mut pinfo,
            )
        })?;
        let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
        // SAFETY: `ci` is a local out-parameter; `gi` is valid.
        check(unsafe { create(gi, pinfo.id, &mut ci) })?;
        // SAFETY: zeroed plain C struct.
        let mut cinfo: nvmlComputeInstanceInfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `ci` was just created by NVML; `cinfo` is a local.
        check(unsafe { ci_info(ci, &mut cinfo) })?;
        Ok(cinfo.id)
    }

    pub(super) fn destroy_compute_instance(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        gi: u32,
        ci: u32,
    ) -> Result<(), MigError> {
        let by_id = sym!(lib, nvmlGpuInstanceGetComputeInstanceById);
        let destroy = sym!(lib, nvmlComputeInstanceDestroy);
        let gi = gi_by_id(lib, dev, gi)?;
        let mut h: nvmlComputeInstance_t = std::ptr::null_mut();
        // SAFETY: `gi` is valid; `h` is a local out-parameter.
        check(unsafe { by_id(gi, ci, &mut h) })?;
        // SAFETY: `h` was just returned by NVML.
        check(unsafe { destroy(h) })
    }

    pub(super) fn destroy_gpu_instance(
        lib: &NvmlLib,
        dev: nvmlDevice_t,
        gi: u32,
    ) -> Result<(), MigError> {
        let destroy = sym!(lib, nvmlGpuInstanceDestroy);
        let h = gi_by_id(lib, dev, gi)?;
        // SAFETY: `h` was just returned by NVML for this device.
        check(unsafe { destroy(h) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const H100: u64 = 81559 << 20;
    const A100_40: u64 = 40960 << 20;

    fn sim() -> SimulatedMig {
        SimulatedMig::new(&[("GPU-aaaa", H100, true), ("GPU-bbbb", A100_40, false)])
    }

    #[test]
    fn names_profiles_like_nvidia_smi() {
        // (profile, slices, MiB, GPU bytes) → name, from nvidia-smi mig -lgip on real parts.
        assert_eq!(profile_name(0, 1, 9856, H100), "1g.10gb");
        assert_eq!(profile_name(7, 1, 9856, H100), "1g.10gb+me");
        assert_eq!(profile_name(9, 1, 19968, H100), "1g.20gb");
        assert_eq!(profile_name(2, 3, 40192, H100), "3g.40gb");
        assert_eq!(profile_name(4, 7, 80384, H100), "7g.80gb");
        assert_eq!(profile_name(0, 1, 4864, A100_40), "1g.5gb");
        assert_eq!(profile_name(1, 2, 9984, A100_40), "2g.10gb");
        assert_eq!(profile_name(4, 7, 40192, A100_40), "7g.40gb");
        assert_eq!(profile_name(0, 1, 4864, 0), "1g.5gb");
    }

    #[test]
    fn lists_profiles_and_placements() {
        let s = sim();
        let st = state(&s, "GPU-aaaa").unwrap();
        assert!(st.enabled);
        let names: Vec<&str> = st.profiles.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "1g.10gb",
                "1g.10gb+me",
                "1g.20gb",
                "2g.20gb",
                "3g.40gb",
                "4g.40gb",
                "7g.80gb"
            ]
        );
        let three = &st.profiles[4];
        assert_eq!(
            three.placements,
            vec![
                Placement { start: 0, size: 4 },
                Placement { start: 4, size: 4 }
            ]
        );
        assert_eq!((three.max_instances, three.free), (2, 2));
        assert!(st.instances.is_empty());
        // MIG off: profiles listed, no instances, creation refused.
        let off = state(&s, "1").unwrap();
        assert!(!off.enabled);
        assert!(matches!(
            create(&s, "1", "1g.5gb"),
            Err(MigError::NotEnabled(_))
        ));
        assert!(matches!(state(&s, "GPU-zzzz"), Err(MigError::NoGpu(_))));
    }

    #[test]
    fn creates_gi_with_a_full_ci_and_tracks_capacity() {
        let s = sim();
        let a = create(&s, "0", "3g.40gb").unwrap();
        assert_eq!(a.profile, "3g.40gb");
        assert_eq!(a.placement, Placement { start: 0, size: 4 });
        assert_eq!(
            a.compute_instances,
            vec![ComputeInstance {
                id: 0,
                profile_id: 2
            }]
        );
        let b = create(&s, "GPU-aaaa", "id:9").unwrap();
        assert_eq!(b.placement, Placement { start: 4, size: 4 });
        let err = create(&s, "0", "3g.40gb").unwrap_err();
        assert!(matches!(err, MigError::NoCapacity { .. }), "{err:?}");
        assert!(err.to_string().contains("destroy one first"));
        let full = s.profiles("0").unwrap();
        assert!(full.iter().all(|p| p.free == 0), "{full:?}");
        assert!(matches!(
            create(&s, "0", "5g.50gb"),
            Err(MigError::NoProfile { .. })
        ));

        // Destroy removes the CI first, then the GI; the space is free again.
        let gone = destroy(&s, "0", a.id).unwrap();
        assert_eq!(gone.id, a.id);
        assert_eq!(s.gpu_instances("0").unwrap().len(), 1);
        let c = create(&s, "0", "1g.10gb").unwrap();
        assert_eq!(c.placement, Placement { start: 0, size: 1 });
        assert!(matches!(
            destroy(&s, "0", 99),
            Err(MigError::NoInstance { .. })
        ));
    }

    /// On a GPU machine (`GPUVISOR_GPU_TESTS=1`, run by `scripts/gpu-check`): NVML's MIG view
    /// is self-consistent and the inventory builds from it. Read-only: MIG mode and partitions
    /// are never changed. A GPU in MIG mode has one `MIG-` device per compute instance, each in
    /// a listed GPU instance, with its capability nodes in the driver's table; a GPU not in MIG
    /// mode has none.
    #[test]
    fn nvml_lists_mig_read_only() {
        if !crate::testfx::gpu_tests_enabled() {
            return;
        }
        use crate::gpu::GpuBackend;
        let root = crate::HostRoot::real();
        let backend = crate::gpu::NvmlBackend::probe(&root).unwrap().unwrap();
        let ctl = NvmlMig::init().unwrap();
        for g in backend.devices().unwrap() {
            let st = state(&ctl, &g.uuid).unwrap();
            let devs = ctl.mig_devices(&g.uuid).unwrap();
            println!(
                "GPU {} {}: MIG {}, {} profiles, {} GIs, {} MIG devices",
                g.index,
                g.model,
                st.enabled,
                st.profiles.len(),
                st.instances.len(),
                devs.len()
            );
            if !st.enabled {
                assert!(devs.is_empty());
                continue;
            }
            let cis: usize = st.instances.iter().map(|i| i.compute_instances.len()).sum();
            assert_eq!(devs.len(), cis, "{st:?} {devs:?}");
            for d in &devs {
                assert!(d.uuid.starts_with("MIG-"), "{d:?}");
                assert!(st.instances.iter().any(|i| i.id == d.gi), "{d:?}");
                assert!(d.memory > 0, "{d:?}");
                let caps = crate::gpu::host_mig_caps(&root, g.index, d.gi, d.ci);
                assert_eq!(caps.len(), 2, "{d:?}: {caps:?}");
            }
            let inv = crate::gpu::inventory(&backend, Some(&ctl)).unwrap();
            let slices = inv
                .iter()
                .filter(|s| {
                    s.mig
                        .as_ref()
                        .is_some_and(|m| m.slice.parent_uuid == g.uuid)
                })
                .count();
            assert_eq!(slices, devs.len());
        }
    }

    /// Two handles on one state file (the daemon and an operator's tool, like two NVML
    /// clients of one driver) see each other's changes.
    #[test]
    fn a_persistent_layout_is_shared_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mig-state.json");
        let gpus = [("GPU-aaaa", 81559u64 << 20, true)];
        let daemon = SimulatedMig::persistent(&gpus, file.clone()).unwrap();
        let tool = SimulatedMig::persistent(&gpus, file.clone()).unwrap();
        let gi = create(&tool, "0", "1g.10gb").unwrap();
        let seen = daemon.mig_devices("GPU-aaaa").unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].gi, gi.id);
        destroy(&daemon, "0", gi.id).unwrap();
        assert!(tool.mig_devices("0").unwrap().is_empty());
        // A third handle (a restart) starts from the file too, ids continuing.
        let later = SimulatedMig::persistent(&gpus, file).unwrap();
        assert!(create(&later, "0", "1g.10gb").unwrap().id > gi.id);
    }

    #[test]
    fn a_failed_compute_instance_leaves_no_gpu_instance() {
        let s = sim();
        s.fail_next_compute_instance();
        assert!(create(&s, "0", "7g.80gb").is_err());
        assert!(s.gpu_instances("0").unwrap().is_empty());
        // A GI with compute instances cannot be destroyed directly (NVML's rule).
        let g = create(&s, "0", "7g.80gb").unwrap();
        assert!(s.destroy_gpu_instance("0", g.id).is_err());
        destroy(&s, "0", g.id).unwrap();
    }
}
