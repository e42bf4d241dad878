//! One instance on this host, end to end: the order in which disks, network, bundle and
//! container are created and removed. Every step is idempotent and every removal tolerates a
//! half-created instance, so the reconciler can call [`Node::provision`] or [`Node::teardown`]
//! again after a crash at any point and converge.

use crate::disk::{DiskError, Disks};
use crate::gpu::{BackendKind, GpuBackend, GpuConfig, GpuDevice, GpuError};
use crate::image::{ImageError, ImageStore};
use crate::net::{NetConfig, NetError, Network, TenantNet};
use crate::runtime::{BindMount, BundleSpec, ExecOutput, OciRuntime, RuntimeError};
use crate::{cgroup, HostRoot};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
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
    pub net_pool: Ipv4Addr,
    pub nat: bool,
    pub pids_limit: i64,
    pub root: HostRoot,
}

/// Everything the engine decided for one instance.
#[derive(Debug, Clone, Default)]
pub struct InstancePlan {
    pub id: String,
    pub tenant_id: String,
    pub hostname: String,
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
}

/// The host: its GPUs, image store, disks, network and OCI runtime.
pub struct Node {
    pub cfg: NodeConfig,
    pub gpu: Box<dyn GpuBackend>,
    pub gpus: Vec<GpuDevice>,
    pub images: ImageStore,
    pub disks: Disks,
    pub net: Network,
    pub runtime: OciRuntime,
    /// Whether the host has AppArmor (profiles applied only then).
    pub apparmor: bool,
}

impl Node {
    /// Probes the host: GPU backend, runtime binary, network base rules.
    pub fn open(cfg: NodeConfig) -> Result<Self, NodeError> {
        let d = &cfg.data_dir;
        for sub in ["bundles", "logs", "instances", "disks", "volumes"] {
            let p = d.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let gpu = crate::gpu::probe(
            &GpuConfig {
                simulate: cfg.simulate_gpus.clone(),
                sim_dev_dir: d.join("dev"),
            },
            &cfg.root,
        )?;
        let gpus = gpu.devices()?;
        let images = ImageStore::open(d.join("images"))?;
        let disks = Disks::new(d.clone());
        let net = Network::new(NetConfig {
            pool: cfg.net_pool,
            nat: cfg.nat,
        });
        net.init_host()?;
        let runtime = OciRuntime::probe(&cfg.runtime, &d.join("run").join("runc"))?;
        let apparmor = cfg
            .root
            .read_trimmed("/sys/module/apparmor/parameters/enabled")
            .is_some_and(|v| v == "Y");
        if !apparmor {
            tracing::info!("AppArmor is not enabled on this host: instances run without a profile");
        }
        Ok(Self {
            cfg,
            gpu,
            gpus,
            images,
            disks,
            net,
            runtime,
            apparmor,
        })
    }

    pub fn backend(&self) -> BackendKind {
        self.gpu.kind()
    }

    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("bundles").join(id)
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("logs").join(format!("{id}.log"))
    }

    /// Creates everything the instance needs and starts it. Idempotent: a running container is
    /// left alone, a created-but-stopped one is replaced.
    pub fn provision(&self, plan: &InstancePlan) -> Result<(), NodeError> {
        let id = plan.id.as_str();
        if let Some(st) = self.runtime.state(id)? {
            if st.status == "running" {
                return Ok(());
            }
            self.runtime.delete(id, true)?;
        }
        let tnet = TenantNet {
            slot: plan.net_slot,
        };
        self.net.ensure_tenant(&tnet)?;
        let netns = self.net.setup(id, &tnet, plan.ip_host)?;

        let layers: Vec<PathBuf> = plan
            .layers
            .iter()
            .rev()
            .map(|l| self.images.layer_dir(l))
            .collect();
        let root = self.disks.provision_root(id, plan.disk_size, &layers)?;
        self.write_etc(&root.rootfs, plan)?;

        let mut binds = Vec::new();
        for (name, path) in &plan.volumes {
            let src = self.disks.attach_volume(id, &plan.tenant_id, name)?;
            binds.push(BindMount {
                source: src,
                destination: path.clone(),
                readonly: false,
            });
        }
        let mut devices = Vec::new();
        let mut uuids = Vec::new();
        for uuid in &plan.gpus {
            let g = self
                .gpus
                .iter()
                .find(|g| &g.uuid == uuid)
                .ok_or_else(|| NodeError::UnknownGpu(uuid.clone()))?;
            devices.push(g.node.clone());
            uuids.push(g.uuid.clone());
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
            format!("GPUVISOR_INSTANCE_ID={id}"),
            format!("GPUVISOR_GPU_COUNT={}", uuids.len()),
        ];
        if !uuids.is_empty() {
            env.push(format!("NVIDIA_VISIBLE_DEVICES={}", uuids.join(",")));
            env.push(format!("CUDA_VISIBLE_DEVICES={}", uuids.join(",")));
        }
        env.extend(plan.env.iter().cloned());
        let spec = BundleSpec {
            id: id.to_string(),
            rootfs: root.rootfs.clone(),
            hostname: plan.hostname.clone(),
            args: plan.args.clone(),
            env,
            cpus: plan.cpus.clone(),
            memory: plan.memory,
            pids_limit: self.cfg.pids_limit,
            netns: Some(netns),
            devices,
            binds,
            cgroup_path: cgroup::instance_path(id),
            apparmor_profile: self.apparmor.then(|| "docker-default".to_string()),
            seccomp: true,
        };
        let bundle = self.bundle_dir(id);
        crate::runtime::write_bundle(&bundle, &spec)?;
        self.runtime.run_detached(id, &bundle, &self.log_path(id))?;
        Ok(())
    }

    /// /etc/hostname, /etc/hosts and /etc/resolv.conf inside the (ephemeral) rootfs.
    fn write_etc(&self, rootfs: &Path, plan: &InstancePlan) -> Result<(), NodeError> {
        let etc = rootfs.join("etc");
        std::fs::create_dir_all(&etc).map_err(io(&etc))?;
        let ip = self.net.address(
            &TenantNet {
                slot: plan.net_slot,
            },
            plan.ip_host,
        );
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
            let p = etc.join(name);
            // A symlink in the image (resolv.conf -> ../run/...) must not send the write outside.
            let _ = std::fs::remove_file(&p);
            std::fs::write(&p, text).map_err(io(&p))?;
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
        cgroup::remove(&self.cfg.root, id).map_err(io(Path::new("/sys/fs/cgroup")))?;
        self.disks.detach_volumes(id)?;
        self.disks.teardown_root(id)?;
        self.net.teardown(id)?;
        let bundle = self.bundle_dir(id);
        match std::fs::remove_dir_all(&bundle) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&bundle)(e)),
        }
    }

    /// Removes the instance's log (on terminate).
    pub fn forget(&self, id: &str) {
        let _ = std::fs::remove_file(self.log_path(id));
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

    /// Instance ids with host objects, split into those with a trace in *this* daemon's data
    /// dir or runtime root (certainly ours) and those seen only in host-wide namespaces
    /// (cgroups, netns, veths), which may belong to another gpuvisor on the same host.
    pub fn ids_with_objects(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), NodeError> {
        let mut local: BTreeSet<String> = self.containers()?.into_keys().collect();
        local.extend(self.disks.instances_with_objects()?);
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

    pub fn exec(&self, id: &str, args: &[String], env: &[String]) -> Result<ExecOutput, NodeError> {
        Ok(self.runtime.exec(id, args, env)?)
    }
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
