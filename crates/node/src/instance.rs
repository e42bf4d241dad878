//! One instance on this host, end to end: the order in which disks, network, bundle and
//! container are created and removed. Every step is idempotent and every removal tolerates a
//! half-created instance, so the reconciler can call [`Node::provision`] or [`Node::teardown`]
//! again after a crash at any point and converge.

use crate::disk::{DiskError, Disks};
use crate::gpu::{BackendKind, GpuBackend, GpuConfig, GpuDevice, GpuError};
use crate::image::{ImageError, ImageStore};
use crate::limiter::{GpuShare, Limiters, OverQuota};
use crate::logs::LogLimits;
use crate::net::{NetConfig, NetError, NetPolicy, Network, TenantNet};
use crate::rootfs::Rootfs;
use crate::runtime::{BindMount, BundleSpec, OciRuntime, RuntimeError};
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
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("GPU {0} is not on this host")]
    UnknownGpu(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
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
}

/// Everything the engine decided for one instance.
#[derive(Debug, Clone)]
pub struct InstancePlan {
    pub id: String,
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
    /// UUIDs of the GPUs bound to the instance.
    pub gpus: Vec<String>,
    /// For a fractional GPU: the limits of each GPU in `gpus` order (empty for whole GPUs).
    pub gpu_shares: Vec<GpuShare>,
    pub priority: Priority,
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
    pub runtime: OciRuntime,
    pub limiters: Limiters,
    /// The AppArmor profile for instances, where the host has AppArmor.
    pub apparmor: Option<String>,
    /// How host attributes (sysfs: VFIO binding) are written: the real files unless replaced
    /// with [`Node::with_sys_writer`].
    sys: Arc<dyn SysWriter + Send + Sync>,
    /// Instance log cap, disk reserve and relay binary ([`crate::logs`]).
    log_limits: LogLimits,
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
        let net = Network::new(NetConfig {
            plan: cfg.net_plan,
            nat: cfg.nat,
            policy,
            // DNS to the resolvers instances are given stays open.
            dns: crate::net::nameservers(&resolv_conf(&cfg.root)),
        })?;
        net.init_host()?;
        let runtime = OciRuntime::probe(&cfg.runtime, &d.join("run").join("runc"))?;
        let apparmor = apparmor_profile(&cfg.root, d);
        let lib = crate::limiter::locate_library(cfg.limiter_lib.as_deref());
        match &lib {
            Some(p) => {
                tracing::info!(library = %p.display(), "GPU limiter available for fractional GPUs")
            }
            None => tracing::warn!("libgpuvisor_limiter.so not found: fractional GPUs are refused"),
        }
        let limiters = Limiters::new(d, lib, cfg.limiter_context_bytes);
        Ok(Self {
            cfg,
            gpu,
            gpus: std::sync::RwLock::new(gpus),
            mig,
            images,
            disks,
            net,
            runtime,
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

    /// The writer of host attributes (sysfs), for the VFIO commands.
    pub fn sys_writer(&self) -> Arc<dyn SysWriter + Send + Sync> {
        self.sys.clone()
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

    /// Where the container's stdout and stderr go: a fresh relay's pipe (any relay left from
    /// an earlier run is ended first), or the segment file itself without a relay binary.
    fn container_output(&self, id: &str) -> Result<std::os::fd::OwnedFd, NodeError> {
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

    /// Creates everything the instance needs and starts it. Idempotent: a running container is
    /// left alone, a created-but-stopped one is replaced.
    pub fn provision(&self, plan: &InstancePlan) -> Result<(), NodeError> {
        let mut t = StepTimer::new(&plan.id);
        let r = self.provision_steps(plan, &mut t);
        t.log(r.is_ok());
        r
    }

    fn provision_steps(&self, plan: &InstancePlan, t: &mut StepTimer) -> Result<(), NodeError> {
        let id = plan.id.as_str();
        // A fresh instance has no runtime state: skip asking the runtime about it.
        if self.runtime.may_know(id) {
            if let Some(st) = self.runtime.state(id)? {
                if st.status == "running" {
                    return Ok(());
                }
                self.runtime.delete(id, true)?;
            }
        }
        t.mark("runtime_state");
        // The log relay (a fork and exec of our own binary) starts meanwhile, on another
        // thread; if a step fails, its pipe is closed unused and it ends at end of file.
        std::thread::scope(|s| {
            let relay = s.spawn(|| self.container_output(id));
            let bundle = self.prepare(plan, t);
            let output = relay.join().unwrap_or_else(|_| {
                Err(io(Path::new("log relay"))(std::io::Error::other(
                    "panicked",
                )))
            });
            let bundle = bundle?;
            let output = output?;
            t.mark("log_relay_wait");
            // `output` is closed here whatever happens: on failure the relay sees end of file.
            self.runtime.run_detached(id, &bundle, output)?;
            t.mark("runc_run");
            Ok(())
        })
    }

    /// Everything before `runc run`: network, disks, /etc, volumes, devices, bundle. Returns
    /// the bundle dir.
    fn prepare(&self, plan: &InstancePlan, t: &mut StepTimer) -> Result<PathBuf, NodeError> {
        let id = plan.id.as_str();
        let tnet = TenantNet {
            slot: plan.net_slot,
        };
        let layers: Vec<PathBuf> = plan
            .layers
            .iter()
            .rev()
            .map(|l| self.images.layer_dir(l))
            .collect();
        // The network (netns, veth) and the disk (loop device, ext4, overlay) are independent
        // kernel work: the network is made on a second thread meanwhile. If either fails, the
        // caller's teardown removes what the other made.
        let (net, root, disk_time) = std::thread::scope(|s| {
            let net = s.spawn(|| {
                let t0 = Instant::now();
                let r = self
                    .net
                    .ensure_tenant(&tnet)
                    .and_then(|()| self.net.setup(id, &tnet, plan.ip_host));
                (r, t0.elapsed())
            });
            let t0 = Instant::now();
            let root = self.disks.provision_root(id, plan.disk_size, &layers);
            let disk_time = t0.elapsed();
            (net.join(), root, disk_time)
        });
        let (netns, net_time) = net.map_err(|_| {
            io(Path::new("instance network"))(std::io::Error::other("the thread panicked"))
        })?;
        t.record("netns_veth", net_time);
        t.record("disk_overlay", disk_time);
        t.mark("net_disk_wall");
        let netns = netns?;
        let root = root?;
        // Every host-side access to the rootfs goes through this handle: resolved inside it.
        let rootfs = Rootfs::open(&root.rootfs)?;
        self.write_etc(&rootfs, plan)?;
        t.mark("etc_files");

        let mut binds = Vec::new();
        for (name, path) in &plan.volumes {
            let src = self.disks.attach_volume(id, &plan.tenant_id, name)?;
            binds.push(BindMount {
                source: src,
                destination: path.clone(),
                readonly: false,
            });
        }
        t.mark("volumes");
        let mut devices = Vec::new();
        let mut uuids = Vec::new();
        let inventory = self.gpus();
        for uuid in &plan.gpus {
            let g = inventory
                .iter()
                .find(|g| &g.uuid == uuid && g.schedulable())
                .ok_or_else(|| NodeError::UnknownGpu(uuid.clone()))?;
            for n in g.device_nodes() {
                if !devices.contains(&n) {
                    devices.push(n);
                }
            }
            uuids.push(g.uuid.clone());
        }
        if !plan.gpu_shares.is_empty() {
            // `/etc` is bound onto itself (see `limiter`): the source is a host path, so it must
            // be the rootfs's own directory, never a symlink the host would follow.
            let etc = root.rootfs.join("etc");
            if !std::fs::symlink_metadata(&etc).is_ok_and(|m| m.is_dir()) {
                return Err(NodeError::Rootfs(crate::rootfs::RootfsError::Image {
                    path: "/etc".into(),
                    why: "is not a directory: a GPU fraction needs a real /etc to hold the limiter"
                        .into(),
                }));
            }
            binds.extend(
                self.limiters
                    .prepare(id, &plan.gpu_shares, plan.priority, &etc)?,
            );
        }
        if !devices.is_empty() {
            devices.extend(self.gpu.control_devices());
            for (host, container) in self.gpu.driver_files() {
                binds.push(BindMount {
                    source: host,
                    destination: container,
                    readonly: true,
                });
            }
        }
        let mut env = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            format!("HOSTNAME={}", plan.hostname),
        ];
        // Defence in depth behind the API's refusal: no stored entry may carry a platform-owned
        // name, and ours come last, so they win wherever duplicates are resolved.
        env.extend(
            plan.env
                .iter()
                .filter(|kv| {
                    !gpuvisor_wire::platform_env(kv.split_once('=').map_or(kv.as_str(), |(k, _)| k))
                })
                .cloned(),
        );
        env.push(format!("GPUVISOR_INSTANCE_ID={id}"));
        env.push(format!("GPUVISOR_GPU_COUNT={}", uuids.len()));
        if !uuids.is_empty() {
            env.push(format!("NVIDIA_VISIBLE_DEVICES={}", uuids.join(",")));
            env.push(format!("CUDA_VISIBLE_DEVICES={}", uuids.join(",")));
        }
        t.mark("gpus_limiter");
        let image_cfg = self.images.config(&plan.image_digest)?;
        let cwd = image_cfg
            .as_ref()
            .and_then(|c| c.working_dir.clone())
            .unwrap_or_default();
        let (uid, gid) = match image_cfg.as_ref().and_then(|c| c.user.as_deref()) {
            Some(u) if !u.is_empty() => resolve_user(&rootfs, u)?,
            _ => (0, 0),
        };
        let spec = BundleSpec {
            id: id.to_string(),
            rootfs: root.rootfs.clone(),
            hostname: plan.hostname.clone(),
            args: plan.args.clone(),
            env,
            cwd,
            uid,
            gid,
            cpus: plan.cpus.clone(),
            memory: plan.memory,
            pids_limit: self.cfg.pids_limit,
            netns: Some(netns),
            devices,
            binds,
            cgroup_path: cgroup::instance_path(id),
            apparmor_profile: self.apparmor.clone(),
            seccomp: true,
        };
        let bundle = self.bundle_dir(id);
        crate::runtime::write_bundle(&bundle, &spec)?;
        t.mark("bundle");
        Ok(bundle)
    }

    /// /etc/hostname, /etc/hosts and /etc/resolv.conf inside the (ephemeral) rootfs. Whatever
    /// the image has there (a file, a symlink to anywhere) is replaced, never followed; an /etc
    /// that is not a directory inside the image is an error naming it.
    fn write_etc(&self, rootfs: &Rootfs, plan: &InstancePlan) -> Result<(), NodeError> {
        let ip = self.net.address(
            &TenantNet {
                slot: plan.net_slot,
            },
            plan.ip_host,
        )?;
        let files = [
            ("hostname", format!("{}\n", plan.hostname)),
            (
                "hosts",
                format!(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost\n{ip}\t{}\n",
                    plan.hostname
                ),
            ),
            ("resolv.conf", resolv_conf(&self.cfg.root)),
        ];
        for (name, text) in files {
            rootfs.replace_file("etc", name, text.as_bytes())?;
        }
        Ok(())
    }

    /// Stops the container: SIGTERM, then SIGKILL after `grace`, then deletes it.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<(), NodeError> {
        if let Some(st) = self.runtime.state(id)? {
            if st.status == "running" {
                self.runtime.kill(id, "TERM", false)?;
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    match self.runtime.state(id)? {
                        Some(s) if s.status == "running" => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        _ => break,
                    }
                }
                self.runtime.kill(id, "KILL", true)?;
            }
            self.runtime.delete(id, true)?;
        }
        Ok(())
    }

    /// Removes every host object of the instance (container, cgroups, mounts, loop devices,
    /// container disk, netns, veth, bundle). Never touches volume images. Idempotent.
    pub fn teardown(&self, id: &str) -> Result<(), NodeError> {
        self.runtime.delete(id, true)?;
        // The container is gone: its relay reaches end of file and exits; wait for it.
        crate::logs::stop_relay(&self.cfg.root, &self.logs_dir(), id, Duration::from_secs(5));
        cgroup::remove(&self.cfg.root, id).map_err(io(Path::new("/sys/fs/cgroup")))?;
        self.disks.detach_volumes(id)?;
        self.disks.teardown_root(id)?;
        self.net.teardown(id)?;
        self.limiters.remove(id)?;
        let bundle = self.bundle_dir(id);
        match std::fs::remove_dir_all(&bundle) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&bundle)(e)),
        }
    }

    /// Removes the instance's log (on terminate).
    pub fn forget(&self, id: &str) {
        crate::logs::stop_relay(&self.cfg.root, &self.logs_dir(), id, Duration::ZERO);
        let _ = std::fs::remove_dir_all(self.log_dir(id));
    }

    /// Status of every container gpuvisor runs, by instance id.
    pub fn containers(&self) -> Result<BTreeMap<String, String>, NodeError> {
        Ok(self
            .runtime
            .list()?
            .into_iter()
            .map(|c| (c.id, c.status))
            .collect())
    }

    /// Ids of instances whose container is running: the init pid the runtime wrote to the
    /// bundle's pid file is alive, not a zombie, and in the instance's cgroup (so a recycled pid
    /// is not mistaken for it). Spawns no process: the reconciler calls this every second, and
    /// `runc list` would cost about a millisecond per container.
    pub fn running(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("bundles")) else {
            return out;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = std::fs::read_to_string(e.path().join("pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let proc_dir = self.cfg.root.path(format!("/proc/{pid}"));
            let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']));
            let ours = i32::try_from(pid).is_ok_and(|p| cgroup::holds(&self.cfg.root, &id, p));
            if !stat.is_empty() && !zombie && ours {
                out.insert(id);
            }
        }
        out
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
        let mut local: BTreeSet<String> = self.containers()?.into_keys().collect();
        local.extend(self.disks.instances_with_objects()?);
        local.extend(self.limiters.ids());
        local.extend(
            crate::logs::relay_processes(&self.cfg.root, &self.logs_dir())
                .into_iter()
                .map(|(_, id)| id),
        );
        if let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("bundles")) {
            local.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        let mut global = cgroup::instance_ids(&self.cfg.root);
        global.extend(self.net.instances_with_objects()?);
        global.retain(|id| !local.contains(id));
        Ok((local, global))
    }

    /// One exec's pid file and console socket path, in the instance's bundle (so teardown
    /// removes them), named by a random tag.
    fn exec_files(&self, id: &str) -> Result<(PathBuf, PathBuf), NodeError> {
        let tag = exec_tag()?;
        let bundle = self.bundle_dir(id);
        Ok((
            bundle.join(format!("exec-{tag}.pid")),
            bundle.join(format!("exec-{tag}.sock")),
        ))
    }

    /// The `runc exec` command for `args` in instance `id` and the file it writes the
    /// command's pid to (in the bundle, so teardown removes it). See
    /// [`crate::runtime::OciRuntime::exec_command`].
    pub fn exec_command(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        let (pid_file, _) = self.exec_files(id)?;
        Ok((
            self.runtime.exec_command(id, args, env, &pid_file, stdin),
            pid_file,
        ))
    }

    /// An exec of `args` in instance `id` on pipes, run by the exec shim ([`crate::console`],
    /// `--pipes`) so that the command's tree dies with the daemon: the shim's command (stdin
    /// piped when `stdin`, stdout and stderr piped, its own process group; its exit status is
    /// the command's) and the pid file.
    pub fn exec_pipes_command(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        use std::os::unix::process::CommandExt;
        let shim = self.shim_binary()?;
        let (pid_file, _) = self.exec_files(id)?;
        let argv = self.runtime.exec_argv(id, args, env, &pid_file);
        let mut cmd = std::process::Command::new(shim);
        cmd.arg(crate::console::SHIM_SUBCOMMAND)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--instance")
            .arg(id)
            .arg("--pipes")
            .arg("--")
            .args(argv)
            .stdin(if stdin {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        Ok((cmd, pid_file))
    }

    fn shim_binary(&self) -> Result<PathBuf, NodeError> {
        self.log_limits.relay.clone().ok_or_else(|| NodeError::Io {
            path: PathBuf::from(crate::console::SHIM_SUBCOMMAND),
            source: std::io::Error::other(
                "no gpuvisor binary configured for the exec shim (daemon without a relay binary)",
            ),
        })
    }

    /// An exec of `args` in instance `id` on a terminal ([`crate::console`]): the exec shim's
    /// command (this binary; stdout and stderr piped, its own process group), the pid file, and
    /// the console socket the runtime sends the pty master to (both in the bundle).
    pub fn exec_tty_command(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
    ) -> Result<ExecTty, NodeError> {
        use std::os::unix::process::CommandExt;
        let shim = self.shim_binary()?;
        let (pid_file, sock_path) = self.exec_files(id)?;
        let socket = crate::console::ConsoleSocket::bind(&sock_path).map_err(io(&sock_path))?;
        let argv = self
            .runtime
            .exec_tty_argv(id, args, env, &pid_file, &sock_path);
        let mut cmd = std::process::Command::new(shim);
        cmd.arg(crate::console::SHIM_SUBCOMMAND)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--instance")
            .arg(id)
            .arg("--")
            .args(argv)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Not in the daemon's process group: a ^C at the daemon's terminal is not for it.
            .process_group(0);
        Ok(ExecTty {
            shim: cmd,
            pid_file,
            socket,
        })
    }

    /// [`Node::kill_exec`] of an exec whose shim died: its processes were orphaned to the
    /// daemon (the child subreaper), so the ones that are its children now are reaped here
    /// (a zombie would hold the instance's cgroup until the next sweeps).
    pub fn kill_orphaned_exec(&self, id: &str, pid_file: &Path) -> usize {
        let pid = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        let killed = pid.map_or_else(Vec::new, |p| {
            crate::runtime::kill_exec_tree_pids(&self.cfg.root, id, p)
        });
        let _ = std::fs::remove_file(pid_file);
        let me = std::process::id().to_string();
        for p in &killed {
            // Only our own children (a killed pid is not reused before it is reaped).
            let parent = std::fs::read_to_string(self.cfg.root.path(format!("/proc/{p}/stat")))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().nth(1)?.to_string()));
            if parent.as_deref() == Some(me.as_str()) {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*p), None);
            }
        }
        killed.len()
    }

    /// Kills the process tree of an exec (its pid from `pid_file`, which is removed). Returns
    /// how many processes were killed; 0 when the command had not started or already ended.
    pub fn kill_exec(&self, id: &str, pid_file: &Path) -> usize {
        let pid = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        let n = pid.map_or(0, |p| crate::runtime::kill_exec_tree(&self.cfg.root, id, p));
        let _ = std::fs::remove_file(pid_file);
        n
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
fn exec_tag() -> Result<String, NodeError> {
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
struct StepTimer<'a> {
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
    fn record(&mut self, name: &'static str, d: Duration) {
        self.steps.push((name, d));
    }

    /// Ends step `name` (it began where the previous one ended).
    fn mark(&mut self, name: &'static str) {
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

/// Largest /etc/passwd or /etc/group read from an image.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// Resolves an image's `User` (`name`, `uid`, `name:group`, `uid:gid`) against the rootfs's
/// own /etc/passwd and /etc/group, as Docker does; a name the image does not define is an error.
/// The files are read through [`Rootfs`], so a link to a host file is resolved inside the image.
fn resolve_user(rootfs: &Rootfs, user: &str) -> Result<(u32, u32), NodeError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = rootfs.read_file("etc/passwd", MAX_ACCOUNT_FILE)?;
    let group = rootfs.read_file("etc/group", MAX_ACCOUNT_FILE)?;
    // The numeric fields 2 and 3 of the named line: uid, gid in passwd; gid in group.
    let lookup = |text: &Option<Vec<u8>>, name: &str| -> Option<(u32, Option<u32>)> {
        let text = String::from_utf8_lossy(text.as_deref()?);
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() != Some(&name) {
                return None;
            }
            Some((
                f.get(2)?.parse().ok()?,
                f.get(3).and_then(|v| v.parse().ok()),
            ))
        })
    };
    let unknown = |what: &str| {
        NodeError::Rootfs(crate::rootfs::RootfsError::Image {
            path: "/etc/passwd".into(),
            why: format!(
                "and /etc/group do not define user {what:?}, the User in the image's config (links there are resolved inside the image)"
            ),
        })
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, lookup(&passwd, u).and_then(|p| p.1).unwrap_or(uid)),
        Err(_) => match lookup(&passwd, u) {
            Some((uid, gid)) => (uid, gid.unwrap_or(uid)),
            None => return Err(unknown(u)),
        },
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&group, g).map(|p| p.0).ok_or_else(|| unknown(g))?,
        },
    };
    Ok((uid, gid))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The host's resolver unless it points at a loopback stub the container cannot reach.
fn resolv_conf(root: &HostRoot) -> String {
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

    #[test]
    fn resolves_image_users() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\njovyan:x:1000:100::/home/jovyan:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nusers:x:100:\nstaff:x:50:\n",
        )
        .unwrap();
        let r = Rootfs::open(d.path()).unwrap();
        assert_eq!(resolve_user(&r, "jovyan").unwrap(), (1000, 100));
        assert_eq!(resolve_user(&r, "jovyan:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(&r, "1234").unwrap(), (1234, 1234));
        assert_eq!(resolve_user(&r, "1000:7").unwrap(), (1000, 7));
        let e = resolve_user(&r, "nobody").unwrap_err().to_string();
        assert!(e.contains("\"nobody\"") && e.contains("/etc/passwd"), "{e}");
    }
}
