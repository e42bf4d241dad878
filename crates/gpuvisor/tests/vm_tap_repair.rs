//! Review M4 end to end: a running VM's tap anti-spoofing chain, lost to `nft flush ruleset` or
//! `systemctl restart nftables` (here: our table deleted), is put back by the reconciler's
//! sweep, while the daemon runs and when a restarted daemon adopts the VM; an event says so.
//! Needs QEMU and the VM test fixture (as `tests/vm.rs`); runs as root (CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{nft_chains, prerequisite_missing, serial, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The fixture dir (kernel and initrd), or `None` with the skip recorded.
fn fixture() -> Option<PathBuf> {
    let qemu = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("qemu-system-x86_64").is_file());
    if !qemu {
        prerequisite_missing("qemu-system-x86_64 not installed (scripts/install-deps)");
        return None;
    }
    if let Some(d) = std::env::var_os("GPUVISOR_VM_FIXTURE").map(PathBuf::from) {
        if d.join("vmlinuz").is_file() && d.join("initrd.img").is_file() {
            return Some(d);
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vm-test-fixture");
    let dir = PathBuf::from("/var/tmp/gpuvisor-vm-fixture");
    if script.is_file()
        && Command::new(&script)
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success())
        && dir.join("vmlinuz").is_file()
    {
        return Some(dir);
    }
    prerequisite_missing("no VM test fixture (GPUVISOR_VM_FIXTURE or scripts/vm-test-fixture)");
    None
}

fn delete_table(table: &str) {
    let st = Command::new("nft")
        .args(["delete", "table", "bridge", table])
        .status()
        .unwrap();
    assert!(st.success(), "nft delete table bridge {table}");
}

/// Waits up to 30 s for `table` to hold chain `tap`.
fn chain_comes_back(d: &Daemon, table: &str, tap: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nft_chains(table).iter().any(|c| c == tap) {
        assert!(
            Instant::now() < deadline,
            "chain {tap} not back in {table}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_running_vms_tap_filter_is_put_back_after_a_flush_and_on_adoption() {
    let _g = serial();
    let Some(fx) = fixture() else { return };
    let (k, i) = (fx.join("vmlinuz"), fx.join("initrd.img"));
    let serve = [
        "--sweep-every",
        "1s",
        "--vm-kernel",
        k.to_str().unwrap(),
        "--vm-initrd",
        i.to_str().unwrap(),
    ];
    let mut d = Daemon::start(&serve);
    d.import_busybox();
    let v = d.json(&[
        "instance",
        "create",
        "--image",
        "busybox",
        "--runtime",
        "vm",
        "--vcpus",
        "1",
        "--memory",
        "256MiB",
        "--container-disk",
        "256MiB",
        "--wait",
    ]);
    assert_eq!(v["state"], "running", "{v}\n{}", d.log());
    let id = v["id"].as_str().unwrap().to_string();
    let p = d.net_prefix();
    let table = format!("gpuvisor_{p}");
    let tap: String = format!("{p}t{id}").chars().take(15).collect();
    assert!(
        nft_chains(&table).contains(&tap),
        "{:?}",
        nft_chains(&table)
    );

    // While the daemon runs.
    delete_table(&table);
    chain_comes_back(&d, &table, &tap);
    let events = d.json(&["instance", "events", &id]).to_string();
    assert!(
        events.contains("anti-spoofing rules were removed"),
        "{events}"
    );

    // While it is down: the restarted daemon adopts the running VM and its chain is back (its
    // first sweep at start and the adoption both repair; this does not tell them apart).
    d.kill9();
    delete_table(&table);
    d.restart_with(&serve);
    chain_comes_back(&d, &table, &tap);

    d.terminate_all();
    let leaks = d.leaks(std::slice::from_ref(&id));
    assert!(leaks.is_empty(), "{leaks:?}");
}
