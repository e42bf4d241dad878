//! Containers: the [`Runtime`] that runs an instance as an OCI container through `runc`
//! ([`crate::oci`]). The order of the steps (network and disk side by side, /etc, volumes, GPU
//! devices and limiter, bundle, `runc run -d`) lives here; the host objects shared with other
//! runtimes (disks, network, cgroup, limiter regions) are made through the [`Node`].

use crate::cgroup;
use crate::instance::{
    exec_tag, io, resolv_conf, ExecTty, InstancePlan, Node, NodeError, StepTimer,
};
use crate::net::TenantNet;
use crate::oci::{BindMount, BundleSpec, OciRuntime};
use crate::rootfs::Rootfs;
use crate::runtime::{Runtime, RuntimeKind};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The OCI container runtime (runc, or another OCI runtime binary).
pub struct ContainerRuntime {
    pub oci: OciRuntime,
}

impl ContainerRuntime {
    pub fn new(oci: OciRuntime) -> Self {
        Self { oci }
    }

    fn provision_steps(
        &self,
        node: &Node,
        plan: &InstancePlan,
        t: &mut StepTimer,
    ) -> Result<(), NodeError> {
        let id = plan.id.as_str();
        // A fresh instance has no runtime state: skip asking the runtime about it.
        if self.oci.may_know(id) {
            if let Some(st) = self.oci.state(id)? {
                if st.status == "running" {
                    return Ok(());
                }
                self.oci.delete(id, true)?;
            }
        }
        t.mark("runtime_state");
        // The log relay (a fork and exec of our own binary) starts meanwhile, on another
        // thread; if a step fails, its pipe is closed unused and it ends at end of file.
        std::thread::scope(|s| {
            let relay = s.spawn(|| node.container_output(id));
            let bundle = self.prepare(node, plan, t);
            let output = relay.join().unwrap_or_else(|_| {
                Err(io(Path::new("log relay"))(std::io::Error::other(
                    "panicked",
                )))
            });
            let bundle = bundle?;
            let output = output?;
            t.mark("log_relay_wait");
            // `output` is closed here whatever happens: on failure the relay sees end of file.
            self.oci.run_detached(id, &bundle, output)?;
            t.mark("runc_run");
            Ok(())
        })
    }

    /// Everything before `runc run`: network, disks, /etc, volumes, devices, bundle. Returns
    /// the bundle dir.
    fn prepare(
        &self,
        node: &Node,
        plan: &InstancePlan,
        t: &mut StepTimer,
    ) -> Result<PathBuf, NodeError> {
        let id = plan.id.as_str();
        let tnet = TenantNet {
            slot: plan.net_slot,
        };
        let layers: Vec<PathBuf> = plan
            .layers
            .iter()
            .rev()
            .map(|l| node.images.layer_dir(l))
            .collect();
        // The network (netns, veth) and the disk (loop device, ext4, overlay) are independent
        // kernel work: the network is made on a second thread meanwhile. If either fails, the
        // caller's teardown removes what the other made.
        let (net, root, disk_time) = std::thread::scope(|s| {
            let net = s.spawn(|| {
                let t0 = Instant::now();
                let r = node
                    .net
                    .ensure_tenant(&tnet)
                    .and_then(|()| node.net.setup(id, &tnet, plan.ip_host));
                (r, t0.elapsed())
            });
            let t0 = Instant::now();
            let root = match &plan.from_snapshot {
                Some(src) => src.container_disk(&plan.image_digest).and_then(|base| {
                    Ok(node
                        .disks
                        .provision_root_from(id, plan.disk_size, &layers, Some(&base))?)
                }),
                None => node
                    .disks
                    .provision_root(id, plan.disk_size, &layers)
                    .map_err(NodeError::from),
            };
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
        self.write_etc(node, &rootfs, plan)?;
        t.mark("etc_files");

        let mut binds = Vec::new();
        for (name, path) in &plan.volumes {
            let src = node.disks.attach_volume(id, &plan.tenant_id, name)?;
            binds.push(BindMount {
                source: src,
                destination: path.clone(),
                readonly: false,
            });
        }
        t.mark("volumes");
        let mut devices = Vec::new();
        let mut uuids = Vec::new();
        let inventory = node.gpus();
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
                node.limiters
                    .prepare(id, &plan.gpu_shares, plan.priority, &etc)?,
            );
        }
        if !devices.is_empty() {
            devices.extend(node.gpu.control_devices());
            for (host, container) in node.gpu.driver_files() {
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
        let image_cfg = node.images.config(&plan.image_digest)?;
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
            pids_limit: node.cfg.pids_limit,
            netns: Some(netns),
            devices,
            binds,
            cgroup_path: cgroup::instance_path(&node.cfg.root, id),
            disk_io: plan.disk_io,
            block_devices: if plan.disk_io.is_unlimited() {
                Vec::new()
            } else {
                node.disks.block_devices(id)?
            },
            apparmor_profile: node.apparmor.clone(),
            seccomp: true,
        };
        let bundle = node.bundle_dir(id);
        crate::oci::write_bundle(&bundle, &spec)?;
        t.mark("bundle");
        Ok(bundle)
    }

    /// /etc/hostname, /etc/hosts and /etc/resolv.conf inside the (ephemeral) rootfs. Whatever
    /// the image has there (a file, a symlink to anywhere) is replaced, never followed; an /etc
    /// that is not a directory inside the image is an error naming it.
    fn write_etc(
        &self,
        node: &Node,
        rootfs: &Rootfs,
        plan: &InstancePlan,
    ) -> Result<(), NodeError> {
        let ip = node.net.address(
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
            ("resolv.conf", resolv_conf(&node.cfg.root)),
        ];
        for (name, text) in files {
            rootfs.replace_file("etc", name, text.as_bytes())?;
        }
        Ok(())
    }

    /// Status of every container gpuvisor runs, by instance id.
    pub fn containers(&self) -> Result<BTreeMap<String, String>, NodeError> {
        Ok(self
            .oci
            .list()?
            .into_iter()
            .map(|c| (c.id, c.status))
            .collect())
    }

    /// One exec's pid file and console socket path, in the instance's bundle (so teardown
    /// removes them), named by a random tag.
    fn exec_files(&self, node: &Node, id: &str) -> Result<(PathBuf, PathBuf), NodeError> {
        let tag = exec_tag()?;
        let bundle = node.bundle_dir(id);
        Ok((
            bundle.join(format!("exec-{tag}.pid")),
            bundle.join(format!("exec-{tag}.sock")),
        ))
    }

    fn shim_binary(&self, node: &Node) -> Result<PathBuf, NodeError> {
        node.log_limits()
            .relay
            .clone()
            .ok_or_else(|| {
                NodeError::Io {
            path: PathBuf::from(crate::console::SHIM_SUBCOMMAND),
            source: std::io::Error::other(
                "no gpuvisor binary configured for the exec shim (daemon without a relay binary)",
            ),
        }
            })
    }
}

impl Runtime for ContainerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Container
    }

    /// A bundle dir or the runtime's own state for `id`.
    fn knows(&self, node: &Node, id: &str) -> bool {
        node.bundle_dir(id).exists() || self.oci.may_know(id)
    }

    fn provision(
        &self,
        node: &Node,
        plan: &InstancePlan,
        t: &mut StepTimer,
    ) -> Result<(), NodeError> {
        self.provision_steps(node, plan, t)
    }

    /// The container, its log relay and its bundle; the shared objects are the [`Node`]'s.
    fn teardown(&self, node: &Node, id: &str) -> Result<(), NodeError> {
        self.oci.delete(id, true)?;
        // The container is gone: its relay reaches end of file and exits; wait for it.
        node.stop_relay(id, Duration::from_secs(5));
        let bundle = node.bundle_dir(id);
        match std::fs::remove_dir_all(&bundle) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&bundle)(e)),
        }
    }

    /// The container's init as the runtime recorded it (the bundle's pid file).
    fn main_pid(&self, node: &Node, id: &str) -> Option<i32> {
        std::fs::read_to_string(node.bundle_dir(id).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The mounted container disk and volumes (statvfs) and the host veth's counters.
    fn usage(&self, node: &Node, id: &str) -> crate::telemetry::RuntimeUsage {
        crate::telemetry::container_usage(
            &node.cfg.root,
            &node.cfg.data_dir,
            id,
            &node.net.veth_name(id),
        )
    }

    /// Containers the runtime knows, and bundle dirs.
    fn local_ids(&self, node: &Node) -> Result<BTreeSet<String>, NodeError> {
        let mut ids: BTreeSet<String> = self.containers()?.into_keys().collect();
        if let Ok(rd) = std::fs::read_dir(node.cfg.data_dir.join("bundles")) {
            ids.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        Ok(ids)
    }

    /// The container disk (the overlay's upper layer) and the volumes, frozen together
    /// (`FIFREEZE`: writers wait) while they are copied. No process state: a container's
    /// snapshot is its disks.
    fn snapshot(
        &self,
        node: &Node,
        id: &str,
        req: &crate::snapshot::SnapshotRequest,
    ) -> Result<crate::snapshot::SnapshotMeta, NodeError> {
        use crate::snapshot::{sparse_copy, volume_file, Frozen, SnapshotMeta, DISK};
        if req.memory {
            return Err(NodeError::Unsupported {
                kind: RuntimeKind::Container,
                what: "saving the running state (--memory: a container's snapshot holds its disk and volumes, not its processes)".into(),
            });
        }
        let image = node.disks.disk_image(id);
        let size = std::fs::metadata(&image).map_err(io(&image))?.len();
        let mut mounts = vec![node.disks.disk_mount(id)];
        mounts.extend(req.volumes.iter().map(|n| node.disks.volume_mount(id, n)));
        let frozen = Frozen::freeze(&mounts).map_err(io(&mounts[0]))?;
        let dst = req.dir.join(DISK);
        sparse_copy(&image, &dst).map_err(io(&dst))?;
        for name in &req.volumes {
            let (src, dst) = (
                node.disks.volume_image(&req.tenant, name),
                req.dir.join(volume_file(name)),
            );
            sparse_copy(&src, &dst).map_err(io(&dst))?;
        }
        drop(frozen);
        Ok(SnapshotMeta {
            runtime: RuntimeKind::Container,
            disk_size: size,
            volumes: req.volumes.clone(),
            memory: false,
            consistency: "filesystem freeze".into(),
            cmdline: None,
            initrd: false,
            image_digest: req.image_digest.clone(),
            vcpus: req.vcpus,
            memory_bytes: req.memory_bytes,
            ram_pad: 0,
            machine: None,
            qemu_version: None,
            bytes: 0,
        })
    }

    /// `runc update`: the container's cgroup (cpuset, memory and memory+swap limits) is
    /// changed in place; its processes keep running. The bundle is left as it was: a new
    /// provision writes it from the store's (resized) plan.
    fn resize(&self, _node: &Node, id: &str, cpus: &[u32], memory: u64) -> Result<(), NodeError> {
        Ok(self.oci.update(id, cpus, memory)?)
    }

    /// Stops the container: SIGTERM, then SIGKILL after `grace`, then deletes it.
    /// The cgroup's throttles on the instance's disk and volume devices, written in place
    /// (`runc update` does not change them).
    fn set_disk_io(
        &self,
        node: &Node,
        id: &str,
        limits: &gpuvisor_wire::DiskIo,
    ) -> Result<(), NodeError> {
        let devices = node.disks.block_devices(id)?;
        cgroup::set_disk_io(&node.cfg.root, id, &devices, limits)
            .map_err(io(Path::new("the instance's cgroup")))
    }

    fn stop(&self, _node: &Node, id: &str, grace: Duration) -> Result<(), NodeError> {
        if let Some(mut st) = self.oci.state(id)? {
            // A frozen container (a parked serverless worker) is thawed so that it can hear
            // the TERM and end as any other.
            if st.status == "paused" {
                self.oci.resume(id)?;
                st.status = "running".into();
            }
            if st.status == "running" {
                self.oci.kill(id, "TERM", false)?;
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    match self.oci.state(id)? {
                        Some(s) if s.status == "running" => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        _ => break,
                    }
                }
                self.oci.kill(id, "KILL", true)?;
            }
            self.oci.delete(id, true)?;
        }
        Ok(())
    }

    /// Ids of instances whose container is running: the init pid the runtime wrote to the
    /// bundle's pid file is alive, not a zombie, and in the instance's cgroup (so a recycled pid
    /// is not mistaken for it). Spawns no process: the reconciler calls this every second, and
    /// `runc list` would cost about a millisecond per container.
    fn running(&self, node: &Node) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Ok(rd) = std::fs::read_dir(node.cfg.data_dir.join("bundles")) else {
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
            let proc_dir = node.cfg.root.path(format!("/proc/{pid}"));
            let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']));
            let ours = i32::try_from(pid).is_ok_and(|p| cgroup::holds(&node.cfg.root, &id, p));
            if !stat.is_empty() && !zombie && ours {
                out.insert(id);
            }
        }
        out
    }

    /// The `runc exec` command for `args` in instance `id` and the file it writes the
    /// command's pid to (in the bundle, so teardown removes it). See
    /// [`crate::oci::OciRuntime::exec_command`].
    fn exec_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        let (pid_file, _) = self.exec_files(node, id)?;
        Ok((
            self.oci.exec_command(id, args, env, &pid_file, stdin),
            pid_file,
        ))
    }

    /// An exec of `args` in instance `id` on pipes, run by the exec shim ([`crate::console`],
    /// `--pipes`) so that the command's tree dies with the daemon: the shim's command (stdin
    /// piped when `stdin`, stdout and stderr piped, its own process group; its exit status is
    /// the command's) and the pid file.
    fn exec_pipes_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        let shim = self.shim_binary(node)?;
        let (pid_file, _) = self.exec_files(node, id)?;
        let argv = self.oci.exec_argv(id, args, env, &pid_file);
        let mut cmd = shim_command(node, &shim, &pid_file, id, true, &argv);
        crate::runtime::exec_stdio(&mut cmd, stdin);
        Ok((cmd, pid_file))
    }

    /// An exec of `args` in instance `id` on a terminal ([`crate::console`]): the exec shim's
    /// command (this binary; stdout and stderr piped, its own process group), the pid file, and
    /// the console socket the runtime sends the pty master to (both in the bundle).
    fn exec_tty_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
    ) -> Result<ExecTty, NodeError> {
        let shim = self.shim_binary(node)?;
        let (pid_file, sock_path) = self.exec_files(node, id)?;
        let socket = crate::console::ConsoleSocket::bind(&sock_path).map_err(io(&sock_path))?;
        let argv = self.oci.exec_tty_argv(id, args, env, &pid_file, &sock_path);
        let mut cmd = shim_command(node, &shim, &pid_file, id, false, &argv);
        crate::runtime::exec_stdio(&mut cmd, false);
        Ok(ExecTty {
            shim: cmd,
            pid_file,
            socket,
        })
    }

    /// [`Node::kill_exec`] of an exec whose shim died: its processes were orphaned to the
    /// daemon (the child subreaper), so the ones that are its children now are reaped here
    /// (a zombie would hold the instance's cgroup until the next sweeps).
    fn kill_orphaned_exec(&self, node: &Node, id: &str, pid_file: &Path) -> usize {
        let pid = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        let killed = pid.map_or_else(Vec::new, |p| {
            crate::oci::kill_exec_tree_pids(&node.cfg.root, id, p)
        });
        let _ = std::fs::remove_file(pid_file);
        let me = std::process::id().to_string();
        for p in &killed {
            // Only our own children (a killed pid is not reused before it is reaped).
            let parent = std::fs::read_to_string(node.cfg.root.path(format!("/proc/{p}/stat")))
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
    fn kill_exec(&self, node: &Node, id: &str, pid_file: &Path) -> usize {
        let pid = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        let n = pid.map_or(0, |p| crate::oci::kill_exec_tree(&node.cfg.root, id, p));
        let _ = std::fs::remove_file(pid_file);
        n
    }
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

/// The exec shim's command line ([`crate::console`]): this binary's hidden subcommand, told
/// where the runtime writes the command's pid, the instance and its cgroup parent (the shim
/// checks a pid is the instance's before it signals it), then the runtime's argv.
fn shim_command(
    node: &Node,
    shim: &Path,
    pid_file: &Path,
    id: &str,
    pipes: bool,
    argv: &[String],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(shim);
    cmd.arg(crate::console::SHIM_SUBCOMMAND)
        .arg("--pid-file")
        .arg(pid_file)
        .arg("--instance")
        .arg(id)
        .arg("--cgroup-parent")
        .arg(node.cfg.root.cgroup_parent());
    if pipes {
        cmd.arg("--pipes");
    }
    cmd.arg("--").args(argv);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

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
