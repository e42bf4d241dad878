//! Times the daemon-side VM disk work (docs/bench/microvm.md): building a template from image
//! layers (first build and the cached lookup), creating 10 GiB qcow2 overlays, writing seeds.
//! Leaves one overlay and one seed behind for booting by hand (scripts/vm-test-fixture.README).
//!
//! Usage (as root): vm_template_bench DATA_DIR KERNEL INITRD|- IMAGE
//! IMAGE is what `gpuvisor image import` takes (an OCI layout or docker save tar, or a rootfs
//! directory); it is imported into DATA_DIR/images first, as the daemon does. KERNEL/INITRD are
//! the defaults used when the image has no /boot.

use gpuvisor_node::image::ImageStore;
use gpuvisor_node::vm::seed::{write_seed, SeedNet, SeedSpec};
use gpuvisor_node::vm::template::Templates;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const ROUNDS: usize = 20;

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: vm_template_bench DATA_DIR KERNEL INITRD|- IMAGE");
        std::process::exit(2);
    }
    let data = PathBuf::from(&args[1]);
    let kernel = PathBuf::from(&args[2]);
    let initrd = (args[3] != "-").then(|| PathBuf::from(&args[3]));
    let store = ImageStore::open(data.join("images"))?;
    let t0 = Instant::now();
    let image = store.import(std::path::Path::new(&args[4]))?;
    let import = t0.elapsed();
    let digest = &image.digest;
    // Top first, as the container runtime stacks them.
    let layers: Vec<PathBuf> = image
        .layers
        .iter()
        .rev()
        .map(|l| store.layer_dir(l))
        .collect();
    let t = Templates::new(&data, Some(kernel), initrd);

    t.remove(digest)?;
    let t0 = Instant::now();
    let tpl = t.ensure(digest, &layers)?;
    let build = t0.elapsed();
    let t0 = Instant::now();
    t.ensure(digest, &layers)?;
    let cached = t0.elapsed();
    let base = std::fs::metadata(&tpl.base)?.len();

    let out = data.join("bench");
    std::fs::create_dir_all(&out)?;
    let mut overlays = Vec::new();
    for i in 0..ROUNDS {
        let p = out.join(format!("overlay-{i}.qcow2"));
        let _ = std::fs::remove_file(&p);
        let t0 = Instant::now();
        t.create_overlay(&tpl, &p, 10 << 30)?;
        overlays.push(t0.elapsed());
        if i > 0 {
            std::fs::remove_file(&p)?;
        }
    }
    let spec = SeedSpec {
        instance_id: "bench-vm".into(),
        hostname: "fixture-vm".into(),
        user: "gpuvisor".into(),
        ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchKey bench@gpuvisor".into()],
        runcmd: vec![
            "sh".into(),
            "-c".into(),
            "echo hello-from-runcmd; cat /data/hello.txt".into(),
        ],
        startup_script: Some("#!/bin/sh\necho startup-script-ran\n".into()),
        packages: vec![],
        mounts: vec![("vol1".into(), PathBuf::from("/data"))],
        net: SeedNet {
            mac: "52:54:00:12:34:56".into(),
            address: "10.0.2.15".parse()?,
            prefix_len: 24,
            gateway: "10.0.2.2".parse()?,
            dns: vec!["10.0.2.3".parse()?],
        },
    };
    let mut seeds = Vec::new();
    for i in 0..ROUNDS {
        let p = out.join(format!("seed-{i}.iso"));
        let t0 = Instant::now();
        write_seed(&spec, &p)?;
        seeds.push(t0.elapsed());
        if i > 0 {
            std::fs::remove_file(&p)?;
        }
    }

    println!("template {digest}: base {} MiB", base >> 20);
    println!("| step | n | min ms | median ms | max ms |");
    println!("| --- | --- | --- | --- | --- |");
    stats("image import (not template work)", vec![import]);
    stats("template build (first ensure)", vec![build]);
    stats("template lookup (cached ensure)", vec![cached]);
    stats("qcow2 overlay, 10 GiB", overlays);
    stats("cloud-init seed ISO", seeds);
    println!(
        "kept: {} {} (kernel {}, initrd {:?}, cmdline {:?})",
        out.join("overlay-0.qcow2").display(),
        out.join("seed-0.iso").display(),
        tpl.kernel.display(),
        tpl.initrd,
        tpl.cmdline
    );
    Ok(())
}
