#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The engine's VFIO commands, `Engine::bind_vfio` and `Engine::release_gpu`, end to end over a
//! fixture host: `Node::open` on a fixture root (so the GPU backend is the sysfs scan of the
//! fixture tree; NVML is never tried there), a SQLite store in a temporary directory, the
//! daemon's placer. The node layer's tests prove the write sequence against the kernel double;
//! these prove the engine's rules around it (admin only, refused while an instance holds the
//! GPU, passthrough GPUs kept out of placement) and that the engine's writes, made through the
//! node's writer (`Node::with_sys_writer`, here the fixture's kernel double `testfx::Kernel`),
//! leave the host as the kernel would.
//!
//! `Node::open` does real host work: base iptables chains (idempotent, host-wide, shared with
//! the daemon), and a `runc --version` probe. The tests need root and runc, as CI has; they
//! fail (never skip) without them. No reconciler runs, so no per-instance host object is made:
//! instances stay `pending` rows, which hold their GPUs like running ones.

use std::net::Ipv4Addr;
use std::sync::Arc;

use gpuvisor_control::placement::Scheduled;
use gpuvisor_control::store::{ImageRow, Store};
use gpuvisor_control::{Engine, EngineConfig, EngineError, Principal};
use gpuvisor_node::testfx::{Fx, Kernel, GPU, GPU_AUDIO, SATA};
use gpuvisor_node::vfio;
use gpuvisor_node::{Node, NodeConfig};
use gpuvisor_wire as wire;
use gpuvisor_wire::{code, InstanceState, Role};

/// UUID the fixture's `/proc/driver/nvidia/gpus/<addr>/information` gives the GPU.
const UUID: &str = "GPU-11111111-2222-3333-4444-555555555555";
/// Not the daemon's default pool (10.88.0.0), so nothing here can meet a test daemon's rules.
const NET_POOL: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 0);
const IMAGE: &str = "tools";

struct Host {
    engine: Arc<Engine>,
    admin: Principal,
    /// A tenant's key (role user).
    user: Principal,
    /// The node's writer of sysfs: logs and applies the engine's writes.
    kernel: Arc<Kernel>,
    /// Dropped after the engine: it removes the fixture tree.
    fx: Fx,
    _data: tempfile::TempDir,
}

impl Host {
    /// An engine over `fx`, bootstrapped, with a tenant `acme`, its user key and an image row.
    async fn new(fx: Fx) -> Self {
        Self::with_kernel(fx, |k| k).await
    }

    /// Like [`Host::new`], with the kernel double adjusted by `tune` (e.g. slow writes).
    async fn with_kernel(fx: Fx, tune: impl FnOnce(Kernel) -> Kernel) -> Self {
        Self::build(fx, tune, Vec::new()).await
    }

    /// Like [`Host::with_kernel`], with CPUs kept from instances (`serve --reserved-cpus`).
    async fn build(fx: Fx, tune: impl FnOnce(Kernel) -> Kernel, reserved: Vec<u32>) -> Self {
        // What create_instance sizes requests against.
        fx.file("/sys/devices/system/cpu/online", "0-3\n");
        fx.file("/proc/meminfo", "MemTotal:       16777216 kB\n");
        // The presets say AppArmor is on; Node::open would then load a profile into the real
        // host's AppArmor. Not for a fixture.
        fx.file("/sys/module/apparmor/parameters/enabled", "N\n");
        let kernel = Arc::new(tune(Kernel::new(fx.root())));
        let data = tempfile::tempdir().unwrap();
        let cfg = NodeConfig {
            data_dir: data.path().to_path_buf(),
            runtime: "runc".into(),
            simulate_gpus: None,
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
            reserved_cpus: reserved,
        };
        let node = tokio::task::spawn_blocking(move || Node::open(cfg))
            .await
            .unwrap()
            .unwrap_or_else(|e| {
                panic!(
                    "Node::open on the fixture host failed: {e}\n\
                     these tests run as root with iptables and runc installed (as CI does)"
                )
            })
            .with_sys_writer(kernel.clone());
        assert_eq!(
            node.backend().as_str(),
            "sysfs",
            "GPU backend of a fixture root"
        );
        let store = Store::connect(&Store::sqlite_url(&data.path().join("gpuvisor.db")))
            .await
            .unwrap();
        let engine = Engine::new(
            store,
            Arc::new(node),
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
        let secret = engine
            .bootstrap()
            .await
            .unwrap()
            .expect("a fresh store makes the admin key");
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
        assert!(!user.is_admin());
        // A row is all create_instance needs: no reconciler runs, so nothing is unpacked.
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
            admin,
            user,
            kernel,
            fx,
            _data: data,
        }
    }

    async fn clean() -> Self {
        Self::new(Fx::clean()).await
    }

    /// The GPU as `gpu list` shows it.
    async fn listed(&self) -> wire::Gpu {
        let gpus = self.engine.list_gpus(&self.admin).await.unwrap();
        assert_eq!(gpus.len(), 1, "{gpus:?}");
        gpus.into_iter().next().unwrap()
    }

    /// The driver sysfs shows for a function (read as `vfio` reads it).
    fn driver(&self, addr: &str) -> Option<String> {
        vfio::current_driver(&self.fx.root(), addr)
    }

    /// A tenant instance asking for one whole GPU.
    async fn create_with_gpu(&self) -> Result<wire::Instance, EngineError> {
        self.engine
            .create_instance(
                &self.user,
                &wire::CreateInstance {
                    image: IMAGE.into(),
                    gpus: Some(1),
                    vcpus: 1,
                    memory: 256 << 20,
                    container_disk: 1 << 30,
                    ..Default::default()
                },
            )
            .await
    }
}

fn w(path: &str, data: &str) -> (String, String) {
    (path.to_string(), data.to_string())
}

fn assert_code(err: &EngineError, want: &str) {
    assert_eq!(err.code(), want, "{err:?}");
}

#[tokio::test]
async fn bind_and_release_need_an_admin_key() {
    let h = Host::clean().await;
    let err = h.engine.bind_vfio(&h.user, UUID).await.unwrap_err();
    assert!(matches!(err, EngineError::Forbidden(_)), "{err:?}");
    assert_code(&err, code::FORBIDDEN);
    assert!(err.to_string().contains("admin"), "{err}");
    let err = h.engine.release_gpu(&h.user, UUID).await.unwrap_err();
    assert!(matches!(err, EngineError::Forbidden(_)), "{err:?}");

    assert!(h.kernel.writes().is_empty(), "nothing written");
    assert_eq!(h.driver(GPU).as_deref(), Some("nvidia"));
    assert!(!h.listed().await.passthrough_ready);
}

#[tokio::test]
async fn bind_moves_the_gpu_and_its_audio_function_to_vfio_pci() {
    let h = Host::clean().await;
    let before = h.listed().await;
    assert_eq!(before.uuid, UUID);
    assert_eq!(before.pci_address, GPU);
    assert_eq!(before.backend, "sysfs");
    assert_eq!(before.driver.as_deref(), Some("nvidia"));
    assert!(!before.passthrough_ready);

    // By index, as `gpuvisor gpu bind-vfio 0` sends it.
    let gpu = h.engine.bind_vfio(&h.admin, "0").await.unwrap();
    assert_eq!(
        h.kernel.take_writes(),
        vec![
            w(
                "/sys/bus/pci/devices/0000:3b:00.0/driver_override",
                "vfio-pci"
            ),
            w("/sys/bus/pci/drivers/nvidia/unbind", "0000:3b:00.0"),
            w("/sys/bus/pci/drivers_probe", "0000:3b:00.0"),
            w(
                "/sys/bus/pci/devices/0000:3b:00.1/driver_override",
                "vfio-pci"
            ),
            w("/sys/bus/pci/drivers/snd_hda_intel/unbind", "0000:3b:00.1"),
            w("/sys/bus/pci/drivers_probe", "0000:3b:00.1"),
        ]
    );
    for f in [GPU, GPU_AUDIO] {
        assert_eq!(h.kernel.driver_override(f).as_deref(), Some("vfio-pci"));
        assert_eq!(h.driver(f).as_deref(), Some("vfio-pci"), "{f}");
    }
    assert_eq!(gpu.uuid, UUID);
    assert_eq!(gpu.driver.as_deref(), Some("vfio-pci"));
    assert!(gpu.passthrough_ready);
    assert_eq!(h.listed().await, gpu, "gpu list agrees");

    // Again, by PCI address: already bound, nothing written.
    let again = h.engine.bind_vfio(&h.admin, GPU).await.unwrap();
    assert!(again.passthrough_ready);
    assert!(h.kernel.writes().is_empty(), "{:?}", h.kernel.writes());
}

/// CPUs the host reserves (`serve --reserved-cpus`) are no instance's: a request is placed on
/// the others, or refused where they are too few.
#[tokio::test]
async fn reserved_cpus_are_kept_from_placement() {
    let h = Host::build(Fx::clean(), |k| k, vec![0]).await;
    let ask = |vcpus| wire::CreateInstance {
        image: IMAGE.into(),
        vcpus,
        memory: 256 << 20,
        container_disk: 1 << 30,
        ..Default::default()
    };
    let err = h
        .engine
        .create_instance(&h.user, &ask(4))
        .await
        .unwrap_err();
    assert_code(&err, code::INSUFFICIENT_RESOURCES);
    let inst = h.engine.create_instance(&h.user, &ask(3)).await.unwrap();
    assert_eq!(inst.cpus, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_passthrough_gpu_is_not_offered_to_placement() {
    let h = Host::clean().await;
    h.engine.bind_vfio(&h.admin, UUID).await.unwrap();
    let err = h.create_with_gpu().await.unwrap_err();
    assert!(
        matches!(err, EngineError::InsufficientResources(_)),
        "{err:?}"
    );
    assert_code(&err, code::INSUFFICIENT_RESOURCES);
    assert!(h.engine.list_instances(&h.admin).await.unwrap().is_empty());

    // Given back, the same request is placed on it: the refusal was the passthrough.
    h.engine.release_gpu(&h.admin, UUID).await.unwrap();
    let inst = h.create_with_gpu().await.unwrap();
    assert_eq!(inst.gpus.len(), 1);
    assert_eq!(inst.gpus[0].uuid, UUID);
}

#[tokio::test]
async fn release_gives_the_gpu_back_to_the_host_driver() {
    let h = Host::clean().await;
    h.engine.bind_vfio(&h.admin, UUID).await.unwrap();
    h.kernel.take_writes();

    let gpu = h.engine.release_gpu(&h.admin, UUID).await.unwrap();
    assert_eq!(
        h.kernel.take_writes(),
        vec![
            w("/sys/bus/pci/devices/0000:3b:00.0/driver_override", "\n"),
            w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:3b:00.0"),
            w("/sys/bus/pci/drivers_probe", "0000:3b:00.0"),
            w("/sys/bus/pci/devices/0000:3b:00.1/driver_override", "\n"),
            w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:3b:00.1"),
            w("/sys/bus/pci/drivers_probe", "0000:3b:00.1"),
        ]
    );
    for f in [GPU, GPU_AUDIO] {
        assert_eq!(h.kernel.driver_override(f), None, "{f}: override cleared");
    }
    // The fixture kernel's probe binds each function's own driver again.
    assert_eq!(h.driver(GPU).as_deref(), Some("nvidia"));
    assert_eq!(h.driver(GPU_AUDIO).as_deref(), Some("snd_hda_intel"));
    assert_eq!(gpu.driver.as_deref(), Some("nvidia"));
    assert!(!gpu.passthrough_ready);
    assert_eq!(h.listed().await, gpu, "gpu list agrees");

    // Already on the host driver: nothing written.
    let again = h.engine.release_gpu(&h.admin, "0").await.unwrap();
    assert!(!again.passthrough_ready);
    assert!(h.kernel.writes().is_empty(), "{:?}", h.kernel.writes());
}

#[tokio::test]
async fn bind_refuses_a_shared_iommu_group_and_writes_nothing() {
    let h = Host::new(Fx::shared_group()).await;
    let err = h.engine.bind_vfio(&h.admin, UUID).await.unwrap_err();
    assert!(matches!(err, EngineError::InvalidState(_)), "{err:?}");
    assert_code(&err, code::INVALID_STATE);
    let msg = err.to_string();
    assert!(msg.contains("IOMMU group 17"), "{msg}");
    assert!(msg.contains(SATA), "names the intruder: {msg}");

    assert!(h.kernel.writes().is_empty(), "{:?}", h.kernel.writes());
    assert_eq!(h.kernel.driver_override(GPU), None);
    assert_eq!(h.driver(GPU).as_deref(), Some("nvidia"));
    assert_eq!(h.driver(GPU_AUDIO).as_deref(), Some("snd_hda_intel"));
    assert_eq!(h.driver(SATA).as_deref(), Some("ahci"));
    assert!(!h.listed().await.passthrough_ready);
}

#[tokio::test]
async fn an_unknown_gpu_is_not_found() {
    let h = Host::clean().await;
    for r in [
        "1",
        "GPU-99999999-2222-3333-4444-555555555555",
        "0000:99:00.0",
        // The audio function is on the bus but is no GPU.
        GPU_AUDIO,
    ] {
        let err = h.engine.bind_vfio(&h.admin, r).await.unwrap_err();
        assert!(matches!(err, EngineError::NotFound(_)), "{r}: {err:?}");
        assert_code(&err, code::NOT_FOUND);
        let err = h.engine.release_gpu(&h.admin, r).await.unwrap_err();
        assert!(matches!(err, EngineError::NotFound(_)), "{r}: {err:?}");
    }
    let err = h.engine.bind_vfio(&h.admin, " ").await.unwrap_err();
    assert!(matches!(err, EngineError::InvalidArgument(_)), "{err:?}");
    assert!(h.kernel.writes().is_empty(), "{:?}", h.kernel.writes());
    assert_eq!(h.driver(GPU).as_deref(), Some("nvidia"));
}

#[tokio::test]
async fn bind_is_refused_while_an_instance_holds_the_gpu() {
    let h = Host::clean().await;
    let inst = h.create_with_gpu().await.unwrap();
    assert_eq!(inst.state, InstanceState::Pending);
    assert_eq!(inst.gpus[0].uuid, UUID);

    let refused = |err: EngineError| {
        assert!(matches!(err, EngineError::InUse(_)), "{err:?}");
        assert_code(&err, code::IN_USE);
        assert!(
            err.to_string().contains(&inst.id),
            "names the instance: {err}"
        );
    };
    // Pending: the row already holds the GPU.
    refused(h.engine.bind_vfio(&h.admin, UUID).await.unwrap_err());
    // Release too: someone may have bound it outside gpuvisor under the instance.
    refused(h.engine.release_gpu(&h.admin, UUID).await.unwrap_err());

    // Stopped instances keep their reservation, so they keep the GPU too.
    let store = h.engine.store();
    assert!(store
        .set_state(&inst.id, InstanceState::Stopped, None, 1)
        .await
        .unwrap());
    refused(h.engine.bind_vfio(&h.admin, UUID).await.unwrap_err());
    assert!(h.kernel.writes().is_empty(), "{:?}", h.kernel.writes());
    assert_eq!(h.driver(GPU).as_deref(), Some("nvidia"));

    // Terminated: the GPU is free.
    assert!(store
        .set_state(&inst.id, InstanceState::Terminated, None, 2)
        .await
        .unwrap());
    let gpu = h.engine.bind_vfio(&h.admin, UUID).await.unwrap();
    assert!(gpu.passthrough_ready);
    assert_eq!(h.driver(GPU).as_deref(), Some("vfio-pci"));
}

/// Issue 9 item 11: a create racing a bind must not land on the GPU while it changes hands.
/// The kernel double makes each sysfs write take 150 ms; the create starts once the bind has
/// made its first write. Without the placement lock around the bind, the create places on the
/// GPU that is being handed to vfio-pci (and both succeed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_racing_a_bind_never_lands_on_the_gpu_changing_hands() {
    let h = Host::with_kernel(Fx::clean(), |k| {
        k.slow_writes(std::time::Duration::from_millis(150))
    })
    .await;
    let (engine, admin) = (h.engine.clone(), h.admin.clone());
    let bind = tokio::spawn(async move { engine.bind_vfio(&admin, UUID).await });
    while h.kernel.writes().is_empty() {
        assert!(!bind.is_finished(), "bind ended before its first write");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let created = h.create_with_gpu().await;
    let bound = bind.await.unwrap();
    let gpu = bound.expect("the bind started first and nothing held the GPU");
    assert!(gpu.passthrough_ready);
    let err = created.expect_err("create landed on a GPU being bound to vfio-pci");
    assert_code(&err, code::INSUFFICIENT_RESOURCES);

    // And the other way: a GPU an instance holds is never bound, however the two interleave.
    h.engine.release_gpu(&h.admin, UUID).await.unwrap();
    let (engine, admin) = (h.engine.clone(), h.admin.clone());
    let (inst, bind) = tokio::join!(h.create_with_gpu(), async move {
        engine.bind_vfio(&admin, UUID).await
    });
    assert!(
        inst.is_ok() != bind.is_ok(),
        "exactly one of create and bind gets the GPU: {inst:?} / {bind:?}"
    );
}

/// Issue 9 item 1: an image is a stranger's; its `Env` entries for platform-owned names (the
/// limiter's config path, which GPUs the instance sees) never reach the instance's stored spec,
/// while its other entries do. (The user's own are refused by validation: tests/attacks.)
#[tokio::test]
async fn an_image_cannot_set_platform_owned_environment() {
    let h = Host::clean().await;
    h.engine
        .store()
        .insert_image(&ImageRow {
            owner: String::new(),
            source: String::new(),
            name: "hostile".into(),
            digest: format!("sha256:{}", "cd".repeat(32)),
            layers: vec![],
            size: 0,
            command: vec!["sleep".into(), "infinity".into()],
            env: vec![
                "GPUVISOR_LIMITER_CONFIG=/tmp/none".into(),
                "CUDA_VISIBLE_DEVICES=0,1,2,3".into(),
                "CUDA_MPS_PIPE_DIRECTORY=/tmp/other-tenant".into(),
                "LD_LIBRARY_PATH=/opt/lib".into(),
            ],
            created_at: 0,
        })
        .await
        .unwrap();
    let inst = h
        .engine
        .create_instance(
            &h.user,
            &wire::CreateInstance {
                image: "hostile".into(),
                vcpus: 1,
                memory: 256 << 20,
                container_disk: 1 << 30,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let row = h.engine.store().instance(&inst.id).await.unwrap().unwrap();
    assert_eq!(row.spec.env, vec!["LD_LIBRARY_PATH=/opt/lib".to_string()]);
}

/// What a GPU fraction promises on a host whose GPU backend cannot measure per-process
/// utilisation (sysfs, as this fixture host is): the VRAM quota only. The create answer and
/// `instance get` must say so (`gpu_fraction.compute_share_enforced: false`), never claim a share
/// that nothing enforces.
#[tokio::test]
async fn a_fraction_on_a_sysfs_host_is_vram_only_and_says_so() {
    let h = Host::clean().await;
    let created = h
        .engine
        .create_instance(
            &h.user,
            &wire::CreateInstance {
                image: IMAGE.into(),
                gpu_fraction: Some(0.25),
                vram: Some(1 << 30),
                vcpus: 1,
                memory: 256 << 20,
                container_disk: 1 << 30,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for inst in [
        created.clone(),
        h.engine.get_instance(&h.user, &created.id).await.unwrap(),
    ] {
        let f = inst
            .gpu_fraction
            .clone()
            .unwrap_or_else(|| panic!("no gpu_fraction in {inst:?}"));
        assert!(f.vram_quota_enforced);
        assert!(!f.compute_share_enforced, "{f:?}");
        assert!(!f.bypass_detection, "{f:?}");
        assert!(f.summary.contains("NOT enforced"), "{}", f.summary);
    }
    // A whole GPU promises nothing of the kind.
    let whole = h
        .engine
        .create_instance(
            &h.user,
            &wire::CreateInstance {
                image: IMAGE.into(),
                gpus: Some(1),
                vcpus: 1,
                memory: 256 << 20,
                container_disk: 1 << 30,
                ..Default::default()
            },
        )
        .await;
    if let Ok(w) = whole {
        assert!(w.gpu_fraction.is_none(), "{w:?}");
    }
}
