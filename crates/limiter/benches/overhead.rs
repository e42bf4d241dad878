//! Added cost per intercepted call: `cuLaunchKernel` and a `cuMemAlloc_v2` + `cuMemFree_v2`
//! pair, through `libgpuvisor_limiter.so` (unthrottled, quota far away) against calling the
//! fake driver directly. Both shared objects are built in release mode into
//! `<target>/limiter-bench`; the measuring loop is C (`overhead.c`), as an application would be.
//!
//! A second table: 10^7 alloc/free cycles through the limiter (`overhead churn`), ns per cycle
//! for the first and every following million, and the cost of a free the table does not know
//! (a lookup that misses), which is what grew without bound while deleted entries stayed in the
//! table as tombstones.
//!
//! Run: `cargo bench -p gpuvisor-limiter --bench overhead` (prints the tables; figures go in
//! `docs/bench/limiter.md`). Needs root: the limited runs get a private mount namespace with the
//! config at the one path the library reads (see `tests/ns`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../tests/ns/mod.rs"]
mod ns;

use gpuvisor_limiter::config::Config;
use gpuvisor_limiter::shm::{DeviceLimit, Priority, Region, RegionSpec, FULL_SHARE_BP};

fn main() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().unwrap();
    let target_root = exe.ancestors().nth(3).unwrap().to_path_buf();
    let out = target_root.join("limiter-bench");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--quiet", "--offline", "--release"])
        .args(["-p", "gpuvisor-fakecuda", "-p", "gpuvisor-limiter", "--lib"])
        .env("CARGO_TARGET_DIR", &out)
        .current_dir(manifest)
        .status()
        .unwrap()
        .success();
    assert!(ok, "release build of the shared objects failed");
    let rel = out.join("release");
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    for n in ["libcuda.so", "libcuda.so.1"] {
        std::os::unix::fs::symlink(rel.join("libcuda.so"), lib.join(n)).unwrap();
    }
    let bin = dir.path().join("overhead");
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(manifest.join("benches/overhead.c"))
        .arg(format!("-L{}", lib.display()))
        .arg("-lcuda")
        .status()
        .unwrap();
    assert!(cc.success(), "compiling overhead.c failed");

    let limits = dir.path().join("r.limits");
    let usage = dir.path().join("r.usage");
    let _region = Region::create(
        &limits,
        &usage,
        &RegionSpec {
            devices: vec![DeviceLimit {
                quota_bytes: 1 << 40,
                share_bp: FULL_SHARE_BP,
            }],
            priority: Priority::High,
        },
    )
    .unwrap();
    let conf = dir.path().join("limiter.conf");
    Config::new(&limits, &usage).write(&conf).unwrap();

    let run = |preload: Option<&PathBuf>| -> (f64, f64) {
        let mut c = Command::new(&bin);
        c.arg("4000000").env("LD_LIBRARY_PATH", &lib);
        if let Some(p) = preload {
            c.env("LD_PRELOAD", p);
            ns::confine(&mut c, dir.path());
        }
        let o = c.output().unwrap();
        assert!(o.status.success());
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let get = |k: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        (get("launch "), get("alloc_free "))
    };
    let direct = run(None);
    let limited = run(Some(&rel.join("libgpuvisor_limiter.so")));
    println!("| call | double directly (ns) | through the limiter (ns) | added (ns) | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| cuLaunchKernel | {:.1} | {:.1} | {:.1} | <= 50 |",
        direct.0,
        limited.0,
        limited.0 - direct.0
    );
    println!(
        "| cuMemAlloc_v2 + cuMemFree_v2 | {:.1} | {:.1} | {:.1} | <= 200 (alloc alone) |",
        direct.1,
        limited.1,
        limited.1 - direct.1
    );

    let mut c = Command::new(&bin);
    c.args(["churn", "10000000"])
        .env("LD_LIBRARY_PATH", &lib)
        .env("LD_PRELOAD", rel.join("libgpuvisor_limiter.so"));
    ns::confine(&mut c, dir.path());
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    println!();
    println!("| million | alloc + free through the limiter (ns per cycle) | free of an unknown pointer (ns) |");
    println!("|---|---|---|");
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 && f[0] == "churn" {
            println!("| {} | {} | {} |", f[1], f[2], f[3]);
        }
    }
}
