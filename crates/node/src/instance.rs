//! The host ([`Node`]): its GPUs, image store, disks, network, limiter regions and logs, shared
//! by every runtime, and the runtimes themselves ([`crate::runtime::Runtime`]: containers,
//! micro-VMs). The node picks an instance's runtime and removes the shared objects; the
//! runtime orders its own steps. Every step is idempotent and every removal tolerates a
//! half-created instance, so the reconciler can call [`Node::provision`] or [`Node::teardown`]
//! again after a crash at any point and converge.

use crate::container::ContainerRuntime;
use crate::disk::{DiskError, Disks};
use crate::gpu::{BackendKind, GpuBackend, GpuConfig, GpuDevice, GpuError};
use crate::image::{ImageError, ImageStore};
use crate::limiter::{GpuShare, Limiters, OverQuota};
use crate::logs::LogLimits;
use crate::net::{NetConfig, NetError, NetPolicy, Network};
use crate::oci::{OciRuntime, RuntimeError};
use crate::runtime::{Runtime, RuntimeKind};
use crate::vfio::{FsWriter, SysWriter};
use crate::{cgroup, HostRoot};
pub use gpuvisor_limiter::shm::Priority;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vfio(#[from] crate::vfio::VfioError),
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GPU {0} is not on this host")]
    UnknownGpu(String),
    #[error("this host cannot run {kind} instances: {why}")]
    RuntimeUnavailable { kind: RuntimeKind, why: String },
    #[error("{what} is not supported for {kind} instances")]
    Unsupported { kind: RuntimeKind, what: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Host settings for the node layer.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// OCI runtime binary.
    pub runtime: String,
    pub simulate_gpus: Option<String>,
    pub net_plan: crate::ipam::AddressPlan,
    pub nat: bool,
    pub pids_limit: i64,
    pub root: HostRoot,
    /// `libgpuvisor_limiter.so` to inject for fractional GPUs (`None`: look in the usual places).
    pub limiter_lib: Option<PathBuf>,
    /// Bytes the limiter charges each process for its CUDA context.
    pub limiter_context_bytes: u64,
    /// What the daemon does to an instance whose processes hold more GPU memory than its quota
    /// (as the driver counts it per process: a bypass of the limiter).
    pub limiter_over_quota: crate::limiter::OverQuotaAction,
    /// Whether the node runs KSM while VMs run ([`crate::ksm`]).
    pub manage_ksm: bool,
    /// Host CPUs no instance is pinned to: VMs' QEMU threads other than the vCPUs
    /// ([`crate::vm::qemu::CpuPins`]) run there (and the host's own processes, where the
    /// operator confines them there).
    pub reserved_cpus: Vec<u32>,
}

/// Everything the engine decided for one instance.
#[derive(Debug, Clone)]
pub struct InstancePlan {
    pub id: String,
    /// What runs it: a container or a micro-VM.
    pub runtime: RuntimeKind,
    pub tenant_id: String,
    pub hostname: String,
    /// Image digest (for its config: working dir, user).
    pub image_digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    pub disk_size: u64,
    /// (volume name, path in the container).
    pub volumes: Vec<(String, PathBuf)>,
    pub net_slot: u32,
    pub ip_host: u8,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cpus: Vec<u32>,
    pub memory: u64,
    /// Disk I/O limits, each disk on its own.
    pub disk_io: gpuvisor_wire::DiskIo,
    /// UUIDs of the GPUs bound to the instance.
    pub gpus: Vec<String>,
    /// For a fractional GPU: the limits of each GPU in `gpus` order (empty for whole GPUs).
    pub gpu_shares: Vec<GpuShare>,
    pub priority: Priority,
    /// VMs: SSH public keys for the guest's user (cloud-init).
    pub ssh_keys: Vec<String>,
    /// VMs: a script cloud-init runs once at first boot.
    pub startup_script: Option<String>,
    /// VMs: packages cloud-init installs at first boot.
    pub packages: Vec<String>,
    /// Restored or cloned: the new disks are copies of this snapshot's (and a VM may resume
    /// its saved running state).
    pub from_snapshot: Option<crate::snapshot::SnapshotSource>,
    /// VMs: another host's live migration comes in: the source QEMU's recorded start, whose
    /// shape the new QEMU takes, waiting for the state ([`crate::vm::remote`]).
    pub incoming: Option<Box<crate::vm::qemu::VmSpec>>,
}

/// What one limiter sample found (see [`Node::sample_limiters`]).
#[derive(Debug, Clone, Default)]
pub struct LimiterSample {
    /// Newest utilisation timestamp seen (µs), for the next call.
    pub newest_us: u64,
    /// Instances holding more GPU memory than their quota, as the driver counts it.
    pub over_quota: Vec<OverQuota>,
}

/// The host: its GPUs, image store, disks, network and OCI runtime.
pub struct Node {
    pub cfg: NodeConfig,
    pub gpu: Box<dyn GpuBackend>,
    /// The schedulable inventory ([`crate::gpu::inventory`]): re-read after MIG changes.
    gpus: std::sync::RwLock<Vec<GpuDevice>>,
    /// MIG control of this host's GPUs, where the backend has one.
    pub mig: Option<Box<dyn crate::mig::MigControl>>,
    pub images: ImageStore,
    pub disks: Disks,
    pub net: Network,
    /// Containers through runc: always present.
    pub container: ContainerRuntime,
    /// Other runtimes the host offers (micro-VMs where QEMU is installed).
    others: Vec<Box<dyn Runtime>>,
    pub limiters: Limiters,
    /// The AppArmor profile for instances, where the host has AppArmor.
    pub apparmor: Option<String>,
    /// How host attributes (sysfs: VFIO binding) are written: the real files unless replaced
    /// with [`Node::with_sys_writer`].
    sys: Arc<dyn SysWriter + Send + Sync>,
    /// Instance log cap, disk reserve and relay binary ([`crate::logs`]).
    log_limits: LogLimits,
    /// The host's KSM: tuned to the running VMs, read for `/metrics`.
    pub ksm: crate::ksm::Ksm,
}

impl Node {
    /// Probes the host: GPU backend, runtime binary, network base rules (default prefix, no
    /// allow- or deny-list).
    pub fn open(cfg: NodeConfig) -> Result<Self, NodeError> {
        Self::open_with_network(cfg, NetPolicy::default())
    }

    /// [`Node::open`] with the operator's network policy (object prefix, allow/deny lists).
    pub fn open_with_network(cfg: NodeConfig, policy: NetPolicy) -> Result<Self, NodeError> {
        let d = &cfg.data_dir;
        private_data_dir(d)?;
        let gpu = crate::gpu::probe(
            &GpuConfig {
                simulate: cfg.simulate_gpus.clone(),
                sim_dev_dir: d.join("dev"),
            },
            &cfg.root,
        )?;
        let mig = gpu.mig_control(&d.join("dev"))?;
        let gpus = crate::gpu::inventory(&*gpu, mig.as_deref())?;
        let images = ImageStore::open(d.join("images"))?;
        let disks = Disks::new(d.clone()).with_pool(crate::disk::POOL_DEPTH);
        disks.open_pool()?;
        crate::snapshot::thaw_instance_mounts(&disks);
        let net = Network::new(NetConfig {
            plan: cfg.net_plan,
            nat: cfg.nat,
            policy,
            // DNS to the resolvers instances are given stays open.
            dns: crate::net::nameservers(&resolv_conf(&cfg.root)),
        })?;
        net.init_host()?;
        let container = ContainerRuntime::new(OciRuntime::probe(
            &cfg.runtime,
            &d.join("run").join("runc"),
        )?);
        let apparmor = apparmor_profile(&cfg.root, d);
        let lib = crate::limiter::locate_library(cfg.limiter_lib.as_deref());
        match &lib {
            Some(p) => {
                tracing::info!(library = %p.display(), "GPU limiter available for fractional GPUs")
            }
            None => tracing::warn!("libgpuvisor_limiter.so not found: fractional GPUs are refused"),
        }
        let limiters = Limiters::new(d, lib, cfg.limiter_context_bytes);
        let ksm = crate::ksm::Ksm::new(&cfg.root, cfg.manage_ksm, cfg.data_dir.join("ksm-on"));
        Ok(Self {
            ksm,
            cfg,
            gpu,
            gpus: std::sync::RwLock::new(gpus),
            mig,
            images,
            disks,
            net,
            container,
            others: Vec::new(),
            limiters,
            apparmor,
            sys: Arc::new(FsWriter),
            log_limits: LogLimits::default(),
        })
    }

    /// Replaces the writer of host attributes. For tests and host doubles (a fixture root's
    /// kernel, `testfx::Kernel`); the daemon keeps the real [`FsWriter`].
    #[must_use]
    pub fn with_sys_writer(mut self, w: Arc<dyn SysWriter + Send + Sync>) -> Self {
        self.sys = w;
        self
    }

    /// Sets the log cap, disk reserve and relay binary (the daemon passes itself).
    #[must_use]
    pub fn with_log_limits(mut self, l: LogLimits) -> Self {
        self.log_limits = l;
        self
    }

    /// Adds a runtime (micro-VMs) beside the container runtime.
    #[must_use]
    pub fn with_runtime(mut self, r: Box<dyn Runtime>) -> Self {
        self.others.retain(|o| o.kind() != r.kind());
        self.others.push(r);
        self
    }

    /// Every runtime of this host, containers first.
    pub fn runtimes(&self) -> impl Iterator<Item = &dyn Runtime> {
        std::iter::once(&self.container as &dyn Runtime).chain(self.others.iter().map(|r| &**r))
    }

    /// The runtime of `kind`, or why the host has none.
    pub fn runtime(&self, kind: RuntimeKind) -> Result<&dyn Runtime, NodeError> {
        self.runtimes()
            .find(|r| r.kind() == kind)
            .ok_or_else(|| NodeError::RuntimeUnavailable {
                kind,
                why: "the runtime is not set up on this host (see `gpuvisor host check`)".into(),
            })
    }

    /// A VM's memory as its balloon sees it (see [`Runtime::guest_memory`]).
    pub fn guest_memory(&self, id: &str) -> Result<Option<crate::vm::qmp::GuestMemory>, NodeError> {
        self.runtime_of(id).guest_memory(self, id)
    }

    /// The runtime that left host objects for `id` (containers when none did).
    pub fn runtime_of(&self, id: &str) -> &dyn Runtime {
        self.others
            .iter()
            .map(|r| &**r)
            .find(|r| r.knows(self, id))
            .unwrap_or(&self.container)
    }

    /// The log cap, disk reserve and relay binary.
    pub fn log_limits(&self) -> &LogLimits {
        &self.log_limits
    }

    /// The writer of host attributes (sysfs), for the VFIO commands.
    pub fn sys_writer(&self) -> Arc<dyn SysWriter + Send + Sync> {
        self.sys.clone()
    }

    /// The CPUs instances may be pinned to: the online ones but the reserved ones.
    pub fn instance_cpus(&self) -> Option<Vec<u32>> {
        let online = self.cfg.root.online_cpus()?;
        Some(
            online
                .into_iter()
                .filter(|c| !self.cfg.reserved_cpus.contains(c))
                .collect(),
        )
    }

    /// The GPU inventory: whole GPUs, GPUs in MIG mode and their slices.
    pub fn gpus(&self) -> Vec<GpuDevice> {
        self.gpus.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the inventory (after a MIG layout change) and returns it.
    pub fn refresh_gpus(&self) -> Result<Vec<GpuDevice>, NodeError> {
        let fresh = crate::gpu::inventory(&*self.gpu, self.mig.as_deref())?;
        *self.gpus.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    pub fn backend(&self) -> BackendKind {
        self.gpu.kind()
    }

    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("bundles").join(id)
    }

    fn logs_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("logs")
    }

    /// The directory of the instance's log segments (see [`crate::logs`]).
    pub fn log_dir(&self, id: &str) -> PathBuf {
        crate::logs::instance_dir(&self.logs_dir(), id)
    }

    /// Up to `max` bytes of the instance's output from logical `offset`: (offset of the first
    /// byte returned, bytes).
    pub fn read_log(&self, id: &str, offset: u64, max: usize) -> Result<(u64, Vec<u8>), NodeError> {
        let dir = self.log_dir(id);
        crate::logs::read(&dir, offset, max).map_err(io(&dir))
    }

    /// Ends instance `id`'s log relay, waiting up to `wait` for it to drain.
    pub fn stop_relay(&self, id: &str, wait: Duration) {
        crate::logs::stop_relay(&self.cfg.root, &self.logs_dir(), id, wait);
    }

    /// Where the instance's output (container stdout and stderr, a VM's serial console) goes:
    /// a fresh relay's pipe (any relay left from an earlier run is ended first), or the segment
    /// file itself without a relay binary.
    pub fn container_output(&self, id: &str) -> Result<std::os::fd::OwnedFd, NodeError> {
        use std::os::unix::fs::DirBuilderExt;
        let logs = self.logs_dir();
        let dir = self.log_dir(id);
        // A relay only ever runs for an instance whose log dir exists (it is made here, before
        // any relay starts): a new instance skips the look through every process of the host.
        if dir.exists() {
            crate::logs::stop_relay(&self.cfg.root, &logs, id, Duration::from_secs(2));
        } else {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io(&dir))?;
        }
        match &self.log_limits.relay {
            Some(bin) => {
                crate::logs::start_relay(bin, &logs, id, &self.log_limits).map_err(io(bin))
            }
            None => crate::logs::direct_output(&logs, id).map_err(io(&logs)),
        }
    }

    /// Creates everything the instance needs and starts it, through the plan's runtime.
    /// Idempotent: a running instance is left alone, a stopped or half-made one is replaced.
    pub fn provision(&self, plan: &InstancePlan) -> Result<(), NodeError> {
        let rt = self.runtime(plan.runtime)?;
        let mut t = StepTimer::new(&plan.id);
        let r = rt.provision(self, plan, &mut t);
        t.log(r.is_ok());
        r
    }

    /// The micro-VM runtime, or why the host has none.
    pub fn vm(&self) -> Result<&crate::vm::runtime::VmRuntime, NodeError> {
        self.runtime(RuntimeKind::Vm)?
            .as_vm()
            .ok_or_else(|| NodeError::RuntimeUnavailable {
                kind: RuntimeKind::Vm,
                why: "not the micro-VM runtime".into(),
            })
    }

    /// Live-migrates running instance `id` to a new process of this host (VMs).
    pub fn migrate(
        &self,
        id: &str,
        ask: &crate::vm::migrate::MigrateAsk,
    ) -> Result<gpuvisor_wire::MigrationReport, NodeError> {
        self.runtime_of(id).migrate(self, id, ask)
    }

    /// Finishes or undoes a migration of `ask.id` a killed daemon left half done (every
    /// runtime is asked; `ask` has the instance's CPUs and disk limits); says what was done.
    pub fn recover_migration(&self, ask: &crate::vm::migrate::MigrateAsk) -> Option<String> {
        self.runtimes()
            .find_map(|rt| rt.recover_migration(self, ask))
    }

    /// Stops instance `id` through its runtime: asks it to end, waits up to `grace`, ends it.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<(), NodeError> {
        self.runtime_of(id).stop(self, id, grace)
    }

    /// One telemetry reading of instance `id`: its cgroup, and what its runtime reads of its
    /// storage and network.
    pub fn instance_reading(&self, id: &str) -> crate::telemetry::InstanceReading {
        let usage = self.runtime_of(id).usage(self, id);
        crate::telemetry::instance_reading(&self.cfg.root, id, usage)
    }

    /// The pid of instance `id`'s main process as its runtime recorded it.
    pub fn main_pid(&self, id: &str) -> Option<i32> {
        self.runtime_of(id).main_pid(self, id)
    }

    /// What instance `id`'s main process said last before it ended ([`Runtime::last_words`]).
    pub fn last_words(&self, id: &str) -> Option<String> {
        self.runtime_of(id).last_words(self, id)
    }

    /// Removes every host object of the instance (container, cgroups, mounts, loop devices,
    /// container disk, netns, veth, bundle). Never touches volume images. Idempotent.
    pub fn teardown(&self, id: &str) -> Result<(), NodeError> {
        // Every runtime's objects: after a crash mid-create the id may have any runtime's.
        for rt in self.runtimes() {
            rt.teardown(self, id)?;
        }
        cgroup::remove(&self.cfg.root, id).map_err(io(Path::new("/sys/fs/cgroup")))?;
        self.disks.detach_volumes(id)?;
        self.disks.teardown_root(id)?;
        self.net.teardown(id)?;
        self.limiters.remove(id)?;
        Ok(())
    }

    /// Freezes (`true`) or thaws a running container: a parked serverless worker keeps its
    /// memory, GPU and warm process but uses no CPU. Containers only.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), NodeError> {
        let oci = &self.container.oci;
        if !oci.may_know(id) {
            return Err(NodeError::Unsupported {
                kind: RuntimeKind::Vm,
                what: "parking (flashboot)".into(),
            });
        }
        Ok(if frozen {
            oci.pause(id)
        } else {
            oci.resume(id)
        }?)
    }

    /// Ids of instances whose main process runs, in every runtime. Spawns no process.
    pub fn running(&self) -> BTreeSet<String> {
        self.runtimes().flat_map(|r| r.running(self)).collect()
    }

    /// Removes the instance's log (on terminate).
    pub fn forget(&self, id: &str) {
        crate::logs::stop_relay(&self.cfg.root, &self.logs_dir(), id, Duration::ZERO);
        let _ = std::fs::remove_dir_all(self.log_dir(id));
    }

    /// One sample for every fractional-GPU instance, from the GPU backend's per-process
    /// readings (NVML; the simulated backend's process tables), processes mapped to instances by
    /// their cgroup:
    /// - each instance's SM utilisation, and for a low-priority instance the summed utilisation
    ///   of the high-priority instances on the same GPU, published into its limiter region (which
    ///   also runs one step of its compute-share controller);
    /// - each instance's GPU memory per GPU as the driver counts it, against its quota: what is
    ///   over (beyond a per-process allowance for the CUDA context when the limiter does not
    ///   charge one) is returned, with the pids, for the engine to act on.
    ///
    /// `instances` lists (id, GPU UUIDs in the instance's CUDA order). `since_us`: utilisation
    /// samples newer than this (µs); the result carries the value for the next call.
    pub fn sample_limiters(
        &self,
        instances: &[(String, Vec<String>)],
        since_us: u64,
    ) -> LimiterSample {
        let mut out = LimiterSample {
            newest_us: since_us,
            over_quota: Vec::new(),
        };
        let mut util: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        let mut mem: BTreeMap<(&str, &str), (u64, Vec<u32>)> = BTreeMap::new();
        let mut owners: BTreeMap<u32, Option<&str>> = BTreeMap::new();
        let mut owner = |pid: u32| -> Option<&str> {
            *owners.entry(pid).or_insert_with(|| {
                let id = cgroup::instance_of(&self.cfg.root, i32::try_from(pid).ok()?)?;
                instances
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(i, _)| i.as_str())
            })
        };
        let uuids: BTreeSet<&str> = instances
            .iter()
            .flat_map(|(_, g)| g.iter().map(String::as_str))
            .collect();
        for &uuid in &uuids {
            for (pid, sm) in self.gpu.process_utilisation(uuid, since_us) {
                if let Some(id) = owner(pid) {
                    *util.entry((id, uuid)).or_default() += sm.saturating_mul(100);
                }
            }
            for (pid, bytes) in self.gpu.process_memory(uuid) {
                if let Some(id) = owner(pid) {
                    let e = mem.entry((id, uuid)).or_default();
                    e.0 = e.0.saturating_add(bytes);
                    e.1.push(pid);
                }
            }
            out.newest_us = out.newest_us.max(now_us());
        }
        // Each instance's region is mapped once for this tick.
        let regions: BTreeMap<&str, gpuvisor_limiter::shm::Region> = instances
            .iter()
            .filter_map(|(id, _)| Some((id.as_str(), self.limiters.region(id)?)))
            .collect();
        let high: BTreeSet<&str> = regions
            .iter()
            .filter(|(_, r)| r.priority() == Priority::High)
            .map(|(id, _)| *id)
            .collect();
        let mut high_load: BTreeMap<&str, u32> = BTreeMap::new();
        for ((id, uuid), bp) in &util {
            if high.contains(id) {
                *high_load.entry(uuid).or_default() += *bp;
            }
        }
        let slack = if self.cfg.limiter_context_bytes > 0 {
            crate::limiter::OVER_QUOTA_SLACK
        } else {
            crate::limiter::OVER_QUOTA_SLACK_UNCHARGED_CONTEXT
        };
        for (id, gpus) in instances {
            let Some(region) = regions.get(id.as_str()) else {
                continue;
            };
            let usage = crate::limiter::region_usage(region).unwrap_or_default();
            for (dev, uuid) in gpus.iter().enumerate() {
                let key = (id.as_str(), uuid.as_str());
                let bp = util.get(&key).copied().unwrap_or(0).min(10_000);
                let others = if high.contains(id.as_str()) {
                    0
                } else {
                    high_load
                        .get(uuid.as_str())
                        .copied()
                        .unwrap_or(0)
                        .min(10_000)
                };
                if let Err(e) = region.publish_sample(dev, bp, others) {
                    tracing::debug!(instance = %id, "limiter sample: {e}");
                }
                let (Some(u), Some((used, pids))) = (usage.get(dev), mem.get(&key)) else {
                    continue;
                };
                // The per-process allowance stops growing at MAX_SLACK_PROCESSES: otherwise a
                // tenant buys VRAM past its quota by opening contexts in ever more processes.
                let counted = pids.len().min(crate::limiter::MAX_SLACK_PROCESSES) as u64;
                let allowed = u.quota_bytes.saturating_add(slack.saturating_mul(counted));
                if *used > allowed {
                    out.over_quota.push(OverQuota {
                        id: id.clone(),
                        uuid: uuid.clone(),
                        used: *used,
                        quota: u.quota_bytes,
                        pids: pids.clone(),
                    });
                }
            }
        }
        out
    }

    /// SIGKILLs `pids` that are still processes of instance `id` (the cgroup is read again
    /// right before each kill, so a recycled pid of another process is left alone). Returns the
    /// pids killed.
    pub fn kill_instance_processes(&self, id: &str, pids: &[u32]) -> Vec<u32> {
        let mut killed = Vec::new();
        for &pid in pids {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            if !cgroup::holds(&self.cfg.root, id, raw) {
                continue;
            }
            let signalled = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
            if signalled.is_ok() {
                killed.push(pid);
            }
        }
        killed
    }

    /// Instance ids with host objects, split into those with a trace in *this* daemon's data
    /// dir or runtime root (certainly ours) and those seen only in host-wide namespaces
    /// (cgroups, netns, veths), which may belong to another gpuvisor on the same host.
    pub fn ids_with_objects(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), NodeError> {
        let mut local = BTreeSet::new();
        for rt in self.runtimes() {
            local.extend(rt.local_ids(self)?);
        }
        local.extend(self.disks.instances_with_objects()?);
        local.extend(self.limiters.ids());
        local.extend(
            crate::logs::relay_processes(&self.cfg.root, &self.logs_dir())
                .into_iter()
                .map(|(_, id)| id),
        );
        let mut global = cgroup::instance_ids(&self.cfg.root);
        global.extend(self.net.instances_with_objects()?);
        global.retain(|id| !local.contains(id));
        Ok((local, global))
    }
}

impl Node {
    /// See [`Runtime::exec_command`].
    pub fn exec_command(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        self.runtime_of(id).exec_command(self, id, args, env, stdin)
    }

    /// See [`Runtime::exec_pipes_command`].
    pub fn exec_pipes_command(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        self.runtime_of(id)
            .exec_pipes_command(self, id, args, env, stdin)
    }

    /// See [`Runtime::exec_tty_command`].
    pub fn exec_tty_command(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
    ) -> Result<ExecTty, NodeError> {
        self.runtime_of(id).exec_tty_command(self, id, args, env)
    }

    /// See [`Runtime::kill_exec`].
    pub fn kill_exec(&self, id: &str, pid_file: &Path) -> usize {
        self.runtime_of(id).kill_exec(self, id, pid_file)
    }

    /// See [`Runtime::kill_orphaned_exec`].
    pub fn kill_orphaned_exec(&self, id: &str, pid_file: &Path) -> usize {
        self.runtime_of(id).kill_orphaned_exec(self, id, pid_file)
    }

    /// See [`Runtime::console`].
    pub fn console(&self, id: &str) -> Result<PathBuf, NodeError> {
        self.runtime_of(id).console(self, id)
    }

    /// `gpuvisor host check` as the daemon sees this host (the web console's GPUs page): the
    /// same checks, from the node's root. Blocking (it reads sysfs and asks NVML).
    pub fn host_checks(&self) -> Vec<crate::hostcheck::Check> {
        let root = &self.cfg.root;
        crate::hostcheck::check(root, &crate::hostcheck::NvmlFacts::probe(root))
    }

    /// See [`Runtime::display`].
    pub fn display(&self, id: &str) -> Result<PathBuf, NodeError> {
        self.runtime_of(id).display(self, id)
    }
}

/// A terminal exec, ready to start: see [`Node::exec_tty_command`].
#[derive(Debug)]
pub struct ExecTty {
    pub shim: std::process::Command,
    pub pid_file: PathBuf,
    pub socket: crate::console::ConsoleSocket,
}

/// A random tag naming one exec's files.
pub(crate) fn exec_tag() -> Result<String, NodeError> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| NodeError::Io {
        path: PathBuf::from("getrandom"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(nonce.iter().map(|b| format!("{b:02x}")).collect())
}

/// Durations of the provisioning steps of one instance, logged as one debug line with target
/// `gpuvisor_timings` (enable with `GPUVISOR_LOG=info,gpuvisor_timings=debug`); the benchmark
/// `bench/create_steps.py` reads it. Costs a clock read per step.
pub struct StepTimer<'a> {
    id: &'a str,
    start_us: u64,
    start: Instant,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl<'a> StepTimer<'a> {
    fn new(id: &'a str) -> Self {
        let now = Instant::now();
        Self {
            id,
            start_us: now_us(),
            start: now,
            last: now,
            steps: Vec::with_capacity(12),
        }
    }

    /// A step that ran alongside others (on another thread), with its own duration.
    pub fn record(&mut self, name: &'static str, d: Duration) {
        self.steps.push((name, d));
    }

    /// Ends step `name` (it began where the previous one ended).
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }

    fn log(&self, ok: bool) {
        if !tracing::enabled!(target: "gpuvisor_timings", tracing::Level::DEBUG) {
            return;
        }
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(n, d)| format!("{n}={}", d.as_micros()))
            .collect();
        tracing::debug!(
            target: "gpuvisor_timings",
            "provision {} ok={ok} start_us={} total_us={} {}",
            self.id,
            self.start_us,
            self.start.elapsed().as_micros(),
            steps.join(" ")
        );
    }
}

/// Subtrees of the data dir, each holding tenant data or secrets: bundles (config.json carries
/// the instance's env), logs, instance mounts, disk and volume images, images, the runtime's
/// state, limiter regions, simulated device nodes.
pub const PRIVATE_SUBDIRS: &[&str] = &[
    "bundles",
    "logs",
    "instances",
    "disks",
    "volumes",
    "images",
    "run",
    "limiter",
    "dev",
];

/// Makes the data dir 0711 or tighter and each of [`PRIVATE_SUBDIRS`] 0700, creating what is
/// missing and tightening what an older version (or an operator's umask) left open. Files inside
/// need no mode of their own: no other host user can reach them.
pub fn private_data_dir(d: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let tighten = |p: &Path, keep: u32| -> Result<(), NodeError> {
        let mode = std::fs::metadata(p).map_err(io(p))?.permissions().mode() & 0o7777;
        if mode & !keep != 0 {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & keep))
                .map_err(io(p))?;
        }
        Ok(())
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(d)
        .map_err(io(d))?;
    tighten(d, 0o711)?;
    for sub in PRIVATE_SUBDIRS {
        let p = d.join(sub);
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&p)(e)),
        }
        tighten(&p, 0o700)?;
    }
    Ok(())
}

/// Our AppArmor profile, modelled on Docker's `docker-default`: no mounts, no writes to
/// /proc/sys or /sys, no ptrace of processes outside the profile.
const APPARMOR_PROFILE: &str = r#"#include <tunables/global>
profile gpuvisor-default flags=(attach_disconnected,mediate_deleted) {
  #include <abstractions/base>
  network,
  capability,
  file,
  umount,
  signal (receive) peer=unconfined,
  signal (send,receive) peer=gpuvisor-default,
  deny @{PROC}/* w,
  deny @{PROC}/{[^1-9],[^1-9][^0-9],[^1-9s][^0-9y][^0-9s],[^1-9][^0-9][^0-9][^0-9/]*}/** w,
  deny @{PROC}/sys/[^k]** w,
  deny @{PROC}/sys/kernel/{?,??,[^s][^h][^m]**} w,
  deny @{PROC}/sysrq-trigger rwklx,
  deny @{PROC}/kcore rwklx,
  deny mount,
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/kernel/security/** rwklx,
  ptrace (trace,read,tracedby,readby) peer=gpuvisor-default,
}
"#;

/// Detects AppArmor and makes sure our profile is loaded; `None` (with a logged note) where the
/// host has no AppArmor or the profile cannot be loaded.
fn apparmor_profile(root: &HostRoot, data_dir: &Path) -> Option<String> {
    let enabled = root
        .read_trimmed("/sys/module/apparmor/parameters/enabled")
        .is_some_and(|v| v == "Y");
    if !enabled {
        tracing::info!("AppArmor is not enabled on this host: instances run without a profile");
        return None;
    }
    let loaded = |name: &str| {
        std::fs::read_to_string(root.path("/sys/kernel/security/apparmor/profiles"))
            .is_ok_and(|p| p.lines().any(|l| l.starts_with(name)))
    };
    if !loaded("gpuvisor-default") {
        let file = data_dir.join("apparmor-gpuvisor-default");
        let load = std::fs::write(&file, APPARMOR_PROFILE)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                crate::cmd::run(
                    "apparmor_parser",
                    [std::ffi::OsStr::new("-r"), file.as_os_str()],
                )
                .map_err(|e| e.to_string())
            });
        if let Err(e) = load {
            tracing::warn!("cannot load the gpuvisor-default AppArmor profile ({e}): instances run without one");
            return None;
        }
    }
    Some("gpuvisor-default".to_string())
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The host's resolver unless it points at a loopback stub the container cannot reach.
pub(crate) fn resolv_conf(root: &HostRoot) -> String {
    let host = std::fs::read_to_string(root.path("/etc/resolv.conf")).unwrap_or_default();
    let usable: Vec<&str> = host
        .lines()
        .filter(|l| l.starts_with("nameserver") && !l.contains("127.") && !l.contains("::1"))
        .collect();
    if usable.is_empty() {
        "nameserver 1.1.1.1\nnameserver 8.8.8.8\n".to_string()
    } else {
        format!("{}\n", usable.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_is_made_private_and_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        private_data_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o711);
        for sub in PRIVATE_SUBDIRS {
            assert_eq!(mode(&d.join(sub)), 0o700, "{sub}");
        }
        // An operator's (or an older version's) open tree is tightened; 0700 stays 0700.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.join("logs"), std::fs::Permissions::from_mode(0o755)).unwrap();
        private_data_dir(&d).unwrap();
        assert_eq!((mode(&d), mode(&d.join("logs"))), (0o711, 0o700));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        private_data_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }
}
