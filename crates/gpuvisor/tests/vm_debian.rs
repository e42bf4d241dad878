//! A real Linux guest: the Debian 12 cloud-init template of `scripts/make-vm-template` (built
//! once per version of the script, see `common::vm::debian_template`) boots as a micro-VM and
//! cloud-init applies its NoCloud seed. Checked from inside the guest (through the guest agent,
//! `instance exec`) and on its serial console (`instance logs`): the hostname, the user with
//! exactly the given SSH key, the startup script and the command (runcmd) ran with their output
//! on the console, the root filesystem grown to the requested disk size, the static address,
//! the volume mounted at its path and writable. Then the volume written by that VM is read by
//! the next one (the minimal test guest, which mounts the seed's volumes too), and nothing is
//! left. The Debian guest takes one to two minutes to boot under TCG: it is booted once here;
//! tests/vm.rs covers the rest with the minimal guest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::vm::{debian_template, fixture, vm_daemon, wait_log};
use common::*;
use std::time::{Duration, Instant};

/// A Debian first boot under TCG: cloud-init finished at 80-110 s of uptime on a quiet 2-core
/// machine; a loaded CI machine may take a few times that.
const CLOUD_INIT_TIMEOUT: Duration = Duration::from_secs(600);
const GIB: u64 = 1 << 30;

/// `sh -c CMD` in the guest through the agent: must exit 0; its stdout, trimmed.
fn guest(d: &Daemon, id: &str, cmd: &str) -> String {
    let (code, out, err) = d.exec(id, cmd);
    assert_eq!(
        code, 0,
        "guest {cmd:?}: exit {code}, stdout {out:?}, stderr {err:?}"
    );
    out.trim().to_string()
}

#[test]
fn debian_guest_runs_cloud_init_and_its_volume_is_read_by_the_next_vm() {
    let _g = serial();
    let Some(fx) = fixture() else { return };
    if common::vm::which("ssh-keygen").is_none() {
        prerequisite_missing("ssh-keygen not installed (openssh-client, scripts/install-deps)");
        return;
    }
    let Some(template) = debian_template() else {
        return;
    };
    let t0 = Instant::now();
    let d = vm_daemon(&fx);
    d.json(&[
        "image",
        "import",
        template.to_str().unwrap(),
        "--name",
        "debian12",
    ]);
    d.import_busybox();
    eprintln!("images imported: {:.1} s", t0.elapsed().as_secs_f64());

    // The tenant's inputs: a fresh ed25519 key, a startup script, a command.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("id_ed25519");
    let st = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "gv-test@vm-debian",
            "-f",
        ])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let pubkey = pubkey.trim();
    let script = keys.path().join("startup.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"startup-script-ran on $(hostname) as $(id -un)\"\n",
    )
    .unwrap();
    let name = "debian-vm";
    let v = d.json(&[
        "instance",
        "create",
        "--image",
        "debian12",
        "--runtime",
        "vm",
        "--name",
        name,
        "--restart",
        "no",
        "--vcpus",
        "1",
        "--memory",
        "1GiB",
        "--container-disk",
        "3GiB",
        "--ssh-key",
        &format!("@{}", key.with_extension("pub").display()),
        "--startup-script",
        script.to_str().unwrap(),
        "--volume",
        "debvol:/data:64MiB",
        "--wait",
        "--timeout",
        "300s",
        "--",
        "sh",
        "-c",
        "echo runcmd-ran-as-$(id -un); echo hello-from-the-debian-guest > /data/a.txt; sync",
    ]);
    assert_eq!(v["state"], "running", "{v}\n{}", d.log());
    assert_eq!(v["runtime"], "vm", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let ip = v["ip"].as_str().unwrap().to_string();
    eprintln!("Debian VM running: {:.1} s", t0.elapsed().as_secs_f64());

    // cloud-init's last word on the console, from the NoCloud seed; the startup script ran
    // before the command, both with their output on the console (`instance logs`).
    let log = wait_log(&d, &id, " finished at ", 1, CLOUD_INIT_TIMEOUT);
    eprintln!("cloud-init finished: {:.1} s", t0.elapsed().as_secs_f64());
    let fin = log.lines().find(|l| l.contains(" finished at ")).unwrap();
    assert!(
        fin.contains("Cloud-init v.") && fin.contains("DataSourceNoCloud"),
        "{fin}"
    );
    let script_at = log
        .find(&format!("startup-script-ran on {name} as root"))
        .unwrap_or_else(|| panic!("no startup script output in the console log:\n{log}"));
    let runcmd_at = log
        .find("runcmd-ran-as-root")
        .unwrap_or_else(|| panic!("no runcmd output in the console log:\n{log}"));
    assert!(
        script_at < runcmd_at,
        "the startup script runs first:\n{log}"
    );

    // From inside the guest, through the guest agent. Every module of cloud-init succeeded.
    let status = guest(&d, &id, "cloud-init status --long");
    assert!(status.contains("status: done"), "{status}");
    // The seed's user-data is valid under the guest's own cloud-init schema (a schema error is
    // only a warning in its log).
    let schema = guest(&d, &id, "cloud-init schema --system 2>&1");
    assert!(schema.contains("Valid cloud-config"), "{schema}");
    // exec: stdout, stderr and the exit status come back apart.
    let (code, out, err) = d.exec(&id, "echo to-stdout; echo to-stderr >&2; exit 7");
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (7, "to-stdout\n", "to-stderr\n")
    );
    // The hostname the seed sets: the instance's name.
    assert_eq!(
        guest(&d, &id, "hostname; cat /etc/hostname"),
        format!("{name}\n{name}")
    );
    // The user, with sudo and exactly the one key.
    assert_eq!(
        guest(&d, &id, "getent passwd gpuvisor | cut -d: -f6,7"),
        "/home/gpuvisor:/bin/bash"
    );
    let authorized = guest(&d, &id, "cat /home/gpuvisor/.ssh/authorized_keys");
    let lines: Vec<&str> = authorized
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines, [pubkey], "authorized_keys:\n{authorized}");
    assert!(
        guest(&d, &id, "sudo -l -U gpuvisor").contains("NOPASSWD: ALL"),
        "gpuvisor has no passwordless sudo"
    );
    // The root disk has the requested size and its filesystem was grown to it (the template's
    // base is under 1 GiB).
    assert_eq!(guest(&d, &id, "findmnt -n -o SOURCE /"), "/dev/vda");
    let disk: u64 = guest(&d, &id, "blockdev --getsize64 /dev/vda")
        .parse()
        .unwrap();
    assert_eq!(disk, 3 * GIB, "root disk size");
    let fs: u64 = guest(&d, &id, "df -B1 --output=size / | tail -1")
        .parse()
        .unwrap();
    assert!(
        fs > 3 * GIB * 9 / 10 && fs <= 3 * GIB,
        "root filesystem {fs} bytes on a 3 GiB disk: not grown"
    );
    // Exactly its vCPU and memory (MemTotal: RAM less what the kernel keeps).
    assert_eq!(guest(&d, &id, "nproc"), "1");
    let mem_kb: u64 = guest(&d, &id, "awk '/^MemTotal:/ {print $2}' /proc/meminfo")
        .parse()
        .unwrap();
    assert!(
        mem_kb <= 1024 * 1024 && mem_kb > 900 * 1024,
        "MemTotal {mem_kb} kB for 1 GiB"
    );
    // The static address of our plan (network-config), on eth0.
    let addr = guest(&d, &id, "ip -4 -o addr show dev eth0");
    assert!(addr.contains(&format!("inet {ip}/")), "{addr}");
    // The volume: mounted at its path (its own ext4, not the root disk), written by the
    // command, writable through exec.
    let mnt = guest(&d, &id, "findmnt -n -o SOURCE,FSTYPE /data");
    assert!(
        mnt.starts_with("/dev/vd") && !mnt.starts_with("/dev/vda ") && mnt.ends_with("ext4"),
        "/data: {mnt:?}"
    );
    assert_eq!(
        guest(&d, &id, "cat /data/a.txt"),
        "hello-from-the-debian-guest"
    );
    guest(&d, &id, "echo written-through-exec > /data/b.txt && sync");

    // The web console in a browser: the VM's page, its serial console (Debian's getty asks
    // for a login) and its graphical console (issue 15).
    console_e2e(&d, &[("GV_SCENARIO", "vm"), ("GV_VM_ID", &id)]);

    // Terminate (the ACPI power button: Debian shuts down and unmounts the volume).
    let t = d.json(&["instance", "terminate", &id, "--wait", "--timeout", "120s"]);
    assert_eq!(t["state"], "terminated", "{t}");
    eprintln!("Debian VM terminated: {:.1} s", t0.elapsed().as_secs_f64());

    // The next VM (the minimal guest, which mounts the seed's volumes as well) reads both files.
    let v = d.json(&[
        "instance",
        "create",
        "--image",
        "busybox",
        "--runtime",
        "vm",
        "--name",
        "reader-vm",
        "--restart",
        "no",
        "--vcpus",
        "1",
        "--memory",
        "256MiB",
        "--container-disk",
        "256MiB",
        "--volume",
        "debvol:/data",
        "--wait",
        "--",
        "cat",
        "/data/a.txt",
        "/data/b.txt",
    ]);
    assert_eq!(v["state"], "running", "{v}\n{}", d.log());
    let reader = v["id"].as_str().unwrap().to_string();
    let log = wait_log(
        &d,
        &reader,
        "gpuvisor-guest-ready",
        1,
        Duration::from_secs(180),
    );
    let out: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("gpuvisor-guest: runcmd: cat "))
        .skip(1)
        .take_while(|l| !l.contains("gpuvisor-guest: runcmd exit"))
        .map(str::trim)
        // The kernel's own messages share the console: `[    1.812941] ...`.
        .filter(|l| !l.starts_with('['))
        .collect();
    assert_eq!(
        out,
        ["hello-from-the-debian-guest", "written-through-exec"],
        "{log}"
    );
    assert!(log.contains("gpuvisor-guest: runcmd exit 0"), "{log}");
    let t = d.json(&[
        "instance",
        "terminate",
        &reader,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert_eq!(t["state"], "terminated", "{t}");

    // Nothing left of either VM; the volume goes with `volume rm` only.
    let ids = vec![id, reader];
    let leaks = d.leaks(&ids);
    assert!(leaks.is_empty(), "leaks: {leaks:?}");
    assert!(d.leaked_processes(&ids).is_empty());
    let rm = d.cli(&["volume", "rm", "debvol"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    eprintln!("done: {:.1} s", t0.elapsed().as_secs_f64());
}
