//! Tenant scale and removal: the address plan holds more than 256 tenants when each gets a
//! smaller subnet, refuses clearly when the pool is full, and `tenant rm` frees a tenant's slot
//! (refused while it owns something, or `--cascade`: everything it owns goes, also across a
//! daemon crash).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, sleeper, Daemon};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The harness's pool base (`GPUVISOR_NET_POOL` lets suites run side by side) and prefix.
fn pool_base() -> String {
    let p = std::env::var("GPUVISOR_NET_POOL").unwrap_or_else(|_| "10.88.0.0".into());
    p.split('/').next().unwrap().to_string()
}

fn net_prefix() -> String {
    std::env::var("GPUVISOR_NET_PREFIX").unwrap_or_else(|_| "gv".into())
}

fn key_for(d: &Daemon, tenant: &str) -> String {
    d.json(&["key", "create", "--tenant", tenant])["secret"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `eth0`'s IPv4 address/len inside the instance's network namespace.
fn netns_addr(id: &str) -> String {
    let ns = format!("{}-{id}", net_prefix());
    let out = std::process::Command::new("ip")
        .args(["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip -n {ns}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {text:?}"))
        .to_string()
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn three_hundred_tenants_each_get_a_subnet_of_their_own() {
    let _s = serial();
    let d = Daemon::start(&["--net-tenant-prefix", "26"]);
    d.import_busybox();
    // The admin tenant has slot 0; t1..t300 get 1..300: beyond the 256 /24s of a /16.
    for n in 1..=300 {
        let out = d.cli(&["tenant", "create", &format!("t{n}")]);
        assert!(out.status.success(), "tenant t{n}: {out:?}");
    }
    let last = key_for(&d, "t300");
    let id = d.create_as(&last, &sleeper());
    let [a, b, ..] = pool_base().parse::<std::net::Ipv4Addr>().unwrap().octets();
    // Slot 300 of /26s: 300 * 64 = 75 * 256 + 0.
    let want = format!("{a}.{b}.75.2");
    assert_eq!(d.json(&["instance", "get", &id])["ip"], want.as_str());
    assert_eq!(netns_addr(&id), format!("{want}/26"));
    // Its neighbour slot 299 (x.74.192/26) is another subnet on another bridge.
    let prev = key_for(&d, "t299");
    let id2 = d.create_as(&prev, &sleeper());
    assert_eq!(netns_addr(&id2), format!("{a}.{b}.74.194/26"));
    assert!(link_exists(&format!("{}b300", net_prefix())));
    assert!(link_exists(&format!("{}b299", net_prefix())));
    d.terminate_all();
}

#[test]
fn full_pool_is_refused_and_tenant_rm_frees_a_slot() {
    let _s = serial();
    // A /22 of /24s: four tenant networks; the admin tenant holds the first.
    let pool = format!("{}/22", pool_base());
    let mut d = Daemon::start(&["--net-pool", &pool]);
    d.import_busybox();
    for t in ["a", "b", "c"] {
        d.json(&["tenant", "create", t]);
    }
    let out = d.cli(&["tenant", "create", "d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "insufficient resources: {err}");
    assert!(
        err.contains(&format!("{pool} holds 4 tenant networks")) && err.contains("tenant rm"),
        "{err}"
    );
    let names: Vec<String> = d
        .json(&["tenant", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"d".to_string()), "{names:?}");

    // c owns an instance and a volume: a plain rm is refused, naming them.
    let kc = key_for(&d, "c");
    let c_id = d.json(&["tenant", "get", "c"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut args = sleeper();
    args.splice(0..0, ["--name", "web", "--volume", "data:/data:16MiB"]);
    let inst = d.create_as(&kc, &args);
    let out = d.cli(&["tenant", "rm", "c"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("1 instance (web)")
            && err.contains("1 volume (data)")
            && err.contains("--cascade"),
        "{err}"
    );
    // Nobody deletes the tenant of the key they use.
    let out = d.cli(&["tenant", "rm", "admin"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    // An empty tenant goes at once and its slot is the next tenant's.
    let r = d.json(&["tenant", "rm", "b"]);
    assert_eq!(r["deleted"], true, "{r}");
    d.json(&["tenant", "create", "d"]);
    let kd = key_for(&d, "d");
    let d_inst = d.create_as(&kd, &sleeper());
    let [x, y, ..] = pool_base().parse::<std::net::Ipv4Addr>().unwrap().octets();
    assert_eq!(
        netns_addr(&d_inst),
        format!("{x}.{y}.2.2/24"),
        "b's slot 2 reused"
    );

    // A registry login of c's (its row references the tenant) goes with it too.
    let out = d.registry_login(&kc, "registry.example.com", "c", "pw");
    assert!(out.status.success(), "{out:?}");
    // Cascade, with the daemon killed right after it began: the restarted daemon finishes.
    let r = d.json(&["tenant", "rm", "c", "--cascade"]);
    assert_eq!(r["instances"], serde_json::json!(["web"]), "{r}");
    // The tenant's keys stop working at once.
    let out = d.cli_as(&kc, &["instance", "list"]);
    assert_eq!(out.status.code(), Some(4), "revoked key: {out:?}");
    // No new key brings it back while it is being deleted.
    let out = d.cli(&["key", "create", "--tenant", "c"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    d.kill9();
    d.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = d.cli(&["tenant", "get", "c"]);
        if out.status.code() == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "tenant c still there: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // (`leaks` counts every object under the data dir: d's instance goes first.)
    let out = d.cli_as(&kd, &["instance", "terminate", &d_inst, "--wait"]);
    assert!(out.status.success(), "{out:?}");
    let leaks = d.leaks(std::slice::from_ref(&inst));
    assert!(leaks.is_empty(), "{leaks:?}\n{}", d.log());
    let vols = d.data().join("volumes").join(&c_id);
    let left: Vec<_> = std::fs::read_dir(&vols)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "volume images left: {left:?}");
    assert!(
        !link_exists(&format!("{}b3", net_prefix())),
        "c's bridge left"
    );
    let v: Value = d.json(&["volume", "list"]);
    assert!(
        v.as_array().unwrap().iter().all(|v| v["tenant"] != "c"),
        "{v}"
    );
    // Its slot is free again.
    d.json(&["tenant", "create", "e"]);
    d.terminate_all();
}

/// The address plan is kept with the tenants' slots: a daemon started with another plan while
/// instances live is refused (their addresses and bridges were made under the old one); once
/// they are gone the new plan is taken, and the old bridges (whose addresses could shadow a
/// neighbour's new subnet) are made again.
#[test]
fn address_plan_change_is_refused_while_instances_live() {
    let _s = serial();
    let mut d = Daemon::start(&[]);
    d.import_busybox();
    let id = d.create(&sleeper());
    d.kill9();
    // The same data dir under /26s: refused at start, naming both plans.
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--data-dir"])
        .arg(d.data())
        .args(["--listen", "127.0.0.1:0", "--simulate-gpus", "1xA100-80GB"])
        .args(["--net-tenant-prefix", "26"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let base = pool_base();
    assert!(!out.status.success(), "started with another plan: {err}");
    assert!(
        err.contains(&format!("changed from {base}/16 /24 to {base}/16 /26"))
            && err.contains("1 instance(s)"),
        "{err}"
    );
    // Back on the old plan it runs on; with its instance gone the new plan is taken.
    d.restart();
    assert_eq!(d.json(&["instance", "get", &id])["state"], "running");
    let out = d.cli(&["instance", "terminate", &id, "--wait"]);
    assert!(out.status.success(), "{out:?}");
    d.kill9();
    d.restart_with(&["--net-tenant-prefix", "26"]);
    let id = d.create(&sleeper());
    let [a, b, ..] = base.parse::<std::net::Ipv4Addr>().unwrap().octets();
    assert_eq!(netns_addr(&id), format!("{a}.{b}.0.2/26"));
    let out = std::process::Command::new("ip")
        .args([
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            &format!("{}b0", net_prefix()),
        ])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        shown.matches(" inet ").count(),
        1,
        "one gateway address on the bridge: {shown}"
    );
    assert!(shown.contains(&format!("{a}.{b}.0.1/26")), "{shown}");
    d.terminate_all();
}
