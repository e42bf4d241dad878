//! The leak check of the other suites (`common::Daemon::leaks`) sees what it claims to: a VM's
//! anti-spoofing chain left in our nftables table, and an instance cgroup at the cgroup-v2 path
//! `/sys/fs/cgroup/gpuvisor/<id>`. Objects are planted by hand for an id no instance has. Runs
//! as root (CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, Daemon};
use std::path::Path;
use std::process::Command;

/// Own prefix and pool, apart from other test binaries.
const NET: [&str; 4] = ["--net-prefix", "gk", "--net-pool", "10.75.0.0/16"];

fn nft(script: &str) -> bool {
    use std::io::Write;
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    c.wait().unwrap().success()
}

#[test]
fn the_leak_check_sees_a_vms_nft_chain_and_a_cgroup_v2_directory() {
    let _s = serial();
    let d = Daemon::start(&NET);
    // An id no instance has: 12 hex digits from the clock and our pid.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let id = format!(
        "{:012x}",
        (nanos ^ (u64::from(std::process::id()) << 32)) & 0xffff_ffff_ffff
    );
    let ids = [id.clone()];
    assert!(d.leaks(&ids).is_empty(), "{:?}", d.leaks(&ids));

    // A tap chain that outlived its VM.
    let p = d.net_prefix();
    let table = format!("gpuvisor_{p}");
    let tap: String = format!("{p}t{id}").chars().take(15).collect();
    assert!(nft(&format!(
        "add table bridge {table}\nadd chain bridge {table} {tap}\n"
    )));
    let leaks = d.leaks(&ids);
    assert!(nft(&format!("delete chain bridge {table} {tap}\n")));
    if common::nft_chains(&table).is_empty() {
        nft(&format!("delete table bridge {table}\n"));
    }
    let chain = format!("nft chain bridge {table} {tap}");
    assert!(leaks.contains(&chain), "{chain:?} not in {leaks:?}");

    // An instance cgroup where cgroup v2 has it (on a v1 or hybrid host, a directory in the
    // tmpfs at /sys/fs/cgroup stands in for it).
    let parent = Path::new("/sys/fs/cgroup/gpuvisor");
    let made_parent = !parent.exists();
    let cg = parent.join(&id);
    if std::fs::create_dir_all(&cg).is_err() {
        common::prerequisite_missing(&format!(
            "cannot make {}: the cgroup-v2 case is not checked here",
            cg.display()
        ));
        return;
    }
    let leaks = d.leaks(&ids);
    std::fs::remove_dir(&cg).unwrap();
    if made_parent {
        let _ = std::fs::remove_dir(parent);
    }
    let want = format!("cgroup {}", cg.display());
    assert!(leaks.contains(&want), "{want:?} not in {leaks:?}");
}
