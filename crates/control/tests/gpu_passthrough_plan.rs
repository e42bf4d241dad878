#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Issue 11 item 6 through the engine: placement knows the binding. A GPU bound to vfio-pci is
//! placed only for VMs (`runtime vm`), a GPU on the host driver (or a plain simulated one) only
//! for containers; a VM asking for GPUs where none is bound is told how to bind one; fractions
//! and MIG slices are refused for VMs; and the node turns a VM's GPUs into its passthrough plan
//! (`Node::passthrough`), for real GPUs (fixture sysfs) and simulated ones.
//!
//! Hosts are `Node::open` over a fixture root, as in `gpuadmin.rs` (root, iptables and runc
//! needed, as CI has). The VM runtime is being written beside this (vm/runtime.rs); here a
//! stand-in that provisions nothing is installed with `Node::with_runtime`, since no
//! reconciler runs: instances stay `pending` rows, which hold their GPUs like running ones.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use gpuvisor_control::placement::Scheduled;
use gpuvisor_control::store::{ImageRow, Store};
use gpuvisor_control::{Engine, EngineConfig, EngineError, Principal};
use gpuvisor_node::instance::{ExecTty, StepTimer};
use gpuvisor_node::runtime::{Runtime, RuntimeKind};
use gpuvisor_node::testfx::{Fx, Kernel, GPU, GPU_AUDIO};
use gpuvisor_node::vm::passthrough::{OVMF_CODE, OVMF_VARS};
use gpuvisor_node::{InstancePlan, Node, NodeConfig, NodeError};
use gpuvisor_wire as wire;
use gpuvisor_wire::{code, InstanceState, Role};

/// The fixture GPU's UUID (from its `/proc/driver/nvidia/gpus/<addr>/information`).
const UUID: &str = "GPU-11111111-2222-3333-4444-555555555555";
/// Not the daemon's default pool, nor gpuadmin.rs's.
const NET_POOL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
const IMAGE: &str = "tools";

/// A VM runtime that runs nothing: placement is what is tested.
struct NoVm;

fn unsupported(what: &str) -> NodeError {
    NodeError::Unsupported {
        kind: RuntimeKind::Vm,
        what: what.into(),
    }
}

impl Runtime for NoVm {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Vm
    }
    fn knows(&self, _: &Node, _: &str) -> bool {
        false
    }
    fn provision(&self, _: &Node, _: &InstancePlan, _: &mut StepTimer) -> Result<(), NodeError> {
        Err(unsupported("provisioning (test stand-in)"))
    }
    fn stop(&self, _: &Node, _: &str, _: std::time::Duration) -> Result<(), NodeError> {
        Ok(())
    }
    fn teardown(&self, _: &Node, _: &str) -> Result<(), NodeError> {
        Ok(())
    }
    fn running(&self, _: &Node) -> std::collections::BTreeSet<String> {
        Default::default()
    }
    fn main_pid(&self, _: &Node, _: &str) -> Option<i32> {
        None
    }
    fn local_ids(&self, _: &Node) -> Result<std::collections::BTreeSet<String>, NodeError> {
        Ok(Default::default())
    }
    fn usage(&self, _: &Node, _: &str) -> gpuvisor_node::telemetry::RuntimeUsage {
        Default::default()
    }
    fn exec_command(
        &self,
        _: &Node,
        _: &str,
        _: &[String],
        _: &[String],
        _: bool,
    ) -> Result<(std::process::Command, std::path::PathBuf), NodeError> {
        Err(unsupported("exec"))
    }
    fn exec_pipes_command(
        &self,
        _: &Node,
        _: &str,
        _: &[String],
        _: &[String],
        _: bool,
    ) -> Result<(std::process::Command, std::path::PathBuf), NodeError> {
        Err(unsupported("exec"))
    }
    fn exec_tty_command(
        &self,
        _: &Node,
        _: &str,
        _: &[String],
        _: &[String],
    ) -> Result<ExecTty, NodeError> {
        Err(unsupported("exec"))
    }
    fn kill_exec(&self, _: &Node, _: &str, _: &Path) -> usize {
        0
    }
    fn kill_orphaned_exec(&self, _: &Node, _: &str, _: &Path) -> usize {
        0
    }
}

struct Host {
    engine: Arc<Engine>,
    node: Arc<Node>,
    admin: Principal,
    user: Principal,
    /// The keys' secrets, to authenticate again after a restart.
    secrets: (String, String),
    simulate: Option<String>,
    vm: bool,
    _fx: Fx,
    _data: tempfile::TempDir,
}

impl Host {
    /// An engine over `fx` (with OVMF and the VFIO group device of the fixture GPU), GPUs
    /// simulated when `simulate` says so, the stand-in VM runtime when `vm`.
    async fn new(fx: Fx, simulate: Option<&str>, vm: bool) -> Self {
        fx.file("/sys/devices/system/cpu/online", "0-3\n");
        fx.file("/proc/meminfo", "MemTotal:       16777216 kB\n");
        fx.file("/sys/module/apparmor/parameters/enabled", "N\n");
        fx.file(OVMF_CODE, "code");
        fx.file(OVMF_VARS, "vars");
        fx.file("/dev/vfio/17", "");
        let data = tempfile::tempdir().unwrap();
        Self::open(fx, data, simulate.map(str::to_string), vm, None).await
    }

    /// The daemon restarted: a new node and engine over the same host and data.
    async fn restart(self) -> Self {
        let Host {
            engine,
            node,
            secrets,
            simulate,
            vm,
            _fx,
            _data,
            ..
        } = self;
        drop(engine);
        drop(node);
        Self::open(_fx, _data, simulate, vm, Some(secrets)).await
    }

    async fn open(
        fx: Fx,
        data: tempfile::TempDir,
        simulate: Option<String>,
        vm: bool,
        secrets: Option<(String, String)>,
    ) -> Self {
        let kernel = Arc::new(Kernel::new(fx.root()));
        let cfg = NodeConfig {
            data_dir: data.path().to_path_buf(),
            runtime: "runc".into(),
            simulate_gpus: simulate.clone(),
            net_plan: gpuvisor_node::ipam::AddressPlan::new(
                gpuvisor_node::ipam::Cidr {
                    addr: NET_POOL,
                    len: 16,
                },
                24,
            )
            .unwrap(),
            nat: false,
            pids_limit: 4096,
            root: fx.root(),
            limiter_lib: None,
            limiter_context_bytes: 0,
            limiter_over_quota: Default::default(),
            manage_ksm: false,
            reserved_cpus: Vec::new(),
        };
        let node = tokio::task::spawn_blocking(move || Node::open(cfg))
            .await
            .unwrap()
            .unwrap_or_else(|e| {
                panic!("Node::open on the fixture host failed (root, iptables, runc needed): {e}")
            })
            .with_sys_writer(kernel);
        let node = Arc::new(if vm {
            node.with_runtime(Box::new(NoVm))
        } else {
            node
        });
        let store = Store::connect(&Store::sqlite_url(&data.path().join("gpuvisor.db")))
            .await
            .unwrap();
        let engine = Engine::new(
            store,
            node.clone(),
            Box::new(Scheduled::default()),
            EngineConfig {
                node_id: "fixture-host".into(),
                hostname: "fixture-host".into(),
                cpu_ratio: 1,
                stop_grace: std::time::Duration::from_secs(1),
                resync: std::time::Duration::from_secs(1),
                sweep_every: std::time::Duration::from_secs(30),
                simulated_policy: gpuvisor_scheduler::Policy::GvFrag,
            },
        );
        let first = engine.bootstrap().await.unwrap();
        if let Some((admin_secret, user_secret)) = secrets {
            assert!(first.is_none(), "a restart finds its store");
            let admin = engine.authenticate(Some(&admin_secret)).await.unwrap();
            let user = engine.authenticate(Some(&user_secret)).await.unwrap();
            return Self {
                engine,
                node,
                admin,
                user,
                secrets: (admin_secret, user_secret),
                simulate,
                vm,
                _fx: fx,
                _data: data,
            };
        }
        let secret = first.unwrap();
        let admin = engine.authenticate(Some(&secret)).await.unwrap();
        engine
            .create_tenant(
                &admin,
                &wire::CreateTenant {
                    name: "acme".into(),
                },
            )
            .await
            .unwrap();
        let key = engine
            .create_key(
                &admin,
                &wire::CreateKey {
                    tenant: "acme".into(),
                    role: Role::Member,
                },
            )
            .await
            .unwrap();
        let user = engine.authenticate(Some(&key.secret)).await.unwrap();
        engine
            .store()
            .insert_image(&ImageRow {
                owner: String::new(),
                source: String::new(),
                name: IMAGE.into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
                layers: vec![],
                size: 0,
                command: vec!["sleep".into(), "infinity".into()],
                env: vec![],
                created_at: 0,
            })
            .await
            .unwrap();
        Self {
            engine,
            node,
            admin,
            user,
            secrets: (secret, key.secret.clone()),
            simulate,
            vm,
            _fx: fx,
            _data: data,
        }
    }

    async fn create(&self, req: wire::CreateInstance) -> Result<wire::Instance, EngineError> {
        self.engine
            .create_instance(
                &self.user,
                &wire::CreateInstance {
                    image: IMAGE.into(),
                    vcpus: 1,
                    memory: 256 << 20,
                    container_disk: 1 << 30,
                    ..req
                },
            )
            .await
    }

    async fn vm(&self, gpus: u32) -> Result<wire::Instance, EngineError> {
        self.create(wire::CreateInstance {
            runtime: Some(RuntimeKind::Vm),
            gpus: Some(gpus),
            ..Default::default()
        })
        .await
    }

    async fn container(&self, gpus: u32) -> Result<wire::Instance, EngineError> {
        self.create(wire::CreateInstance {
            gpus: Some(gpus),
            ..Default::default()
        })
        .await
    }

    async fn terminate_row(&self, id: &str) {
        assert!(self
            .engine
            .store()
            .set_state(id, InstanceState::Terminated, None, 9)
            .await
            .unwrap());
    }
}

fn refused(err: &EngineError, code: &str, says: &[&str]) {
    assert_eq!(err.code(), code, "{err:?}");
    for s in says {
        assert!(err.to_string().contains(s), "{s:?} not in: {err}");
    }
}

/// A real (fixture) GPU: on nvidia it is for containers and a VM is told to bind it; bound with
/// `gpu bind-vfio` it is for VMs only, and the VM's passthrough plan takes its whole group.
#[tokio::test]
async fn a_real_gpu_goes_to_vms_once_bound_to_vfio_pci() {
    let h = Host::new(Fx::clean(), None, true).await;

    let err = h.vm(1).await.unwrap_err();
    refused(
        &err,
        code::INSUFFICIENT_RESOURCES,
        &[
            "bound to vfio-pci for a VM: 1 any wanted, 0 free of 0",
            "gpuvisor gpu bind-vfio",
            "1 on the host driver is for containers",
        ],
    );
    assert!(h.engine.list_instances(&h.admin).await.unwrap().is_empty());

    h.engine.bind_vfio(&h.admin, "0").await.unwrap();
    let vm = h.vm(1).await.unwrap();
    assert_eq!(vm.runtime, RuntimeKind::Vm);
    assert_eq!(vm.gpus.len(), 1);
    assert_eq!(vm.gpus[0].uuid, UUID);
    assert_eq!(vm.gpus[0].milli, 1000);

    // The container asking for it is told it is for VMs.
    let err = h.container(1).await.unwrap_err();
    refused(
        &err,
        code::INSUFFICIENT_RESOURCES,
        &["0 free of 0", "1 more is bound to vfio-pci, for VMs"],
    );

    // The VM's passthrough plan: the whole group (GPU and audio, both moved by bind-vfio).
    let plan = h.node.passthrough(&[UUID.to_string()]).unwrap().unwrap();
    let devices: Vec<&String> = plan
        .args
        .iter()
        .filter(|a| a.starts_with("vfio-pci"))
        .collect();
    assert_eq!(
        devices,
        vec![
            &format!("vfio-pci,host={GPU},id=gvpt0f0,bus=gvrp0,addr=00.0,multifunction=on"),
            &format!("vfio-pci,host={GPU_AUDIO},id=gvpt0f1,bus=gvrp0,addr=00.1"),
        ]
    );
    assert!(plan
        .args
        .contains(&"q35-pcihost.pci-hole64-size=256G".to_string()));
    assert!(h.node.passthrough(&[]).unwrap().is_none());

    // The VM gone and the GPU given back: containers get it again, VMs are refused.
    h.terminate_row(&vm.id).await;
    h.engine.release_gpu(&h.admin, UUID).await.unwrap();
    assert_eq!(h.container(1).await.unwrap().gpus[0].uuid, UUID);
    refused(
        &h.vm(1).await.unwrap_err(),
        code::INSUFFICIENT_RESOURCES,
        &["gpuvisor gpu bind-vfio"],
    );
}

/// Simulated GPUs, one marked as bound to vfio-pci (`:vfio`): a VM with `--gpus 1` is placed on
/// it and a container is not, and the other way round; `gpu list` shows the binding; the
/// node's plan for the VM is produced and not attached.
#[tokio::test]
async fn simulated_vfio_gpus_take_vms_and_only_vms() {
    let h = Host::new(Fx::empty(), Some("1xH100-80GB:vfio,1xA100-80GB"), true).await;
    let gpus = h.engine.list_gpus(&h.admin).await.unwrap();
    let (h100, a100) = (&gpus[0], &gpus[1]);
    assert_eq!(h100.model, "H100-80GB");
    assert_eq!(h100.driver.as_deref(), Some("vfio-pci"));
    assert!(h100.passthrough_ready);
    assert_eq!(a100.driver, None);
    assert!(!a100.passthrough_ready);

    let vm = h.vm(1).await.unwrap();
    assert_eq!(vm.gpus[0].uuid, h100.uuid, "the VM gets the vfio-pci GPU");
    let c = h.container(1).await.unwrap();
    assert_eq!(c.gpus[0].uuid, a100.uuid, "the container gets the other");

    // Each kind full now: neither spills onto the other's GPU.
    refused(
        &h.vm(1).await.unwrap_err(),
        code::INSUFFICIENT_RESOURCES,
        &["bound to vfio-pci for a VM: 1 any wanted, 0 free of 1"],
    );
    h.terminate_row(&c.id).await;
    refused(
        &h.vm(1).await.unwrap_err(),
        code::INSUFFICIENT_RESOURCES,
        &["0 free of 1", "1 on the host driver is for containers"],
    );
    h.terminate_row(&vm.id).await;
    h.terminate_row(&h.container(1).await.unwrap().id).await;
    let err = h.container(2).await.unwrap_err();
    refused(
        &err,
        code::INSUFFICIENT_RESOURCES,
        &["2 any wanted, 1 free of 1", "1 more is bound to vfio-pci"],
    );

    // A model only on the host driver: the VM is told how to get one, here by simulation.
    let err = h
        .create(wire::CreateInstance {
            runtime: Some(RuntimeKind::Vm),
            gpus: Some(1),
            gpu_model: Some("A100-80GB".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(
        &err,
        code::INSUFFICIENT_RESOURCES,
        &[
            "1 A100-80GB wanted, 0 free of 0",
            "gpuvisor gpu bind-vfio",
            "--simulate-gpus 1xH100-80GB:vfio",
        ],
    );

    // The plan of a VM on the simulated GPU: the window and firmware as on a host with an H100,
    // the devices named in the notes, not attached.
    let plan = h
        .node
        .passthrough(std::slice::from_ref(&h100.uuid))
        .unwrap()
        .unwrap();
    assert_eq!(
        plan.args,
        vec![
            "-global",
            "q35-pcihost.pci-hole64-size=256G",
            "-fw_cfg",
            "name=opt/ovmf/X-PciMmio64Mb,string=262144"
        ]
    );
    assert!(
        plan.notes[0].starts_with("simulated GPUs: not attached")
            && plan.notes[0].contains(&format!("vfio-pci,host={}", h100.pci_address)),
        "{:?}",
        plan.notes
    );
    let err = h
        .node
        .passthrough(std::slice::from_ref(&a100.uuid))
        .unwrap_err();
    assert!(err.to_string().contains("not vfio-pci"), "{err}");
}

/// Fractions and MIG slices are never given to a VM, whatever the host has.
#[tokio::test]
async fn fractions_and_mig_slices_are_refused_for_vms() {
    let h = Host::new(Fx::empty(), Some("1xA100-80GB:mig,1xH100-80GB:vfio"), true).await;
    let err = h
        .create(wire::CreateInstance {
            runtime: Some(RuntimeKind::Vm),
            gpu_fraction: Some(0.5),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(
        &err,
        code::INVALID_ARGUMENT,
        &["a fraction of a GPU cannot be given to a VM"],
    );

    h.engine.mig_create(&h.admin, "0", "3g.40gb").await.unwrap();
    let err = h
        .create(wire::CreateInstance {
            runtime: Some(RuntimeKind::Vm),
            gpus: Some(1),
            gpu_model: Some("A100-80GB-3g.40gb".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(
        &err,
        code::INVALID_ARGUMENT,
        &["is a MIG slice: a VM takes whole GPUs by passthrough"],
    );
    // A container takes the slice; a plain VM the vfio-pci GPU, never the slice.
    let c = h
        .create(wire::CreateInstance {
            gpus: Some(1),
            gpu_model: Some("A100-80GB-3g.40gb".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(c.gpus[0].uuid.starts_with("MIG-"), "{:?}", c.gpus);
    let vm = h.vm(1).await.unwrap();
    assert_eq!(vm.gpus[0].model, "H100-80GB");
    let err = h.node.passthrough(&[c.gpus[0].uuid.clone()]).unwrap_err();
    assert!(err.to_string().contains("MIG slice"), "{err}");
}

/// Without a VM runtime on the host, a VM's own refusals come first (the same on every host),
/// and a VM that would be placed is refused as unavailable.
#[tokio::test]
async fn without_a_vm_runtime_refusals_come_first() {
    let h = Host::new(Fx::empty(), Some("1xH100-80GB"), false).await;
    refused(
        &h.vm(1).await.unwrap_err(),
        code::INSUFFICIENT_RESOURCES,
        &["gpuvisor gpu bind-vfio"],
    );
    let h = Host::new(Fx::empty(), Some("1xH100-80GB:vfio"), false).await;
    let err = h.vm(1).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("not set up"), "{err}");
    assert!(h.engine.list_instances(&h.admin).await.unwrap().is_empty());
}

/// Review finding 4: create checks that the VM could start. A GPU on vfio-pci whose audio
/// function was left on its host driver, or whose VFIO group device is missing, used to be
/// placed (any vfio-pci GPU counted); the plan is now made at create, under the placement
/// lock, and its error refuses the VM; nothing is recorded.
#[tokio::test]
async fn a_vm_that_could_not_start_is_refused_at_create() {
    let h = Host::new(Fx::clean(), None, true).await;
    h.engine.bind_vfio(&h.admin, "0").await.unwrap();
    h._fx.set_driver(GPU_AUDIO, Some("snd_hda_intel"));
    let err = h.vm(1).await.unwrap_err();
    refused(
        &err,
        code::UNAVAILABLE,
        &[
            "the VM cannot be given its GPUs",
            "also holds 0000:3b:00.1 (audio, snd_hda_intel), not on vfio-pci",
            "an admin's `gpuvisor gpu bind-vfio 0000:3b:00.0`",
        ],
    );
    h._fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
    h._fx.remove("/dev/vfio/17");
    refused(
        &h.vm(1).await.unwrap_err(),
        code::UNAVAILABLE,
        &["/dev/vfio/17 of GPU 0000:3b:00.0 does not exist"],
    );
    h._fx.remove(OVMF_CODE);
    h._fx.file("/dev/vfio/17", "");
    refused(
        &h.vm(1).await.unwrap_err(),
        code::UNAVAILABLE,
        &["OVMF firmware", "is missing"],
    );
    assert!(h.engine.list_instances(&h.admin).await.unwrap().is_empty());
    h._fx.file(OVMF_CODE, "code");
    assert_eq!(h.vm(1).await.unwrap().gpus[0].uuid, UUID);
}

/// Review finding 2 (the attack): a GPU on vfio-pci at boot is `PCI-<address>` (no driver
/// tells its UUID). (a) `gpu release` used to leave the cached inventory on that name, so a
/// container was recorded on `PCI-<address>`; the inventory is now read again at the end of
/// the bind/release. (b) A VM recorded on `PCI-<address>`, then a restart where the GPU is
/// known as `GPU-...`: its binding used to match no GPU, the GPU counted free and a second VM
/// was placed on it; start-up now renames the binding to the GPU's name.
#[tokio::test]
async fn a_gpu_named_by_its_address_is_not_placed_twice_after_a_rename() {
    let fx = Fx::clean();
    let info = format!("/proc/driver/nvidia/gpus/{GPU}/information");
    let info_text = std::fs::read_to_string(fx.path(&info)).unwrap();
    fx.set_driver(GPU, Some("vfio-pci"));
    fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
    fx.remove(&format!("/proc/driver/nvidia/gpus/{GPU}"));
    let h = Host::new(fx, None, true).await;
    let pci_name = format!("PCI-{GPU}");
    assert_eq!(
        h.engine.list_gpus(&h.admin).await.unwrap()[0].uuid,
        pci_name
    );

    // (b) A VM on the GPU as it is named now.
    let vm = h.vm(1).await.unwrap();
    assert_eq!(vm.gpus[0].uuid, pci_name);
    // The driver tells the UUID after a restart (here: its information file is back).
    h._fx.file(&info, &info_text);
    let h = h.restart().await;
    assert_eq!(h.engine.list_gpus(&h.admin).await.unwrap()[0].uuid, UUID);
    let err = h.vm(1).await.unwrap_err();
    refused(
        &err,
        code::INSUFFICIENT_RESOURCES,
        &["bound to vfio-pci for a VM: 1 any wanted, 0 free of 1"],
    );
    let got = h.engine.get_instance(&h.user, &vm.id).await.unwrap();
    assert_eq!(got.gpus[0].uuid, UUID, "the VM's binding follows the GPU");

    // (a) Released through gpuvisor: the next create sees the GPU's name at once.
    h.terminate_row(&vm.id).await;
    drop(h);
    let h = {
        // The boot state of (a): on vfio-pci, the driver silent, a fresh store.
        let fx = Fx::clean();
        fx.set_driver(GPU, Some("vfio-pci"));
        fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
        fx.remove(&format!("/proc/driver/nvidia/gpus/{GPU}"));
        Host::new(fx, None, true).await
    };
    assert_eq!(
        h.engine.list_gpus(&h.admin).await.unwrap()[0].uuid,
        pci_name
    );
    // The nvidia driver tells the UUID once it holds the GPU again.
    h._fx.file(&info, &info_text);
    let listed = h.engine.release_gpu(&h.admin, "0").await.unwrap();
    assert_eq!(listed.uuid, UUID);
    let c = h.container(1).await.unwrap();
    assert_eq!(c.gpus[0].uuid, UUID, "recorded on the GPU's UUID");
    let h = h.restart().await;
    refused(
        &h.container(1).await.unwrap_err(),
        code::INSUFFICIENT_RESOURCES,
        &["not enough GPUs: 1 any wanted, 0 free of 1"],
    );
}

/// Review finding 11: the only vfio-pci GPU cordoned: the VM is told so, not to bind one.
#[tokio::test]
async fn a_vm_is_told_when_its_gpus_are_cordoned() {
    let h = Host::new(Fx::empty(), Some("1xH100-80GB:vfio"), true).await;
    h.engine
        .cordon_gpu(&h.admin, "0", Some("fan failed"))
        .await
        .unwrap();
    let err = h.vm(1).await.unwrap_err();
    refused(
        &err,
        code::INSUFFICIENT_RESOURCES,
        &["GPU 0 (operator: fan failed) is cordoned", "ask an admin"],
    );
    assert!(!err.to_string().contains("bind"), "{err}");
}

/// Review finding 12: a GPU on no driver (or nouveau, pci-stub) is for nobody: a container
/// used to be placed on it (and failed at start).
#[tokio::test]
async fn a_gpu_on_no_usable_driver_takes_no_instance() {
    let fx = Fx::clean();
    fx.set_driver(GPU, Some("nouveau"));
    let h = Host::new(fx, None, true).await;
    refused(
        &h.container(1).await.unwrap_err(),
        code::INSUFFICIENT_RESOURCES,
        &["not enough GPUs: 1 any wanted, 0 free of 0"],
    );
    h._fx.set_driver(GPU, None);
    refused(
        &h.container(1).await.unwrap_err(),
        code::INSUFFICIENT_RESOURCES,
        &["0 free of 0"],
    );
    h._fx.set_driver(GPU, Some("nvidia"));
    assert_eq!(h.container(1).await.unwrap().gpus[0].uuid, UUID);
}

/// Review findings 4 and 11: two vfio-pci GPUs sharing an IOMMU group are one unit for VMs.
/// Placement gives GPUs one by one; a VM asking for two used to get one of the pair and a lone
/// GPU (a VM that could never start). It gets the pair now, and a VM asking for one GPU of the
/// pair is refused with the plan's reason.
#[tokio::test]
async fn gpus_sharing_a_group_go_to_one_vm_together() {
    use gpuvisor_node::testfx::Pci;
    let fx = Fx::clean();
    fx.set_driver(GPU, Some("vfio-pci"));
    fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
    let pair = ["0000:5e:00.0", "0000:5f:00.0"];
    for (i, addr) in pair.iter().enumerate() {
        fx.pci(&Pci {
            addr,
            vendor: "0x10de",
            device: "0x2330",
            class: "0x030200",
            driver: Some("vfio-pci"),
            group: Some(18),
        });
        fx.bars(addr, 0x48_0000_0000 + ((i as u64) << 38), 128 << 30);
    }
    fx.file("/dev/vfio/18", "");
    let h = Host::new(fx, None, true).await;
    let pci_of = |uuid: &str| {
        h.node
            .gpus()
            .into_iter()
            .find(|g| g.uuid == uuid)
            .unwrap()
            .pci_address
    };
    let vm = h.vm(2).await.unwrap();
    let mut got: Vec<String> = vm.gpus.iter().map(|g| pci_of(&g.uuid)).collect();
    got.sort();
    assert_eq!(
        got,
        pair.to_vec(),
        "the pair, not one of it and the lone GPU"
    );
    let lone = h.vm(1).await.unwrap();
    assert_eq!(pci_of(&lone.gpus[0].uuid), GPU);
    h.terminate_row(&vm.id).await;
    let err = h.vm(1).await.unwrap_err();
    refused(
        &err,
        code::UNAVAILABLE,
        &[
            "also holds GPU 0000:5",
            "GPUs sharing a group go to one VM together",
        ],
    );
}

/// A VM request: guest RAM `memory`, the rest as [`Host::create`] fills it in.
fn vm_req(memory: u64) -> wire::CreateInstance {
    wire::CreateInstance {
        image: IMAGE.into(),
        runtime: Some(RuntimeKind::Vm),
        vcpus: 1,
        memory,
        container_disk: 1 << 30,
        ..Default::default()
    }
}

/// Review L3, L11: what a VM's provisioning (its cloud-init seed) would refuse is refused at
/// create, before anything is placed or made: a name that is no host name, a volume name longer
/// than a disk serial, `--env` (a VM's init sets its environment), too little memory to boot.
/// The same name and volume are a container's to use. A VM does not inherit the image's CMD.
#[tokio::test]
async fn vm_requests_its_seed_would_refuse_are_refused_at_create() {
    let h = Host::new(Fx::clean(), None, true).await;
    type Mutate = Box<dyn Fn(&mut wire::CreateInstance)>;
    let cases: Vec<(Mutate, &[&str])> = vec![
        (
            Box::new(|r| r.name = Some("my_vm".into())),
            &["\"my_vm\" cannot be a VM's host name", "no '_'"],
        ),
        (
            Box::new(|r| {
                r.volumes = vec![wire::VolumeMount {
                    name: "a-volume-name-of-21-b".into(),
                    path: "/data".into(),
                    size: Some(64 << 20),
                }]
            }),
            &["too long for a VM", "at most 20 bytes"],
        ),
        (
            Box::new(|r| r.env = vec!["A=1".into()]),
            &["--env is for containers", "--startup-script"],
        ),
        (
            Box::new(|r| r.memory = 64 << 20),
            &["too small for a VM: at least 128MiB"],
        ),
        // A package is a name cloud-init hands to apt: never an option, never two words.
        (
            Box::new(|r| r.packages = vec!["-oAPT::Get::AllowUnauthenticated=1".into()]),
            &["is not a Debian package name"],
        ),
        (
            Box::new(|r| r.packages = vec!["curl wget".into()]),
            &["is not a Debian package name"],
        ),
        (
            Box::new(|r| r.packages = (0..65).map(|i| format!("pkg{i}")).collect()),
            &["65 packages given: at most 64"],
        ),
    ];
    for (mutate, says) in cases {
        let mut req = vm_req(256 << 20);
        mutate(&mut req);
        let err = h.engine.create_instance(&h.user, &req).await.unwrap_err();
        refused(&err, code::INVALID_ARGUMENT, says);
        assert!(h.engine.list_instances(&h.admin).await.unwrap().is_empty());
        assert!(h.engine.list_volumes(&h.user).await.unwrap().is_empty());
    }
    // Packages are a VM's (cloud-init installs them); a container runs its image.
    let err = h
        .create(wire::CreateInstance {
            packages: vec!["curl".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&err, code::INVALID_ARGUMENT, &["--package are for VMs"]);
    // A container may be named so.
    let c = h
        .create(wire::CreateInstance {
            name: Some("my_vm".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(c.command, ["sleep", "infinity"]);
    h.terminate_row(&c.id).await;
    // No `-- CMD`: the VM runs no command; the image's CMD is a container's default only.
    let vm = h
        .engine
        .create_instance(&h.user, &vm_req(128 << 20))
        .await
        .unwrap();
    assert!(vm.command.is_empty(), "{:?}", vm.command);
    assert!(vm.env.is_empty(), "{:?}", vm.env);
    // Valid packages are taken (the seed's own test shows them in its user-data).
    let mut req = vm_req(128 << 20);
    req.name = Some("with-packages".into());
    req.packages = vec!["curl".into(), "python3=3.11.2-1+b1".into()];
    h.engine.create_instance(&h.user, &req).await.unwrap();
}

/// Review M3: a VM holds its guest RAM and its QEMU's allowance (what its cgroup allows beyond
/// the RAM; the emulator's, the larger, on a host without KVM), in placement and in the
/// tenant's memory quota.
#[tokio::test]
async fn a_vms_qemu_overhead_counts_in_placement_and_quota() {
    let h = Host::new(Fx::clean(), None, true).await;
    let overhead = gpuvisor_node::vm::qemu::OVERHEAD_TCG;
    // The host has 16 GiB: a VM whose RAM fits but whose QEMU does not is refused...
    let big = (16 << 30) - (64 << 20);
    let err = h
        .engine
        .create_instance(&h.user, &vm_req(big))
        .await
        .unwrap_err();
    refused(&err, code::INSUFFICIENT_RESOURCES, &[]);
    assert!(h.engine.list_instances(&h.admin).await.unwrap().is_empty());
    // ... a container of that size is not.
    let c = h
        .engine
        .create_instance(
            &h.user,
            &wire::CreateInstance {
                runtime: Some(RuntimeKind::Container),
                ..vm_req(big)
            },
        )
        .await
        .unwrap();
    h.terminate_row(&c.id).await;

    // A 1 GiB memory quota: a VM of 1 GiB - overhead/2 is over it.
    h.engine
        .set_tenant_policy(
            &h.admin,
            "acme",
            &wire::TenantPolicy {
                max_memory: Some(1 << 30),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let err = h
        .engine
        .create_instance(&h.user, &vm_req((1 << 30) - overhead / 2))
        .await
        .unwrap_err();
    refused(&err, code::QUOTA_EXCEEDED, &["max_memory"]);
    // A VM of 512 MiB holds 512 MiB + overhead of it: a container of the rest of the RAM's
    // share no longer fits.
    let vm = h
        .engine
        .create_instance(&h.user, &vm_req(512 << 20))
        .await
        .unwrap();
    let rest = (1 << 30) - (512 << 20) - overhead + (1 << 20);
    let err = h
        .engine
        .create_instance(
            &h.user,
            &wire::CreateInstance {
                runtime: Some(RuntimeKind::Container),
                ..vm_req(rest)
            },
        )
        .await
        .unwrap_err();
    refused(&err, code::QUOTA_EXCEEDED, &["max_memory"]);
    let usage = h.engine.get_tenant(&h.admin, "acme").await.unwrap();
    let held = usage.usage.as_ref().map(|u| u.memory);
    assert_eq!(held, Some((512 << 20) + overhead), "{usage:?}");
    h.terminate_row(&vm.id).await;
}

/// Review H2: a volume a VM was given as a raw disk holds whatever a guest wrote, filesystem
/// metadata included; the host kernel never mounts it for a container afterwards. It stays a
/// VM's to use; other volumes are unaffected.
#[tokio::test]
async fn a_volume_a_vm_had_is_never_mounted_for_a_container() {
    let h = Host::new(Fx::clean(), None, true).await;
    let mount = |name: &str| wire::VolumeMount {
        name: name.into(),
        path: "/data".into(),
        size: Some(64 << 20),
    };
    let vm = h
        .engine
        .create_instance(
            &h.user,
            &wire::CreateInstance {
                volumes: vec![mount("guestdisk")],
                ..vm_req(256 << 20)
            },
        )
        .await
        .unwrap();
    h.terminate_row(&vm.id).await;
    let listed = h.engine.list_volumes(&h.user).await.unwrap();
    assert!(
        listed.iter().any(|v| v.name == "guestdisk" && v.vm_only),
        "{listed:?}"
    );
    let err = h
        .create(wire::CreateInstance {
            volumes: vec![mount("guestdisk")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(
        &err,
        code::INVALID_STATE,
        &["\"guestdisk\" has been attached to a VM", "--runtime vm"],
    );
    assert!(h
        .engine
        .list_instances(&h.admin)
        .await
        .unwrap()
        .iter()
        .all(|i| i.state == InstanceState::Terminated));
    // A VM may have it again; a volume no VM had is a container's.
    let again = h
        .engine
        .create_instance(
            &h.user,
            &wire::CreateInstance {
                volumes: vec![mount("guestdisk")],
                ..vm_req(256 << 20)
            },
        )
        .await
        .unwrap();
    h.terminate_row(&again.id).await;
    let c = h
        .create(wire::CreateInstance {
            volumes: vec![mount("hostdisk")],
            ..Default::default()
        })
        .await
        .unwrap();
    h.terminate_row(&c.id).await;
}
