#![allow(clippy::unwrap_used, clippy::expect_used)]
//! What a GPU fraction promises on a host whose GPU backend cannot measure per-process
//! utilisation (sysfs: no driver to ask): the VRAM quota only. The create answer and `instance
//! get` must say so (`gpu_fraction.compute_share_enforced: false`), never claim a share that
//! nothing enforces. Same fixture host as `gpuadmin.rs` (`Node::open` on a fixture root, so the
//! backend is the sysfs scan; needs root and runc, as CI has).

use std::net::Ipv4Addr;
use std::sync::Arc;

use gpuvisor_control::placement::Scheduled;
use gpuvisor_control::store::{ImageRow, Store};
use gpuvisor_control::{Engine, EngineConfig, Principal};
use gpuvisor_node::testfx::{Fx, Kernel};
use gpuvisor_node::{Node, NodeConfig};
use gpuvisor_wire as wire;
use gpuvisor_wire::Role;

/// Not the daemon's default pool, nor `gpuadmin.rs`'s.
const NET_POOL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
const IMAGE: &str = "tools";

struct Host {
    engine: Arc<Engine>,
    #[allow(dead_code)]
    admin: Principal,
    user: Principal,
    #[allow(dead_code)]
    kernel: Arc<Kernel>,
    #[allow(dead_code)]
    fx: Fx,
    _data: tempfile::TempDir,
}

impl Host {
    /// An engine over `fx`, bootstrapped, with a tenant `acme`, its user key and an image row.
    async fn new(fx: Fx) -> Self {
        // What create_instance sizes requests against.
        fx.file("/sys/devices/system/cpu/online", "0-3\n");
        fx.file("/proc/meminfo", "MemTotal:       16777216 kB\n");
        // The presets say AppArmor is on; Node::open would then load a profile into the real
        // host's AppArmor. Not for a fixture.
        fx.file("/sys/module/apparmor/parameters/enabled", "N\n");
        let kernel = Arc::new(Kernel::new(fx.root()));
        let data = tempfile::tempdir().unwrap();
        let cfg = NodeConfig {
            data_dir: data.path().to_path_buf(),
            runtime: "runc".into(),
            simulate_gpus: None,
            net_pool: NET_POOL,
            nat: false,
            pids_limit: 4096,
            root: fx.root(),
            limiter_lib: None,
            limiter_context_bytes: 0,
            limiter_over_quota: Default::default(),
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
                    role: Role::User,
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
}

#[tokio::test]
async fn a_fraction_on_a_sysfs_host_is_vram_only_and_says_so() {
    let h = Host::new(Fx::clean()).await;
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
