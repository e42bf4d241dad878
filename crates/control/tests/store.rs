#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Integration tests of [`Store`]: every test body runs against SQLite (a file in a temporary
//! directory) and, when `GPUVISOR_TEST_POSTGRES_URL` is set (see `scripts/ci-postgres`), against
//! PostgreSQL in a database created for that test alone and dropped after it. Same code for both:
//! the store promises one code path, so the tests hold it to that.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};

use gpuvisor_control::store::{
    AuditAnchor, AuditRow, EventRow, GpuRow, ImageRow, InstanceRow, InstanceSpec, KeyRow,
    RestartRow, RestoreSpec, SnapshotRow, Store, StoreError, VolumeRow,
};
use gpuvisor_wire::{
    GpuBinding, InstanceState, PortSpec, RestartPolicy, Role, RuntimeKind, SnapshotState,
    VolumeMount, VolumeState,
};
use sqlx::{AnyPool, AssertSqlSafe, Connection, Row};

const PG_ENV: &str = "GPUVISOR_TEST_POSTGRES_URL";

/// What a test body gets: the store under test and a second pool on the same database, for
/// looking at (or arranging) rows that the store has no method for.
struct Db {
    store: Store,
    raw: AnyPool,
    url: String,
    backend: &'static str,
}

/// Runs `test` against every configured backend, each with an empty, migrated database.
async fn for_each_backend<F, Fut>(test: F)
where
    F: Fn(Db) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let url = Store::sqlite_url(&dir.path().join("gpuvisor.db"));
    if let Err(panic) = run_on(&url, "sqlite", &test).await {
        std::panic::resume_unwind(panic);
    }

    let Some(server) = std::env::var(PG_ENV).ok().filter(|s| !s.is_empty()) else {
        gpuvisor_node::testfx::prerequisite_missing(&format!(
            "PostgreSQL ({PG_ENV}; `eval \"$(scripts/ci-postgres)\"` sets it)"
        ));
        return;
    };
    let name = fresh_db_name();
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("connect to {PG_ENV}: {e}"));
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    let result = run_on(&with_database(&server, &name), "postgres", &test).await;
    // FORCE: a failed test may leave connections behind. An autovacuum worker that just
    // connected to the new database is the server's, which this role may not end: tried
    // again until it has gone.
    let mut tries = 0;
    loop {
        let dropped = sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
        match dropped {
            Ok(_) => break,
            Err(e) if tries < 50 && e.to_string().contains("pg_signal_backend") => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("drop database {name}: {e}"),
        }
    }
    admin.close().await.ok();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Runs one test body on its own task, so that a panic comes back here and the database can
/// still be cleaned up.
async fn run_on<F, Fut>(
    url: &str,
    backend: &'static str,
    test: &F,
) -> Result<(), Box<dyn std::any::Any + Send>>
where
    F: Fn(Db) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let store = Store::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{backend}: connect store: {e}"));
    let raw = AnyPool::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{backend}: connect raw pool: {e}"));
    let result = tokio::spawn(test(Db {
        store: store.clone(),
        raw: raw.clone(),
        url: url.to_string(),
        backend,
    }))
    .await;
    store.close().await;
    raw.close().await;
    result.map_err(|e| {
        eprintln!("store test failed on {backend}");
        match e.try_into_panic() {
            Ok(panic) => panic,
            Err(e) => Box::new(e.to_string()),
        }
    })
}

fn fresh_db_name() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "gv_test_{}_{}_{}",
        std::process::id(),
        nanos,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// `postgres://u:p@host:port/db?opts` with `db` replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let server = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

fn assert_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>, backend: &str, what: &str) {
    match r {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("{backend}: {what}: expected a conflict, got {other:?}"),
    }
}

// --- fixtures -------------------------------------------------------------------------------

fn key_row(id: &str, tenant: &str, role: Role, at: i64) -> KeyRow {
    KeyRow {
        id: id.into(),
        tenant_id: tenant.into(),
        role,
        created_at: at,
        revoked_at: None,
    }
}

fn gpu_row(uuid: &str, node: &str, index: u32, numa: Option<u32>) -> GpuRow {
    GpuRow {
        uuid: uuid.into(),
        node_id: node.into(),
        index,
        model: "A100-80GB".into(),
        vram: 80 * (1 << 30),
        pci_address: format!("0000:{:02x}:00.0", 0x10 + index),
        numa_node: numa,
        backend: "simulated".into(),
    }
}

fn image_row(name: &str, at: i64) -> ImageRow {
    ImageRow {
        owner: String::new(),
        source: String::new(),
        name: name.into(),
        digest: format!("sha256:{name}"),
        layers: vec!["sha256:aaa".into(), "sha256:bbb".into()],
        size: 5_000_000_000,
        command: vec!["/bin/sh".into(), "-c".into(), "sleep infinity".into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        created_at: at,
    }
}

fn instance_row(id: &str, tenant: &str, name: &str, at: i64) -> InstanceRow {
    InstanceRow {
        id: id.into(),
        name: name.into(),
        tenant_id: tenant.into(),
        node_id: "node-1".into(),
        image: "ubuntu".into(),
        state: InstanceState::Pending,
        desired: InstanceState::Running,
        reason: None,
        spec: InstanceSpec {
            vcpus: 4,
            memory: 16 << 30,
            container_disk: 20 << 30,
            volumes: vec![VolumeMount {
                name: "data".into(),
                path: "/data".into(),
                size: Some(10 << 30),
            }],
            env: vec!["A=1".into()],
            ports: vec![PortSpec {
                port: 8888,
                protocol: "http".into(),
                public: false,
                host_port: None,
            }],
            command: vec!["python".into(), "train.py".into()],
            ..Default::default()
        },
        cpus: vec![0, 1, 2, 3],
        gpus: vec![GpuBinding {
            uuid: "GPU-1".into(),
            index: 0,
            model: "A100-80GB".into(),
            milli: 500,
            vram: 40 << 30,
        }],
        ip_host: 254,
        created_at: at,
        updated_at: at,
        restart: RestartRow {
            policy: RestartPolicy::OnFailure { max: Some(3) },
            count: 2,
            not_before: at + 4000,
            backoff_ms: 4000,
            started_at: at - 1,
            exit_code: Some(3),
        },
        // Not the default: a round trip that dropped the column would read `container`.
        runtime: gpuvisor_wire::RuntimeKind::Vm,
    }
}

/// Instances reference a tenant; most instance tests need one.
async fn with_tenant(store: &Store, id: &str) {
    store
        .create_tenant(id, &format!("name-{id}"), 1, u32::MAX)
        .await
        .unwrap();
}

// --- tenants --------------------------------------------------------------------------------

#[tokio::test]
async fn tenants_get_lowest_free_net_slot() {
    for_each_backend(
        |Db {
             store,
             raw,
             backend,
             ..
         }| async move {
            let a = store
                .create_tenant("t-a", "alpha", 10, u32::MAX)
                .await
                .unwrap()
                .unwrap();
            let b = store
                .create_tenant("t-b", "beta", 20, u32::MAX)
                .await
                .unwrap()
                .unwrap();
            let c = store
                .create_tenant("t-c", "gamma", 30, u32::MAX)
                .await
                .unwrap()
                .unwrap();
            assert_eq!((a.net_slot, b.net_slot, c.net_slot), (0, 1, 2), "{backend}");
            assert_eq!(
                a,
                gpuvisor_control::store::TenantRow {
                    id: "t-a".into(),
                    name: "alpha".into(),
                    net_slot: 0,
                    created_at: 10,
                    policy: Default::default(),
                    limits: Default::default(),
                    deleting_at: None,
                },
                "{backend}"
            );
            // A policy set by an admin is kept and read back whole.
            let policy = gpuvisor_wire::TenantPolicy {
                max_vcpus: Some(8),
                max_memory: Some(64 << 30),
                max_priority: gpuvisor_wire::PriorityClass::High,
                preempt_other_tenants: true,
                ..Default::default()
            };
            assert!(store.set_tenant_policy("t-a", &policy).await.unwrap());
            assert!(!store.set_tenant_policy("nope", &policy).await.unwrap());
            assert_eq!(
                store.tenant("t-a").await.unwrap().unwrap().policy,
                policy,
                "{backend}"
            );
            assert_eq!(
                store.tenant_by_name("beta").await.unwrap().unwrap().policy,
                Default::default(),
                "{backend}"
            );

            // Deleting a tenant frees its slot (and its keys go with it).
            store
                .insert_key(
                    &gpuvisor_control::store::KeyRow {
                        id: "k-b".into(),
                        tenant_id: "t-b".into(),
                        role: Role::Member,
                        created_at: 21,
                        revoked_at: None,
                    },
                    "hash-b",
                )
                .await
                .unwrap();
            assert!(store.delete_tenant("t-b").await.unwrap(), "{backend}");
            assert!(
                store.key("k-b").await.unwrap().is_none(),
                "{backend}: keys deleted"
            );
            let d = store
                .create_tenant("t-d", "delta", 40, u32::MAX)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.net_slot, 1, "{backend}: reuses the freed slot");
            let e = store
                .create_tenant("t-e", "epsilon", 50, u32::MAX)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(e.net_slot, 3, "{backend}: no gap left, next slot");

            // Refused while it holds a volume; then marked, keys revoked, and deleted.
            store
                .insert_key(
                    &gpuvisor_control::store::KeyRow {
                        id: "k-a".into(),
                        tenant_id: "t-a".into(),
                        role: Role::Member,
                        created_at: 11,
                        revoked_at: None,
                    },
                    "hash-a",
                )
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO volumes (tenant_id, name, size, created_at) VALUES ($1, 'v', 1, 1)",
            )
            .bind("t-a")
            .execute(&raw)
            .await
            .unwrap();
            assert!(
                !store.delete_tenant("t-a").await.unwrap(),
                "{backend}: holds a volume"
            );
            store.mark_tenant_deleting("t-a", 70).await.unwrap();
            assert_eq!(
                store.key("k-a").await.unwrap().unwrap().revoked_at,
                Some(70)
            );
            let deleting = store.deleting_tenants().await.unwrap();
            assert_eq!(deleting.len(), 1, "{backend}");
            assert_eq!(deleting[0].deleting_at, Some(70), "{backend}");
            assert!(store.delete_volume("t-a", "v").await.unwrap());
            assert!(store.delete_tenant("t-a").await.unwrap(), "{backend}");
            assert!(store.deleting_tenants().await.unwrap().is_empty());
            let f = store
                .create_tenant("t-f", "zeta", 60, u32::MAX)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(f.net_slot, 0, "{backend}: lowest free slot first");
            // A pool of 4 slots is full now: no tenant, no row.
            assert_eq!(
                store.create_tenant("t-g", "eta", 70, 4).await.unwrap(),
                None
            );
            assert!(store.tenant("t-g").await.unwrap().is_none(), "{backend}");

            let all = store.tenants().await.unwrap();
            let ids: Vec<_> = all.iter().map(|t| t.id.as_str()).collect();
            assert_eq!(ids, ["t-c", "t-d", "t-e", "t-f"], "{backend}: by creation");
            let slots: Vec<_> = all.iter().map(|t| t.net_slot).collect();
            assert_eq!(slots, [2, 1, 3, 0], "{backend}");
        },
    )
    .await;
}

#[tokio::test]
async fn tenant_lookups_and_name_conflict() {
    for_each_backend(|Db { store, backend, .. }| async move {
        assert!(store.tenants().await.unwrap().is_empty(), "{backend}");
        assert_eq!(store.tenant("t-1").await.unwrap(), None, "{backend}");
        assert_eq!(
            store.tenant_by_name("acme").await.unwrap(),
            None,
            "{backend}"
        );

        let t = store
            .create_tenant("t-1", "acme", 100, u32::MAX)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.tenant("t-1").await.unwrap(),
            Some(t.clone()),
            "{backend}"
        );
        assert_eq!(
            store.tenant_by_name("acme").await.unwrap(),
            Some(t.clone()),
            "{backend}"
        );

        assert_conflict(
            store.create_tenant("t-2", "acme", 200, u32::MAX).await,
            backend,
            "same tenant name",
        );
        assert_conflict(
            store.create_tenant("t-1", "other", 200, u32::MAX).await,
            backend,
            "same tenant id",
        );
        assert_eq!(store.tenants().await.unwrap(), vec![t], "{backend}");

        // Same creation time: ordered by name.
        store
            .create_tenant("t-3", "zulu", 300, u32::MAX)
            .await
            .unwrap()
            .unwrap();
        store
            .create_tenant("t-4", "bravo", 300, u32::MAX)
            .await
            .unwrap()
            .unwrap();
        let names: Vec<_> = store
            .tenants()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["acme", "bravo", "zulu"], "{backend}");
    })
    .await;
}

// --- keys -----------------------------------------------------------------------------------

#[tokio::test]
async fn keys_insert_lookup_and_revoke() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        let admin = key_row("k-1", "t-1", Role::Admin, 10);
        let user = key_row("k-2", "t-1", Role::Member, 20);
        store.insert_key(&admin, "hash-1").await.unwrap();
        store.insert_key(&user, "hash-2").await.unwrap();

        assert_eq!(
            store.key_by_hash("hash-1").await.unwrap(),
            Some(admin.clone()),
            "{backend}"
        );
        assert_eq!(
            store.key_by_hash("hash-2").await.unwrap(),
            Some(user.clone()),
            "{backend}"
        );
        assert_eq!(store.key_by_hash("nope").await.unwrap(), None, "{backend}");
        assert_eq!(
            store.key("k-2").await.unwrap(),
            Some(user.clone()),
            "{backend}"
        );
        assert_eq!(store.key("k-9").await.unwrap(), None, "{backend}");
        assert_eq!(
            store.keys().await.unwrap(),
            vec![admin.clone(), user.clone()],
            "{backend}"
        );

        assert!(
            !store.revoke_key("k-1", 50).await.unwrap(),
            "{backend}: the last admin key stays"
        );
        let spare = key_row("k-3", "t-1", Role::Admin, 30);
        store.insert_key(&spare, "hash-3").await.unwrap();
        assert!(store.revoke_key("k-1", 50).await.unwrap(), "{backend}");
        assert!(
            !store.revoke_key("k-1", 60).await.unwrap(),
            "{backend}: already revoked"
        );
        assert!(
            !store.revoke_key("k-3", 60).await.unwrap(),
            "{backend}: now k-3 is the last admin key"
        );
        assert!(
            !store.revoke_key("k-9", 60).await.unwrap(),
            "{backend}: no such key"
        );
        assert_eq!(
            store.key_by_hash("hash-1").await.unwrap(),
            None,
            "{backend}: a revoked key does not authenticate"
        );
        let revoked = KeyRow {
            revoked_at: Some(50),
            ..admin.clone()
        };
        assert_eq!(
            store.key("k-1").await.unwrap(),
            Some(revoked.clone()),
            "{backend}: first revocation time kept"
        );
        assert_eq!(
            store.keys().await.unwrap(),
            vec![revoked, user.clone(), spare],
            "{backend}"
        );
        assert_eq!(
            store.key_by_hash("hash-2").await.unwrap(),
            Some(user),
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn keys_conflicts_and_foreign_keys() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        store
            .insert_key(&key_row("k-1", "t-1", Role::Member, 10), "hash-1")
            .await
            .unwrap();
        assert_conflict(
            store
                .insert_key(&key_row("k-2", "t-1", Role::Member, 10), "hash-1")
                .await,
            backend,
            "same key hash",
        );
        assert_conflict(
            store
                .insert_key(&key_row("k-1", "t-1", Role::Member, 10), "hash-3")
                .await,
            backend,
            "same key id",
        );
        let orphan = store
            .insert_key(&key_row("k-4", "t-404", Role::Member, 10), "hash-4")
            .await;
        assert!(
            matches!(orphan, Err(StoreError::Db(_))),
            "{backend}: key of an unknown tenant: {orphan:?}"
        );
        assert_eq!(store.keys().await.unwrap().len(), 1, "{backend}");
    })
    .await;
}

// --- nodes and GPUs -------------------------------------------------------------------------

#[tokio::test]
async fn upsert_node_inserts_then_updates() {
    for_each_backend(
        |Db {
             store,
             raw,
             backend,
             ..
         }| async move {
            async fn node(raw: &AnyPool, id: &str) -> Vec<(String, i64, i64, i64)> {
                sqlx::query("SELECT hostname, cpus, memory, updated_at FROM nodes WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_all(raw)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| {
                        (
                            r.get::<String, _>("hostname"),
                            r.get::<i64, _>("cpus"),
                            r.get::<i64, _>("memory"),
                            r.get::<i64, _>("updated_at"),
                        )
                    })
                    .collect()
            }

            let big: u64 = 2 << 40;
            store
                .upsert_node("node-1", "gpu-a", 64, big, 10)
                .await
                .unwrap();
            assert_eq!(
                node(&raw, "node-1").await,
                [("gpu-a".into(), 64, big as i64, 10)],
                "{backend}"
            );
            store
                .upsert_node("node-1", "gpu-a.example", 128, big * 2, 20)
                .await
                .unwrap();
            assert_eq!(
                node(&raw, "node-1").await,
                [("gpu-a.example".into(), 128, (big * 2) as i64, 20)],
                "{backend}: updated in place"
            );
            store
                .upsert_node("node-2", "gpu-b", 8, 1 << 30, 30)
                .await
                .unwrap();
            let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM nodes")
                .fetch_one(&raw)
                .await
                .unwrap()
                .get("n");
            assert_eq!(count, 2, "{backend}");
        },
    )
    .await;
}

#[tokio::test]
async fn replace_gpus_replaces_one_nodes_inventory() {
    for_each_backend(|Db { store, backend, .. }| async move {
        assert!(store.gpus().await.unwrap().is_empty(), "{backend}");
        store
            .upsert_node("node-1", "a", 8, 1 << 30, 1)
            .await
            .unwrap();
        store
            .upsert_node("node-2", "b", 8, 1 << 30, 1)
            .await
            .unwrap();

        let n1 = vec![
            gpu_row("GPU-b", "node-1", 1, None),
            gpu_row("GPU-a", "node-1", 0, Some(0)),
        ];
        store.replace_gpus("node-1", &n1, 5).await.unwrap();
        let n2 = vec![gpu_row("GPU-c", "node-2", 0, Some(1))];
        store.replace_gpus("node-2", &n2, 5).await.unwrap();
        assert_eq!(
            store.gpus().await.unwrap(),
            vec![n1[1].clone(), n1[0].clone(), n2[0].clone()],
            "{backend}: by node, then index"
        );

        // The new inventory replaces the old one; the other node's stays.
        let n1_new = vec![gpu_row("GPU-d", "node-1", 0, Some(1))];
        store.replace_gpus("node-1", &n1_new, 6).await.unwrap();
        assert_eq!(
            store.gpus().await.unwrap(),
            vec![n1_new[0].clone(), n2[0].clone()],
            "{backend}"
        );

        // A failing replacement (duplicate UUID) changes nothing.
        let dup = vec![
            gpu_row("GPU-e", "node-1", 0, None),
            gpu_row("GPU-e", "node-1", 1, None),
        ];
        assert_conflict(
            store.replace_gpus("node-1", &dup, 7).await,
            backend,
            "duplicate GPU uuid",
        );
        assert_eq!(
            store.gpus().await.unwrap(),
            vec![n1_new[0].clone(), n2[0].clone()],
            "{backend}: rolled back"
        );

        store.replace_gpus("node-1", &[], 8).await.unwrap();
        assert_eq!(
            store.gpus().await.unwrap(),
            vec![n2[0].clone()],
            "{backend}: emptied"
        );

        let unknown = store
            .replace_gpus("node-404", &[gpu_row("GPU-x", "node-404", 0, None)], 9)
            .await;
        assert!(
            matches!(unknown, Err(StoreError::Db(_))),
            "{backend}: GPUs of an unknown node: {unknown:?}"
        );
    })
    .await;
}

// --- images ---------------------------------------------------------------------------------

#[tokio::test]
async fn images_insert_get_list_delete() {
    for_each_backend(|Db { store, backend, .. }| async move {
        assert!(store.images().await.unwrap().is_empty(), "{backend}");
        let ubuntu = image_row("ubuntu", 10);
        let alpine = ImageRow {
            layers: vec![],
            command: vec![],
            env: vec![],
            ..image_row("alpine", 20)
        };
        store.insert_image(&ubuntu).await.unwrap();
        store.insert_image(&alpine).await.unwrap();

        assert_eq!(
            store.image("ubuntu").await.unwrap(),
            Some(ubuntu.clone()),
            "{backend}"
        );
        assert_eq!(
            store.image("alpine").await.unwrap(),
            Some(alpine.clone()),
            "{backend}"
        );
        assert_eq!(store.image("debian").await.unwrap(), None, "{backend}");
        assert_eq!(
            store.images().await.unwrap(),
            vec![alpine.clone(), ubuntu.clone()],
            "{backend}: by name"
        );

        assert_conflict(
            store.insert_image(&image_row("ubuntu", 30)).await,
            backend,
            "same image name",
        );
        assert_eq!(
            store.image("ubuntu").await.unwrap(),
            Some(ubuntu),
            "{backend}: first one kept"
        );

        assert!(store.delete_image("ubuntu").await.unwrap(), "{backend}");
        assert!(
            !store.delete_image("ubuntu").await.unwrap(),
            "{backend}: already gone"
        );
        assert_eq!(store.image("ubuntu").await.unwrap(), None, "{backend}");
        assert_eq!(store.images().await.unwrap(), vec![alpine], "{backend}");

        // The name is free again.
        store.insert_image(&image_row("ubuntu", 40)).await.unwrap();
        assert_eq!(store.images().await.unwrap().len(), 2, "{backend}");
    })
    .await;
}

/// Registry pulls (migration 0006): images owned by a tenant beside public ones of the same
/// name, publishing, sealed credentials per tenant and host, pull jobs.
#[tokio::test]
async fn image_owners_credentials_and_pulls() {
    use gpuvisor_control::store::{CredentialRow, PullRow};
    for_each_backend(|Db { store, backend, .. }| async move {
        let a = store
            .create_tenant("t-a", "alpha", 10, u32::MAX)
            .await
            .unwrap()
            .unwrap();
        let b = store
            .create_tenant("t-b", "beta", 20, u32::MAX)
            .await
            .unwrap()
            .unwrap();
        store.insert_image(&image_row("app", 1)).await.unwrap();
        let mine = ImageRow {
            owner: a.id.clone(),
            source: "reg:5000/app:1".into(),
            ..image_row("app", 2)
        };
        store.insert_image(&mine).await.unwrap();
        // The owner sees its own first; another tenant the public one.
        assert_eq!(
            store.image_visible(&a.id, "app").await.unwrap(),
            Some(mine.clone()),
            "{backend}"
        );
        assert_eq!(
            store
                .image_visible(&b.id, "app")
                .await
                .unwrap()
                .unwrap()
                .owner,
            "",
            "{backend}"
        );
        assert_eq!(
            store.images_visible(&b.id).await.unwrap().len(),
            1,
            "{backend}"
        );
        assert_eq!(
            store.images_visible(&a.id).await.unwrap().len(),
            2,
            "{backend}"
        );
        // Publishing onto a public name conflicts; after removing that, it works.
        assert_conflict(
            store.publish_image(&a.id, "app").await.map(|_| ()),
            backend,
            "publish over a public image",
        );
        assert!(store.delete_image("app").await.unwrap(), "{backend}");
        assert!(
            store.publish_image(&a.id, "app").await.unwrap(),
            "{backend}"
        );
        assert_eq!(
            store.image("app").await.unwrap().unwrap().source,
            "reg:5000/app:1",
            "{backend}"
        );
        assert_eq!(
            store.image_of(&a.id, "app").await.unwrap(),
            None,
            "{backend}"
        );

        let cred = |t: &str, user: &str| CredentialRow {
            tenant_id: t.to_string(),
            host: "reg:5000".into(),
            username: user.into(),
            secret: "v1:sealed".into(),
            created_at: 5,
        };
        store.put_credential(&cred(&a.id, "u1")).await.unwrap();
        store.put_credential(&cred(&a.id, "u2")).await.unwrap();
        assert_eq!(
            store.credentials(&a.id).await.unwrap(),
            vec![cred(&a.id, "u2")],
            "{backend}: replaced"
        );
        assert_eq!(
            store.credential(&b.id, "reg:5000").await.unwrap(),
            None,
            "{backend}"
        );
        assert!(
            store.delete_credential(&a.id, "reg:5000").await.unwrap(),
            "{backend}"
        );
        assert!(
            store.credentials(&a.id).await.unwrap().is_empty(),
            "{backend}"
        );

        let job = PullRow {
            id: "pull-1".into(),
            tenant_id: a.id.clone(),
            reference: "reg:5000/app:1".into(),
            name: "app".into(),
            state: "running".into(),
            error: None,
            digest: None,
            created_at: 1,
            updated_at: 1,
        };
        store.insert_pull(&job).await.unwrap();
        assert_eq!(
            store.pulls_in("running").await.unwrap(),
            vec![job.clone()],
            "{backend}"
        );
        store
            .finish_pull("pull-1", "failed", Some("cut"), None, 9)
            .await
            .unwrap();
        let got = store.pull("pull-1").await.unwrap().unwrap();
        assert_eq!(
            (got.state.as_str(), got.error.as_deref(), got.updated_at),
            ("failed", Some("cut"), 9),
            "{backend}"
        );
        assert!(
            store.pulls_in("running").await.unwrap().is_empty(),
            "{backend}"
        );
        assert_eq!(store.prune_pulls(10).await.unwrap(), 1, "{backend}");

        // What `tenant rm` removes of a tenant's registry data.
        let theirs = ImageRow {
            owner: b.id.clone(),
            ..image_row("b-app", 3)
        };
        store.insert_image(&theirs).await.unwrap();
        store.put_credential(&cred(&b.id, "u")).await.unwrap();
        assert_eq!(
            store.tenant_image_count(&b.id).await.unwrap(),
            1,
            "{backend}"
        );
        assert_eq!(
            store.delete_tenant_registry_data(&b.id).await.unwrap(),
            1,
            "{backend}"
        );
        assert_eq!(
            store.tenant_image_count(&b.id).await.unwrap(),
            0,
            "{backend}"
        );
        assert!(
            store.credentials(&b.id).await.unwrap().is_empty(),
            "{backend}"
        );
        assert!(
            store.image("app").await.unwrap().is_some(),
            "{backend}: public kept"
        );
    })
    .await;
}

// --- volumes --------------------------------------------------------------------------------

#[tokio::test]
async fn volumes_are_per_tenant() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        with_tenant(&store, "t-2").await;
        let vol = |t: &str, n: &str, size: u64| VolumeRow {
            tenant_id: t.into(),
            name: n.into(),
            size,
            created_at: 7,
            state: VolumeState::Ready,
            vm_touched: false,
        };
        let data1 = vol("t-1", "data", 10 << 30);
        let cache1 = vol("t-1", "cache", 1 << 40);
        let data2 = vol("t-2", "data", 5 << 30);
        for v in [&data1, &cache1, &data2] {
            store.insert_volume(v).await.unwrap();
        }

        assert_eq!(
            store.volumes(Some("t-1")).await.unwrap(),
            vec![cache1.clone(), data1.clone()],
            "{backend}"
        );
        assert_eq!(
            store.volumes(Some("t-2")).await.unwrap(),
            vec![data2.clone()],
            "{backend}"
        );
        assert!(
            store.volumes(Some("t-3")).await.unwrap().is_empty(),
            "{backend}"
        );
        assert_eq!(
            store.volumes(None).await.unwrap(),
            vec![cache1.clone(), data1.clone(), data2.clone()],
            "{backend}: by tenant, then name"
        );
        assert_eq!(
            store.volume("t-2", "data").await.unwrap(),
            Some(data2.clone()),
            "{backend}"
        );
        assert_eq!(
            store.volume("t-2", "cache").await.unwrap(),
            None,
            "{backend}"
        );

        assert_conflict(
            store.insert_volume(&vol("t-1", "data", 1)).await,
            backend,
            "same volume name in one tenant",
        );
        let orphan = store.insert_volume(&vol("t-404", "data", 1)).await;
        assert!(
            matches!(orphan, Err(StoreError::Db(_))),
            "{backend}: volume of an unknown tenant: {orphan:?}"
        );

        assert!(
            store.delete_volume("t-1", "data").await.unwrap(),
            "{backend}"
        );
        assert!(
            !store.delete_volume("t-1", "data").await.unwrap(),
            "{backend}: already gone"
        );
        assert_eq!(
            store.volume("t-2", "data").await.unwrap(),
            Some(data2.clone()),
            "{backend}: other tenant's volume untouched"
        );
        assert_eq!(
            store.volumes(None).await.unwrap(),
            vec![cache1.clone(), data2.clone()],
            "{backend}"
        );

        // A volume is written pending and made ready; the state round-trips.
        let new = VolumeRow {
            state: VolumeState::Pending,
            ..vol("t-1", "new", 1 << 20)
        };
        store.insert_volume(&new).await.unwrap();
        assert_eq!(
            store.volume("t-1", "new").await.unwrap(),
            Some(new.clone()),
            "{backend}"
        );
        assert!(store
            .set_volume_state("t-1", "new", VolumeState::Ready)
            .await
            .unwrap());
        assert_eq!(
            store.volume("t-1", "new").await.unwrap().map(|v| v.state),
            Some(VolumeState::Ready),
            "{backend}"
        );
        assert!(!store
            .set_volume_state("t-1", "nope", VolumeState::Ready)
            .await
            .unwrap());

        // Given to a VM: that volume of that tenant is marked, for good.
        store.mark_vm_touched("t-1", &["new".into()]).await.unwrap();
        let touched = |t: &'static str, n: &'static str| {
            let store = &store;
            async move { store.volume(t, n).await.unwrap().unwrap().vm_touched }
        };
        assert!(touched("t-1", "new").await, "{backend}");
        assert!(!touched("t-2", "data").await, "{backend}");
        assert!(!touched("t-1", "cache").await, "{backend}");
        assert!(store
            .volumes(Some("t-1"))
            .await
            .unwrap()
            .iter()
            .any(|v| v.name == "new" && v.vm_touched));
    })
    .await;
}

/// Snapshots: written pending, made ready with what was saved, unique by name in a tenant,
/// listed per tenant or all, and a tenant holding one is not deleted. The spec fields that
/// point at them round-trip through `set_spec`.
#[tokio::test]
async fn snapshots_pending_ready_and_per_tenant() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        with_tenant(&store, "t-2").await;
        let snap = |id: &str, t: &str, name: &str, at: i64| SnapshotRow {
            id: id.into(),
            tenant_id: t.into(),
            name: name.into(),
            instance_id: "i-1".into(),
            runtime: RuntimeKind::Vm,
            image: "ubuntu".into(),
            state: SnapshotState::Pending,
            memory: true,
            consistency: String::new(),
            disk_size: 10 << 30,
            volumes: vec!["data".into()],
            vcpus: 2,
            memory_bytes: 4 << 30,
            bytes: 0,
            created_at: at,
        };
        let a = snap("aa01", "t-1", "before-upgrade", 10);
        let b = snap("bb02", "t-1", "nightly", 20);
        let c = snap("cc03", "t-2", "nightly", 30);
        for s in [&a, &b, &c] {
            store.insert_snapshot(s).await.unwrap();
        }
        assert_eq!(
            store.snapshot("aa01").await.unwrap(),
            Some(a.clone()),
            "{backend}"
        );
        assert_eq!(store.snapshot("zz99").await.unwrap(), None, "{backend}");
        assert_eq!(
            store.snapshot_by_name("t-2", "nightly").await.unwrap(),
            Some(c.clone()),
            "{backend}"
        );
        assert_eq!(
            store
                .snapshot_by_name("t-2", "before-upgrade")
                .await
                .unwrap(),
            None,
            "{backend}: another tenant's name"
        );
        assert_conflict(
            store
                .insert_snapshot(&snap("dd04", "t-1", "nightly", 40))
                .await,
            backend,
            "same snapshot name in one tenant",
        );
        assert_eq!(
            store.snapshots(Some("t-1")).await.unwrap(),
            vec![a.clone(), b.clone()],
            "{backend}: by name"
        );
        assert_eq!(
            store.snapshots(None).await.unwrap(),
            vec![a.clone(), b.clone(), c.clone()],
            "{backend}: by tenant, then name"
        );
        assert_eq!(
            store.pending_snapshots().await.unwrap(),
            vec![a.clone(), b.clone(), c.clone()],
            "{backend}: oldest first"
        );

        // Ready with what the node saved; only once.
        let ready = SnapshotRow {
            state: SnapshotState::Ready,
            memory: false,
            consistency: "guest agent freeze".into(),
            disk_size: 12 << 30,
            volumes: vec![],
            vcpus: 4,
            memory_bytes: 8 << 30,
            bytes: 3 << 30,
            ..a.clone()
        };
        assert!(
            store.mark_snapshot_ready(&ready).await.unwrap(),
            "{backend}"
        );
        assert!(
            !store.mark_snapshot_ready(&ready).await.unwrap(),
            "{backend}: no longer pending"
        );
        assert_eq!(
            store.snapshot("aa01").await.unwrap(),
            Some(ready.clone()),
            "{backend}"
        );
        assert_eq!(
            store.pending_snapshots().await.unwrap(),
            vec![b.clone(), c.clone()],
            "{backend}"
        );

        // A tenant holding a snapshot is not deleted.
        for s in ["bb02", "cc03"] {
            assert!(store.delete_snapshot(s).await.unwrap(), "{backend}");
        }
        assert!(
            !store.delete_snapshot("cc03").await.unwrap(),
            "{backend}: already gone"
        );
        assert!(
            !store.delete_tenant("t-1").await.unwrap(),
            "{backend}: it holds aa01"
        );
        assert!(store.delete_tenant("t-2").await.unwrap(), "{backend}");
        assert!(store.delete_snapshot("aa01").await.unwrap(), "{backend}");

        // The instance's spec names them: written alone, read back whole.
        let mut i = instance_row("i-1", "t-1", "web", 100);
        store.insert_instance(&i).await.unwrap();
        i.spec.from_snapshot = Some("aa01".into());
        i.spec.restore = Some(RestoreSpec {
            snapshot: "bb02".into(),
            memory: true,
            applied: false,
        });
        assert!(
            store.set_spec("i-1", &i.spec, 500).await.unwrap(),
            "{backend}"
        );
        let back = store.instance("i-1").await.unwrap().unwrap();
        assert_eq!(back.spec, i.spec, "{backend}");
        assert_eq!(back.updated_at, 500, "{backend}");
        assert!(
            !store.set_spec("i-404", &i.spec, 600).await.unwrap(),
            "{backend}"
        );
    })
    .await;
}

/// The reconciler's writes that race requests are conditional: a pending volume's sweep never
/// removes or re-marks a volume a request made ready meanwhile, and an exit never writes
/// `desired: stopped` over a terminate or a preemption.
#[tokio::test]
async fn conditional_writes_do_not_undo_others() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        let vol = |n: &str, state| VolumeRow {
            tenant_id: "t-1".into(),
            name: n.into(),
            size: 1 << 20,
            created_at: 7,
            state,
            vm_touched: false,
        };
        store
            .insert_volume(&vol("p", VolumeState::Pending))
            .await
            .unwrap();
        store
            .insert_volume(&vol("r", VolumeState::Ready))
            .await
            .unwrap();
        assert!(
            !store.delete_volume_if_pending("t-1", "r").await.unwrap(),
            "{backend}: a ready volume is not deleted"
        );
        assert!(
            store.volume("t-1", "r").await.unwrap().is_some(),
            "{backend}"
        );
        assert!(
            !store
                .set_volume_state_from("t-1", "r", VolumeState::Pending, VolumeState::Ready)
                .await
                .unwrap(),
            "{backend}: not pending: no row touched"
        );
        assert!(store
            .set_volume_state_from("t-1", "p", VolumeState::Pending, VolumeState::Ready)
            .await
            .unwrap());
        store
            .insert_volume(&vol("q", VolumeState::Pending))
            .await
            .unwrap();
        assert!(store.delete_volume_if_pending("t-1", "q").await.unwrap());
        assert!(
            store.volume("t-1", "q").await.unwrap().is_none(),
            "{backend}"
        );

        for (id, desired, stops) in [
            ("i-run", InstanceState::Running, true),
            ("i-term", InstanceState::Terminated, false),
            ("i-intr", InstanceState::Interrupted, false),
        ] {
            let mut row = instance_row(id, "t-1", id, 100);
            row.desired = desired;
            store.insert_instance(&row).await.unwrap();
            assert_eq!(
                store.stop_if_desired_running(id, 200).await.unwrap(),
                stops,
                "{backend}: {id}"
            );
            let want = if stops {
                InstanceState::Stopped
            } else {
                desired
            };
            assert_eq!(
                store.instance(id).await.unwrap().unwrap().desired,
                want,
                "{backend}: {id}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn restart_bookkeeping_round_trips() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        let row = instance_row("i-1", "t-1", "web", 100);
        store.insert_instance(&row).await.unwrap();
        assert_eq!(
            store.instance("i-1").await.unwrap().unwrap().restart,
            row.restart,
            "{backend}"
        );
        let next = RestartRow {
            count: 3,
            not_before: 0,
            backoff_ms: 8000,
            started_at: 500,
            exit_code: None,
            ..row.restart.clone()
        };
        assert!(store.set_restart("i-1", &next).await.unwrap());
        assert_eq!(
            store.instance("i-1").await.unwrap().unwrap().restart,
            next,
            "{backend}"
        );
        assert!(!store.set_restart("i-404", &next).await.unwrap());
    })
    .await;
}

// --- instances ------------------------------------------------------------------------------

#[tokio::test]
async fn instance_round_trip() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        let full = instance_row("i-1", "t-1", "web", 100);
        let bare = InstanceRow {
            reason: Some("exit status 1".into()),
            spec: InstanceSpec::default(),
            cpus: vec![],
            gpus: vec![],
            ip_host: 2,
            state: InstanceState::Failed,
            desired: InstanceState::Stopped,
            ..instance_row("i-2", "t-1", "batch", 200)
        };
        store.insert_instance(&full).await.unwrap();
        store.insert_instance(&bare).await.unwrap();
        assert_eq!(
            store.instance("i-1").await.unwrap(),
            Some(full),
            "{backend}"
        );
        assert_eq!(
            store.instance("i-2").await.unwrap(),
            Some(bare),
            "{backend}"
        );
        assert_eq!(store.instance("i-3").await.unwrap(), None, "{backend}");

        assert_conflict(
            store
                .insert_instance(&instance_row("i-1", "t-1", "other", 300))
                .await,
            backend,
            "same instance id",
        );
        let orphan = store
            .insert_instance(&instance_row("i-4", "t-404", "web", 300))
            .await;
        assert!(
            matches!(orphan, Err(StoreError::Db(_))),
            "{backend}: instance of an unknown tenant: {orphan:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn live_names_are_unique_per_tenant() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        with_tenant(&store, "t-2").await;
        store
            .insert_instance(&instance_row("i-1", "t-1", "web", 100))
            .await
            .unwrap();
        assert_conflict(
            store
                .insert_instance(&instance_row("i-2", "t-1", "web", 200))
                .await,
            backend,
            "two live instances with one name",
        );
        // Another tenant may use the name.
        store
            .insert_instance(&instance_row("i-3", "t-2", "web", 300))
            .await
            .unwrap();

        // Once terminated, the name is free; terminated ones never block each other.
        assert!(store
            .set_state("i-1", InstanceState::Terminated, None, 400)
            .await
            .unwrap());
        store
            .insert_instance(&instance_row("i-4", "t-1", "web", 500))
            .await
            .unwrap();
        assert!(store
            .set_state("i-4", InstanceState::Terminated, None, 600)
            .await
            .unwrap());
        let mut born_dead = instance_row("i-5", "t-1", "web", 700);
        born_dead.state = InstanceState::Terminated;
        store.insert_instance(&born_dead).await.unwrap();
        store
            .insert_instance(&instance_row("i-6", "t-1", "web", 800))
            .await
            .unwrap();

        // Bringing a terminated one back to life while the name is taken conflicts.
        assert_conflict(
            store
                .set_state("i-1", InstanceState::Running, None, 900)
                .await,
            backend,
            "reviving onto a taken name",
        );
        assert_eq!(
            store.instance("i-1").await.unwrap().unwrap().state,
            InstanceState::Terminated,
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn instance_by_name_prefers_live_then_newest_terminated() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        with_tenant(&store, "t-2").await;
        let by_name = |t: &'static str, n: &'static str| {
            let store = store.clone();
            async move { store.instance_by_name(t, n).await.unwrap().map(|i| i.id) }
        };
        assert_eq!(by_name("t-1", "web").await, None, "{backend}");

        let mut old = instance_row("i-old", "t-1", "web", 100);
        old.state = InstanceState::Terminated;
        store.insert_instance(&old).await.unwrap();
        assert_eq!(
            by_name("t-1", "web").await.as_deref(),
            Some("i-old"),
            "{backend}"
        );

        let mut newer = instance_row("i-newer", "t-1", "web", 300);
        newer.state = InstanceState::Terminated;
        store.insert_instance(&newer).await.unwrap();
        assert_eq!(
            by_name("t-1", "web").await.as_deref(),
            Some("i-newer"),
            "{backend}: newest terminated"
        );

        // A live one wins even though it is older than the terminated ones.
        let mut live = instance_row("i-live", "t-1", "web", 200);
        live.state = InstanceState::Stopped;
        store.insert_instance(&live).await.unwrap();
        assert_eq!(
            by_name("t-1", "web").await.as_deref(),
            Some("i-live"),
            "{backend}: live first"
        );

        assert_eq!(by_name("t-2", "web").await, None, "{backend}: other tenant");
        assert_eq!(by_name("t-1", "api").await, None, "{backend}: other name");
        assert_eq!(
            store.instance_by_name("t-1", "web").await.unwrap(),
            Some(live),
            "{backend}: whole row"
        );
    })
    .await;
}

#[tokio::test]
async fn live_instances_filter_terminated_and_tenant() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        with_tenant(&store, "t-2").await;
        assert!(
            store.live_instances(None).await.unwrap().is_empty(),
            "{backend}"
        );

        // Inserted out of creation order; two share a creation time (then ordered by id).
        let rows = [
            ("i-c", "t-1", "c", 300, InstanceState::Running),
            ("i-a", "t-2", "a", 100, InstanceState::Pending),
            ("i-e", "t-1", "e", 200, InstanceState::Terminated),
            ("i-b", "t-1", "b", 300, InstanceState::Failed),
            ("i-d", "t-2", "d", 50, InstanceState::Terminated),
            ("i-f", "t-2", "f", 400, InstanceState::Terminating),
        ];
        for (id, t, name, at, st) in rows {
            let mut i = instance_row(id, t, name, at);
            i.state = st;
            store.insert_instance(&i).await.unwrap();
        }
        let ids = |v: Vec<InstanceRow>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.live_instances(None).await.unwrap()),
            ["i-a", "i-b", "i-c", "i-f"],
            "{backend}"
        );
        assert_eq!(
            ids(store.live_instances(Some("t-1")).await.unwrap()),
            ["i-b", "i-c"],
            "{backend}"
        );
        assert_eq!(
            ids(store.live_instances(Some("t-2")).await.unwrap()),
            ["i-a", "i-f"],
            "{backend}"
        );
        assert!(
            store.live_instances(Some("t-3")).await.unwrap().is_empty(),
            "{backend}"
        );

        store
            .set_state("i-c", InstanceState::Terminated, None, 500)
            .await
            .unwrap();
        assert_eq!(
            ids(store.live_instances(Some("t-1")).await.unwrap()),
            ["i-b"],
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn set_state_and_set_desired() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        let orig = instance_row("i-1", "t-1", "web", 100);
        store.insert_instance(&orig).await.unwrap();

        assert!(store
            .set_state("i-1", InstanceState::Failed, Some("oom killed"), 200)
            .await
            .unwrap());
        let got = store.instance("i-1").await.unwrap().unwrap();
        assert_eq!(
            got,
            InstanceRow {
                state: InstanceState::Failed,
                reason: Some("oom killed".into()),
                updated_at: 200,
                ..orig.clone()
            },
            "{backend}"
        );

        // No reason clears the old one.
        assert!(store
            .set_state("i-1", InstanceState::Running, None, 300)
            .await
            .unwrap());
        let got = store.instance("i-1").await.unwrap().unwrap();
        assert_eq!(
            (got.state, got.reason, got.updated_at),
            (InstanceState::Running, None, 300),
            "{backend}"
        );

        assert!(store
            .set_desired("i-1", InstanceState::Stopped, 400)
            .await
            .unwrap());
        let got = store.instance("i-1").await.unwrap().unwrap();
        assert_eq!(
            got,
            InstanceRow {
                state: InstanceState::Running,
                desired: InstanceState::Stopped,
                updated_at: 400,
                ..orig.clone()
            },
            "{backend}: desired changes, observed state does not"
        );

        assert!(
            !store
                .set_state("i-404", InstanceState::Running, None, 500)
                .await
                .unwrap(),
            "{backend}"
        );
        assert!(
            !store
                .set_desired("i-404", InstanceState::Running, 500)
                .await
                .unwrap(),
            "{backend}"
        );
    })
    .await;
}

// --- events ---------------------------------------------------------------------------------

#[tokio::test]
async fn events_ordered_by_time() {
    for_each_backend(|Db { store, backend, .. }| async move {
        let ev = |i: &str, at: i64, kind: &str| EventRow {
            instance_id: i.into(),
            at,
            kind: kind.into(),
            message: format!("{kind} at {at}"),
        };
        assert!(store.events("i-1").await.unwrap().is_empty(), "{backend}");
        store
            .add_event("e-3", &ev("i-1", 300, "started"))
            .await
            .unwrap();
        store
            .add_event("e-1", &ev("i-1", 100, "created"))
            .await
            .unwrap();
        store
            .add_event("e-9", &ev("i-2", 150, "created"))
            .await
            .unwrap();
        store
            .add_event("e-2", &ev("i-1", 200, "scheduled"))
            .await
            .unwrap();
        // Same time: by event id.
        store
            .add_event("e-5", &ev("i-1", 300, "ready"))
            .await
            .unwrap();
        assert_eq!(
            store.events("i-1").await.unwrap(),
            vec![
                ev("i-1", 100, "created"),
                ev("i-1", 200, "scheduled"),
                ev("i-1", 300, "started"),
                ev("i-1", 300, "ready"),
            ],
            "{backend}"
        );
        assert_eq!(
            store.events("i-2").await.unwrap(),
            vec![ev("i-2", 150, "created")],
            "{backend}"
        );
        assert!(
            store
                .add_event("e-1", &ev("i-1", 400, "dup"))
                .await
                .is_err(),
            "{backend}: event ids are unique"
        );
    })
    .await;
}

#[tokio::test]
async fn retention_prunes_old_events_and_caps_them_per_instance() {
    for_each_backend(|Db { store, backend, .. }| async move {
        let ev = |i: &str, at: i64| EventRow {
            instance_id: i.into(),
            at,
            kind: "state".into(),
            message: format!("at {at}"),
        };
        for at in 1..=10 {
            store
                .add_event(&format!("a-{at:02}"), &ev("i-1", at * 100))
                .await
                .unwrap();
        }
        store.add_event("b-1", &ev("i-2", 50)).await.unwrap();
        store.add_event("b-2", &ev("i-2", 5000)).await.unwrap();
        // Older than 250 goes (i-1: 100, 200; i-2: 50), then at most 3 per instance (newest).
        let n = store.prune_events(250, 3).await.unwrap();
        assert_eq!(n, 3 + 5, "{backend}");
        let ats: Vec<i64> = store
            .events("i-1")
            .await
            .unwrap()
            .iter()
            .map(|e| e.at)
            .collect();
        assert_eq!(ats, vec![800, 900, 1000], "{backend}");
        assert_eq!(
            store.events("i-2").await.unwrap(),
            vec![ev("i-2", 5000)],
            "{backend}"
        );
        assert_eq!(
            store.prune_events(250, 3).await.unwrap(),
            0,
            "{backend}: idempotent"
        );
    })
    .await;
}

#[tokio::test]
async fn retention_prunes_terminated_instances_with_their_events() {
    for_each_backend(|Db { store, backend, .. }| async move {
        with_tenant(&store, "t-1").await;
        for (id, state, at) in [
            ("old-term", InstanceState::Terminated, 100),
            ("new-term", InstanceState::Terminated, 900),
            ("old-live", InstanceState::Running, 100),
        ] {
            store
                .insert_instance(&instance_row(id, "t-1", id, at))
                .await
                .unwrap();
            store.set_state(id, state, None, at).await.unwrap();
            store
                .add_event(
                    &format!("e-{id}"),
                    &EventRow {
                        instance_id: id.into(),
                        at,
                        kind: "state".into(),
                        message: "x".into(),
                    },
                )
                .await
                .unwrap();
        }
        assert_eq!(store.prune_terminated(500).await.unwrap(), 1, "{backend}");
        assert!(
            store.instance("old-term").await.unwrap().is_none(),
            "{backend}"
        );
        assert!(
            store.events("old-term").await.unwrap().is_empty(),
            "{backend}"
        );
        // A recent terminated row and a live old one stay, with their events.
        assert!(
            store.instance("new-term").await.unwrap().is_some(),
            "{backend}"
        );
        assert!(
            store.instance("old-live").await.unwrap().is_some(),
            "{backend}"
        );
        assert_eq!(
            store.events("old-live").await.unwrap().len(),
            1,
            "{backend}"
        );
        assert_eq!(store.prune_terminated(500).await.unwrap(), 0, "{backend}");
    })
    .await;
}

// --- the harness itself ---------------------------------------------------------------------

#[test]
fn with_database_swaps_only_the_database() {
    assert_eq!(
        with_database("postgres://u:p@127.0.0.1:5432/postgres", "x"),
        "postgres://u:p@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://h:5432", "x"),
        "postgres://h:5432/x"
    );
}

#[tokio::test]
async fn store_reopens_with_its_data() {
    // Migrations must be idempotent: a second connect on the same database changes nothing.
    for_each_backend(
        |Db {
             store,
             url,
             backend,
             ..
         }| async move {
            store
                .create_tenant("t-1", "acme", 1, u32::MAX)
                .await
                .unwrap()
                .unwrap();
            let again = Store::connect(&url).await.unwrap();
            assert_eq!(
                again.tenant_by_name("acme").await.unwrap().map(|t| t.id),
                Some("t-1".into()),
                "{backend}"
            );
            again.close().await;
        },
    )
    .await;
}

/// The 7-day history survives a restart: minutes a `Telemetry` closes are saved, a fresh one
/// (the restarted daemon) gets them back and answers the same minute query; pruning deletes
/// what is older than the window; a minute saved twice stays one row.
#[tokio::test]
async fn metric_minutes_save_restore_and_prune() {
    use gpuvisor_control::telemetry::{GpuMeta, Telemetry};
    use gpuvisor_node::telemetry::{GpuReading, HostSample, InstanceReading};
    use std::collections::BTreeMap;
    for_each_backend(|db| async move {
        let meta = || {
            vec![GpuMeta {
                uuid: "GPU-0".into(),
                index: 0,
                model: "H100-80GB".into(),
                model_name: "NVIDIA H100 80GB HBM3".into(),
                pci_address: "0000:01:00.0".into(),
            }]
        };
        let t = Telemetry::new("host", meta());
        let t0: i64 = 1_800_000_000_000; // a whole minute
        let tenants = BTreeMap::from([("i1".to_string(), "acme".to_string())]);
        for s in 0..185 {
            let sample = HostSample {
                gpus: vec![GpuReading {
                    uuid: "GPU-0".into(),
                    util: Some((s % 60) as f64),
                    mem_total: 80 << 30,
                    ..Default::default()
                }],
                instances: vec![InstanceReading {
                    id: "i1".into(),
                    mem_bytes: Some(1000 + s as u64),
                    ..Default::default()
                }],
                xids: vec![],
            };
            t.ingest(t0 + s * 1000, sample, &tenants);
        }
        let rows = t.drain_unsaved();
        assert_eq!(rows.len(), 6, "3 closed minutes of 2 entities");
        db.store.save_metric_minutes(&rows).await.unwrap();
        db.store.save_metric_minutes(&rows[..1]).await.unwrap();
        let saved = db.store.metric_minutes(0).await.unwrap();
        assert_eq!(saved.len(), 2, "{:?}", saved.keys());
        assert_eq!(saved["gpu:GPU-0"].len(), 3);
        assert_eq!(saved["instance:i1"].len(), 3);

        let fresh = Telemetry::new("host", meta());
        for (entity, records) in saved {
            match entity.split_once(':').unwrap() {
                ("gpu", uuid) => fresh.restore_gpu(uuid, records),
                (_, id) => fresh.restore_instance(id, "acme", t0 + 200_000, records),
            }
        }
        let until = t0 + 180_000;
        let strip = |(step, series): (i64, Vec<gpuvisor_wire::MetricSeries>)| {
            let pts: Vec<Vec<gpuvisor_wire::MetricPoint>> = series
                .into_iter()
                .map(|s| s.points.into_iter().filter(|p| p.t < until).collect())
                .collect();
            (step, pts)
        };
        let before = strip(t.gpu_history("GPU-0", t0, 60_000).unwrap());
        let after = strip(fresh.gpu_history("GPU-0", t0, 60_000).unwrap());
        assert_eq!(after, before);
        assert_eq!(after.1[0].len(), 3, "{:?}", after.1[0]);
        let before = strip(t.instance_history("i1", t0, 60_000));
        let after = strip(fresh.instance_history("i1", t0, 60_000));
        assert_eq!(after, before);
        assert!(after.1.iter().any(|p| !p.is_empty()));

        assert_eq!(
            db.store.prune_metric_minutes(t0 + 60_000).await.unwrap(),
            2,
            "the first minute of both entities"
        );
        let left = db.store.metric_minutes(0).await.unwrap();
        assert_eq!(left["gpu:GPU-0"].len(), 2);
    })
    .await;
}

/// Cordons are kept until lifted; the first reason wins; lifting twice says so.
#[tokio::test]
async fn cordons_persist_until_lifted() {
    for_each_backend(|db| async move {
        assert!(db.store.cordon("GPU-1", "XID 79", 10).await.unwrap());
        assert!(!db.store.cordon("GPU-1", "operator", 20).await.unwrap());
        assert!(db
            .store
            .cordon("GPU-0", "operator: fans", 30)
            .await
            .unwrap());
        assert_eq!(
            db.store.cordons().await.unwrap(),
            vec![
                ("GPU-1".to_string(), "XID 79".to_string()),
                ("GPU-0".to_string(), "operator: fans".to_string())
            ]
        );
        assert!(db.store.uncordon("GPU-1").await.unwrap());
        assert!(!db.store.uncordon("GPU-1").await.unwrap());
        assert_eq!(db.store.cordons().await.unwrap().len(), 1);
    })
    .await;
}

fn audit_row(seq: i64, at: i64) -> AuditRow {
    AuditRow {
        seq,
        at,
        key_id: "k-1".into(),
        role: "member".into(),
        tenant_id: format!("t-{}", seq % 2),
        op: "volume.create".into(),
        target: format!("/v1/volumes/{seq}"),
        result: "200".into(),
        source: "127.0.0.1".into(),
        prev_hash: format!("h{}", seq - 1),
        hash: format!("h{seq}"),
    }
}

#[tokio::test]
async fn audit_rows_append_page_and_prune_with_their_anchor() {
    for_each_backend(|db| async move {
        let s = &db.store;
        assert_eq!(s.audit_head().await.unwrap(), None, "{}", db.backend);
        for seq in 1..=5 {
            s.audit_append(&audit_row(seq, seq * 1000)).await.unwrap();
        }
        // A second writer of the same seq is refused.
        assert!(
            s.audit_append(&audit_row(5, 9000)).await.is_err(),
            "{}",
            db.backend
        );
        assert_eq!(s.audit_head().await.unwrap(), Some((5, "h5".into())));
        let page = s.audit_rows(2, 0, None, 2).await.unwrap();
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(page[0], audit_row(3, 3000), "{}", db.backend);
        let t1: Vec<i64> = s
            .audit_rows(0, 0, Some("t-1"), 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(t1, [1, 3, 5]);
        let since: Vec<i64> = s
            .audit_rows(0, 4000, None, 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(since, [4, 5]);
        // Rows written before 3500 go; the anchor holds the last of them.
        assert_eq!(s.audit_prune(3500).await.unwrap(), 3);
        assert_eq!(
            s.audit_anchor().await.unwrap(),
            Some(AuditAnchor {
                seq: 3,
                hash: "h3".into()
            })
        );
        assert_eq!(s.audit_rows(0, 0, None, 100).await.unwrap().len(), 2);
        assert_eq!(s.audit_prune(3500).await.unwrap(), 0);
        // Everything pruned: the head is the anchor, and the next row follows it.
        assert_eq!(s.audit_prune(10_000).await.unwrap(), 2);
        assert_eq!(s.audit_head().await.unwrap(), Some((5, "h5".into())));
        s.audit_append(&audit_row(6, 11_000)).await.unwrap();
        assert_eq!(s.audit_head().await.unwrap(), Some((6, "h6".into())));
    })
    .await;
}

#[tokio::test]
async fn usage_intervals_open_heartbeat_close_and_clip() {
    use gpuvisor_control::store::UsageRow;
    for_each_backend(|Db { store, backend, .. }| async move {
        let row = |subject: &str, line: &str, qty: f64| UsageRow {
            subject_id: subject.into(),
            line: line.into(),
            start_ms: 0,
            end_ms: 0,
            open: true,
            tenant_id: "t-1".into(),
            subject: "instance".into(),
            name: "one".into(),
            resource: "vcpu".into(),
            model: String::new(),
            milli: 0,
            interruptible: false,
            quantity: qty,
            unit_price: 0.25,
        };
        store
            .usage_step(&[], &[row("i1", "vcpu", 2.0), row("i2", "vcpu", 1.0)], 1000)
            .await
            .unwrap();
        // A line already open is not opened again (two steps racing: one open interval).
        store
            .usage_step(&[], &[row("i1", "vcpu", 2.0)], 2000)
            .await
            .unwrap();
        store.usage_step(&[], &[], 3000).await.unwrap();
        let open = store.usage_open().await.unwrap();
        assert_eq!(open.len(), 2, "{backend}: {open:?}");
        assert!(
            open.iter().all(|u| u.start_ms == 1000),
            "{backend}: {open:?}"
        );
        assert_eq!(open[0].quantity + open[1].quantity, 3.0, "{backend}");
        // i1 closes at 4000 and reopens at a new size.
        store
            .usage_step(
                &[("i1".into(), "vcpu".into(), 1000)],
                &[row("i1", "vcpu", 4.0)],
                4000,
            )
            .await
            .unwrap();
        let rows = store.usage_of("i1").await.unwrap();
        assert_eq!(rows.len(), 2, "{backend}: {rows:?}");
        assert!(
            !rows[0].open && rows[0].end_ms == 4000,
            "{backend}: {rows:?}"
        );
        assert!(rows[1].open && rows[1].start_ms == 4000 && rows[1].quantity == 4.0);
        // A crash: open rows close at the last heartbeat, not at the next start.
        store.usage_step(&[], &[], 5000).await.unwrap();
        assert_eq!(store.usage_close_all().await.unwrap(), 2, "{backend}");
        assert!(store.usage_open().await.unwrap().is_empty());
        let rows = store.usage_rows(0, i64::MAX, Some("t-1")).await.unwrap();
        assert!(rows.iter().all(|u| u.end_ms <= 5000), "{backend}: {rows:?}");
        let i2 = store.usage_of("i2").await.unwrap();
        assert_eq!(
            (i2[0].start_ms, i2[0].end_ms),
            (1000, 5000),
            "{backend}: {i2:?}"
        );
        // Ranges: only overlapping rows; other tenants' never.
        assert_eq!(store.usage_rows(4500, 6000, None).await.unwrap().len(), 2);
        assert_eq!(store.usage_rows(0, 1000, None).await.unwrap().len(), 0);
        assert!(store
            .usage_rows(0, i64::MAX, Some("t-2"))
            .await
            .unwrap()
            .is_empty());
    })
    .await;
}

/// The live list is cached between instance writes: after each kind of write, a list read
/// just before it (so the cache is warm) must give way to what the rows now hold.
#[tokio::test]
async fn live_list_follows_every_instance_write() {
    for_each_backend(
        |Db {
             store,
             raw,
             backend,
             ..
         }| async move {
            with_tenant(&store, "t-1").await;
            // The truth: each live row read alone (single-row reads are never cached), and the
            // live ids straight from the database.
            async fn fresh(store: &Store, raw: &AnyPool, backend: &str, step: &str) {
                let listed = store.live_instances(None).await.unwrap();
                let ids: Vec<String> = sqlx::query(
                    "SELECT id FROM instances WHERE state <> 'terminated' ORDER BY created_at, id",
                )
                .fetch_all(raw)
                .await
                .unwrap()
                .iter()
                .map(|r| r.try_get("id").unwrap())
                .collect();
                assert_eq!(
                    listed.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
                    ids,
                    "{backend}: live ids after {step}"
                );
                for i in &listed {
                    assert_eq!(
                        Some(i),
                        store.instance(&i.id).await.unwrap().as_ref(),
                        "{backend}: listed row after {step}"
                    );
                }
            }
            fresh(&store, &raw, backend, "nothing").await;
            store
                .insert_instance(&instance_row("i-1", "t-1", "a", 100))
                .await
                .unwrap();
            fresh(&store, &raw, backend, "insert").await;
            store
                .insert_instance(&instance_row("i-2", "t-1", "b", 200))
                .await
                .unwrap();
            fresh(&store, &raw, backend, "a second insert").await;
            store
                .set_state("i-1", InstanceState::Running, Some("up"), 300)
                .await
                .unwrap();
            fresh(&store, &raw, backend, "set_state").await;
            store
                .set_desired("i-1", InstanceState::Stopped, 310)
                .await
                .unwrap();
            fresh(&store, &raw, backend, "set_desired").await;
            store
                .set_desired("i-1", InstanceState::Running, 320)
                .await
                .unwrap();
            fresh(&store, &raw, backend, "set_desired back").await;
            store.stop_if_desired_running("i-1", 330).await.unwrap();
            fresh(&store, &raw, backend, "stop_if_desired_running").await;
            let mut r = store.instance("i-2").await.unwrap().unwrap().restart;
            r.count += 1;
            store.set_restart("i-2", &r).await.unwrap();
            fresh(&store, &raw, backend, "set_restart").await;
            r.count += 1;
            store
                .set_state_and_restart("i-2", InstanceState::Failed, Some("exit 1"), 340, &r)
                .await
                .unwrap();
            fresh(&store, &raw, backend, "set_state_and_restart").await;
            let mut big = store.instance("i-2").await.unwrap().unwrap();
            big.spec.vcpus = 8;
            big.cpus = vec![0, 1, 2, 3, 4, 5, 6, 7];
            store.set_resources(&big, 350).await.unwrap();
            fresh(&store, &raw, backend, "set_resources").await;
            store.rename_gpu("GPU-1", "GPU-renamed").await.unwrap();
            fresh(&store, &raw, backend, "rename_gpu").await;
            assert_eq!(
                store.live_instances(None).await.unwrap()[0].gpus[0].uuid,
                "GPU-renamed",
                "{backend}"
            );
            store
                .set_state("i-1", InstanceState::Terminated, None, 360)
                .await
                .unwrap();
            fresh(&store, &raw, backend, "a terminate").await;
            assert_eq!(
                store.live_instances(None).await.unwrap().len(),
                1,
                "{backend}"
            );
        },
    )
    .await;
}

/// A write whose caller stops waiting (its future dropped while the statement waits on a lock)
/// still lands later; the cached list must not keep the old row past it.
#[tokio::test]
async fn live_list_follows_a_write_its_caller_gave_up_on() {
    for_each_backend(
        |Db {
             store,
             raw,
             backend,
             ..
         }| async move {
            with_tenant(&store, "t-1").await;
            store
                .insert_instance(&instance_row("i-1", "t-1", "a", 100))
                .await
                .unwrap();
            assert_eq!(
                store.live_instances(None).await.unwrap()[0].state,
                InstanceState::Pending
            );
            // Another connection holds the lock the update needs.
            let mut c = raw.acquire().await.unwrap();
            let lock = if backend == "sqlite" {
                "BEGIN IMMEDIATE"
            } else {
                "BEGIN"
            };
            sqlx::query(lock).execute(&mut *c).await.unwrap();
            if backend != "sqlite" {
                sqlx::query("SELECT id FROM instances WHERE id = 'i-1' FOR UPDATE")
                    .execute(&mut *c)
                    .await
                    .unwrap();
            }
            let gave_up = tokio::time::timeout(
                std::time::Duration::from_millis(300),
                store.set_state("i-1", InstanceState::Running, Some("up"), 300),
            )
            .await;
            assert!(
                gave_up.is_err(),
                "{backend}: the write did not wait for the lock"
            );
            // Read while the write waits: the cache holds the old row.
            assert_eq!(
                store.live_instances(None).await.unwrap()[0].state,
                InstanceState::Pending,
                "{backend}"
            );
            sqlx::query("COMMIT").execute(&mut *c).await.unwrap();
            drop(c);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let truth = store.instance("i-1").await.unwrap().unwrap().state;
                if truth == InstanceState::Running {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{backend}: the abandoned write never landed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // The write's own task marks the list stale once it is done; give it that moment.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let mut listed = store.live_instances(None).await.unwrap()[0].state;
            while listed != InstanceState::Running && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                listed = store.live_instances(None).await.unwrap()[0].state;
            }
            assert_eq!(
                listed,
                InstanceState::Running,
                "{backend}: the cached list kept a row an abandoned write changed"
            );
        },
    )
    .await;
}

fn job_row(id: &str, ep: &str, created_at: i64) -> gpuvisor_control::store::JobRow {
    gpuvisor_control::store::JobRow {
        id: id.into(),
        endpoint_id: ep.into(),
        state: "IN_QUEUE".into(),
        input: r#"{"n":1}"#.into(),
        exec_timeout_ms: 600_000,
        ttl_ms: 86_400_000,
        created_at,
        ..Default::default()
    }
}

/// Each job's end is recorded once, with its queued and run times (none for a job that
/// never ran); the window and the pruning go by the end's time.
#[tokio::test]
async fn endpoint_job_ends_are_recorded_once() {
    use gpuvisor_control::store::JobEnd;
    use gpuvisor_wire::JobState;
    for_each_backend(|Db { store, backend, .. }| async move {
        store.insert_job(&job_row("j1", "ep1", 100)).await.unwrap();
        store.insert_job(&job_row("j2", "ep1", 200)).await.unwrap();
        store.insert_job(&job_row("j3", "ep2", 300)).await.unwrap();
        let j1 = store
            .claim_job("ep1", "w1", 1000, 5000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(j1.id, "j1", "{backend}");
        assert!(store
            .finish_job_by("j1", "w1", JobState::Completed, "1", "", 1500, 9000)
            .await
            .unwrap());
        // A second end of the same job is refused and not recorded.
        assert!(!store
            .finish_job("j1", JobState::Failed, "", "late", 1600, 9000)
            .await
            .unwrap());
        // Cancelled in the queue: it never ran.
        assert!(store
            .finish_job("j2", JobState::Cancelled, "", "", 1700, 9000)
            .await
            .unwrap());
        let (counts, ends) = store.job_ends("ep1", 0).await.unwrap();
        let mut counts = counts;
        counts.sort();
        assert_eq!(
            counts,
            [("CANCELLED".to_string(), 1), ("COMPLETED".to_string(), 1)],
            "{backend}"
        );
        assert_eq!(
            ends,
            [
                JobEnd {
                    state: "CANCELLED".into(),
                    delay_ms: None,
                    exec_ms: None
                },
                JobEnd {
                    state: "COMPLETED".into(),
                    delay_ms: Some(900),
                    exec_ms: Some(500)
                },
            ],
            "{backend}"
        );
        // A job requeued (its worker lost) and then ended by that worker's late result ran.
        store.insert_job(&job_row("j4", "ep3", 2000)).await.unwrap();
        store
            .claim_job("ep3", "w7", 2100, 9000)
            .await
            .unwrap()
            .unwrap();
        assert!(store.requeue_job("j4", "w7").await.unwrap());
        assert!(store
            .finish_job_by("j4", "w7", JobState::Completed, "1", "", 2600, 9000)
            .await
            .unwrap());
        // Requeued again and claimed by another worker: the first one's late result is refused
        // and records nothing.
        store.insert_job(&job_row("j5", "ep4", 3000)).await.unwrap();
        store
            .claim_job("ep4", "w8", 3100, 9000)
            .await
            .unwrap()
            .unwrap();
        assert!(store.requeue_job("j5", "w8").await.unwrap());
        store
            .claim_job("ep4", "w9", 3200, 9000)
            .await
            .unwrap()
            .unwrap();
        assert!(!store
            .finish_job_by("j5", "w8", JobState::Completed, "1", "", 3300, 9000)
            .await
            .unwrap());
        assert!(
            store.job_ends("ep4", 0).await.unwrap().1.is_empty(),
            "{backend}"
        );
        assert_eq!(
            store.job_ends("ep3", 0).await.unwrap().1,
            [JobEnd {
                state: "COMPLETED".into(),
                delay_ms: Some(100),
                exec_ms: Some(500)
            }],
            "{backend}"
        );
        assert!(
            store.job_ends("ep2", 0).await.unwrap().1.is_empty(),
            "{backend}"
        );
        assert_eq!(
            store.job_ends("ep1", 1600).await.unwrap().1.len(),
            1,
            "{backend}"
        );
        assert_eq!(store.prune_job_ends(1600).await.unwrap(), 1, "{backend}");
        assert_eq!(
            store.job_ends("ep1", 0).await.unwrap().1.len(),
            1,
            "{backend}"
        );
    })
    .await;
}

/// The serverless queue: claims in order and never twice (also under concurrent claims), the
/// first end wins, a requeue only from the holder, leases renewed only for the holder, stream
/// chunks handed out once, tallies, retention, retry, purge.
#[tokio::test]
async fn endpoint_jobs_claim_once_end_once() {
    use gpuvisor_wire::JobState;
    for_each_backend(|Db { store, backend, .. }| async move {
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            store
                .insert_job(&job_row(id, "ep1", 100 + i as i64))
                .await
                .unwrap();
        }
        store.insert_job(&job_row("other", "ep2", 1)).await.unwrap();
        let a = store
            .claim_job("ep1", "w1", 1000, 5000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.id.as_str(), a.attempts, a.worker_id.as_str()),
            ("a", 1, "w1"),
            "{backend}"
        );
        // Concurrent claims: each job to one claimer, none twice.
        let (x, y, z) = tokio::join!(
            store.claim_job("ep1", "w2", 1000, 5000),
            store.claim_job("ep1", "w3", 1000, 5000),
            store.claim_job("ep1", "w4", 1000, 5000),
        );
        let mut got: Vec<String> = [x, y, z]
            .into_iter()
            .filter_map(|r| r.unwrap().map(|j| j.id))
            .collect();
        got.sort();
        assert_eq!(got, ["b", "c"], "{backend}");
        // Leases: only the holder's are renewed.
        store.renew_leases("w9", &["a".into()], 9000).await.unwrap();
        assert_eq!(
            store.job("a").await.unwrap().unwrap().lease_until,
            5000,
            "{backend}"
        );
        store.renew_leases("w1", &["a".into()], 9000).await.unwrap();
        assert_eq!(
            store.job("a").await.unwrap().unwrap().lease_until,
            9000,
            "{backend}"
        );
        // Stream chunks of the holder only (at most 3 for this job here), each handed out
        // once, in order.
        for c in ["1", "2", "3"] {
            assert_eq!(
                store.append_stream("a", "w1", c, 3).await.unwrap(),
                Some(true)
            );
        }
        assert_eq!(
            store.append_stream("a", "w1", "4", 3).await.unwrap(),
            None,
            "{backend}"
        );
        assert_eq!(
            store.append_stream("a", "w9", "x", 9).await.unwrap(),
            Some(false),
            "{backend}"
        );
        assert_eq!(
            store.take_stream("a", 2).await.unwrap(),
            ["1", "2"],
            "{backend}"
        );
        // A requeue only by the holder; the chunk no client was given goes with its attempt.
        assert!(!store.requeue_job("a", "w9").await.unwrap(), "{backend}");
        assert!(store.requeue_job("a", "w1").await.unwrap(), "{backend}");
        assert!(
            store.take_stream("a", 10).await.unwrap().is_empty(),
            "{backend}"
        );
        // Queued again: only its last holder's late result could end it.
        assert!(!store
            .finish_job_by("a", "w9", JobState::Completed, "1", "", 2000, 4000)
            .await
            .unwrap());
        let again = store
            .claim_job("ep1", "w5", 2000, 7000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.id.as_str(), again.attempts), ("a", 2), "{backend}");
        // Its earlier holder is not its holder now.
        assert!(!store
            .finish_job_by("a", "w1", JobState::Completed, "1", "", 2000, 4000)
            .await
            .unwrap());
        // The first end wins.
        assert!(store
            .finish_job_by("a", "w5", JobState::Completed, "{\"ok\":1}", "", 3000, 4000)
            .await
            .unwrap());
        assert!(!store
            .finish_job("a", JobState::Failed, "", "\"late\"", 3001, 4000)
            .await
            .unwrap());
        // What a worker naming jobs in its ping must stop: not one its result ended, not an
        // unknown one; one cancelled, or now another worker's.
        assert!(store
            .jobs_to_stop("w5", &["a".into(), "nope".into()])
            .await
            .unwrap()
            .is_empty());
        let holder_of_b = store.job("b").await.unwrap().unwrap().worker_id;
        assert_eq!(
            store.jobs_to_stop("w9", &["b".into()]).await.unwrap(),
            ["b"],
            "{backend}"
        );
        assert!(store
            .jobs_to_stop(&holder_of_b, &["b".into()])
            .await
            .unwrap()
            .is_empty());
        let a = store.job("a").await.unwrap().unwrap();
        assert_eq!(
            (a.state.as_str(), a.output.as_str(), a.error.as_str()),
            ("COMPLETED", "{\"ok\":1}", ""),
            "{backend}"
        );
        // Tallies per endpoint and state, with retries counted.
        let t = store.job_tallies().await.unwrap();
        let get = |ep: &str, st: &str| {
            t.iter()
                .find(|x| x.endpoint_id == ep && x.state == st)
                .cloned()
        };
        assert_eq!(get("ep1", "COMPLETED").unwrap().retried, 1, "{backend}");
        assert_eq!(get("ep1", "IN_PROGRESS").unwrap().count, 2, "{backend}");
        assert_eq!(get("ep2", "IN_QUEUE").unwrap().count, 1, "{backend}");
        // Retry only a failed or timed-out job.
        assert!(!store.retry_job("a", 5000).await.unwrap(), "{backend}");
        assert!(store
            .finish_job("b", JobState::TimedOut, "", "\"slow\"", 3000, 4000)
            .await
            .unwrap());
        assert!(store.retry_job("b", 5000).await.unwrap(), "{backend}");
        assert_eq!(
            store.job("b").await.unwrap().unwrap().state(),
            JobState::InQueue,
            "{backend}"
        );
        // Purge removes the queued ones of that endpoint only.
        assert_eq!(store.purge_queue("ep1").await.unwrap(), 1, "{backend}");
        assert!(store.job("other").await.unwrap().is_some(), "{backend}");
        // Retention: finished jobs past their time go, with their chunks.
        assert_eq!(
            store.delete_expired_jobs(4500, 0).await.unwrap().0,
            1,
            "{backend}"
        );
        assert!(store.job("a").await.unwrap().is_none(), "{backend}");
        assert!(
            store.take_stream("a", 10).await.unwrap().is_empty(),
            "{backend}"
        );
    })
    .await;
}

/// What a tenant's jobs keep in the store, in octets (the cap of
/// `[proxy] job_storage_per_tenant`): each row's own weight, inputs, webhook URLs, progress
/// updates, results, errors and stream chunks are counted as they are kept, and let go as they
/// go (a replaced progress update, a lost attempt's unread chunks, a retry, a purge with its
/// chunks, retention); another tenant's jobs are not counted. Retention waits for a due
/// webhook until its grace ends.
#[tokio::test]
async fn endpoint_job_bytes_follow_what_is_kept() {
    use gpuvisor_control::store::{EndpointRow, CHUNK_ROW_OCTETS as C, JOB_ROW_OCTETS as R};
    use gpuvisor_wire::JobState;
    for_each_backend(|Db { store, backend, .. }| async move {
        for (ep, tenant) in [("e1", "t1"), ("e2", "t2")] {
            store
                .insert_endpoint(&EndpointRow {
                    id: ep.into(),
                    tenant_id: tenant.into(),
                    name: ep.into(),
                    spec: Default::default(),
                    created_at: 1,
                })
                .await
                .unwrap();
        }
        let held = |t: &'static str| {
            let store = store.clone();
            async move { store.tenant_job_bytes(t).await.unwrap() as i64 }
        };
        // {"n":1}: 7 octets each; a webhook URL counts too.
        store.insert_job(&job_row("j1", "e1", 1)).await.unwrap();
        let mut k = job_row("k", "e2", 1);
        k.webhook = "http://h/x".into();
        store.insert_job(&k).await.unwrap();
        assert_eq!(
            (held("t1").await, held("t2").await),
            (R + 7, R + 7 + 10),
            "{backend}"
        );
        store
            .claim_job("e1", "w1", 10, 5000)
            .await
            .unwrap()
            .unwrap();
        // A progress update counts, and replaces the one before.
        store.set_job_progress("j1", "w1", "12345").await.unwrap();
        store.set_job_progress("j1", "w1", "123").await.unwrap();
        assert_eq!(held("t1").await, R + 7 + 3, "{backend}");
        // "cdé" is 3 characters, 4 octets: octets are counted.
        for c in ["ab", "cdé"] {
            assert_eq!(
                store.append_stream("j1", "w1", c, 10).await.unwrap(),
                Some(true)
            );
        }
        assert_eq!(held("t1").await, R + 7 + 3 + 6 + 2 * C, "{backend}");
        assert_eq!(store.take_stream("j1", 1).await.unwrap(), ["ab"]);
        // The lost attempt's progress and unread chunk go, and are no longer counted.
        assert!(store.requeue_job("j1", "w1").await.unwrap());
        assert_eq!(held("t1").await, R + 7 + 2 + C, "{backend}");
        store
            .claim_job("e1", "w2", 20, 5000)
            .await
            .unwrap()
            .unwrap();
        store.set_job_progress("j1", "w2", "1234").await.unwrap();
        // The result replaces the progress update.
        assert!(store
            .finish_job_by("j1", "w2", JobState::Completed, "{\"ok\":1}", "", 30, 4000)
            .await
            .unwrap());
        assert_eq!(held("t1").await, R + 7 + 2 + C + 8, "{backend}");
        // A refused second end adds nothing.
        assert!(!store
            .finish_job("j1", JobState::Failed, "", "\"late\"", 31, 4000)
            .await
            .unwrap());
        let j1 = R + 7 + 2 + C + 8;
        assert_eq!(held("t1").await, j1, "{backend}");
        store.insert_job(&job_row("j2", "e1", 2)).await.unwrap();
        assert!(store
            .finish_job("j2", JobState::Failed, "", "\"bad\"", 40, 9000)
            .await
            .unwrap());
        assert_eq!(held("t1").await, j1 + R + 7 + 5, "{backend}");
        // A retry keeps the input only.
        assert!(store.retry_job("j2", 50).await.unwrap());
        assert_eq!(held("t1").await, j1 + R + 7, "{backend}");
        // A queued job with chunks of an earlier attempt: a purge takes both.
        store
            .claim_job("e1", "w3", 60, 5000)
            .await
            .unwrap()
            .unwrap();
        store.append_stream("j2", "w3", "zz", 10).await.unwrap();
        assert_eq!(store.take_stream("j2", 10).await.unwrap(), ["zz"]);
        assert!(store.requeue_job("j2", "w3").await.unwrap());
        assert_eq!(held("t1").await, j1 + R + 7 + 2 + C, "{backend}");
        assert_eq!(store.purge_queue("e1").await.unwrap(), 1);
        assert_eq!(held("t1").await, j1, "{backend}");
        assert!(store.take_stream("j2", 10).await.unwrap().is_empty());
        // Retention: a job whose webhook is due stays until the grace ends.
        assert!(store
            .finish_job("k", JobState::Completed, "1", "", 40, 4000)
            .await
            .unwrap());
        assert_eq!(store.delete_expired_jobs(4500, 3000).await.unwrap(), (1, 0));
        assert_eq!(
            (held("t1").await, held("t2").await),
            (0, R + 7 + 10 + 1),
            "{backend}"
        );
        assert_eq!(
            store.pending_webhooks().await.unwrap(),
            [("e2".to_string(), 1)]
        );
        assert_eq!(store.delete_expired_jobs(4500, 4100).await.unwrap(), (1, 1));
        assert_eq!(held("t2").await, 0, "{backend}");
    })
    .await;
}
