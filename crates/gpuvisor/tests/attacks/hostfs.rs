//! Attacks: host-side files and mounts. Root in an instance is root on the host's files: what a
//! tenant writes into its container disk or volume (a setuid-root binary, a device node an image
//! brings) lies on the host under the data dir. Those host-side mounts must be `nosuid,nodev`,
//! so such files are inert there, and the data dir's subtrees (bundles with env, logs, disks,
//! volumes, the store, the admin key) must not be readable by other host users.

use crate::common::{serial, Daemon};
use crate::probe;
use crate::seccomp::{import_dir, import_probe, probe_rootfs};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Per-mount options (`rw,nosuid,nodev,...`) of the mount at exactly `mount_point`.
fn mount_options(mount_point: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mount_point.to_str().unwrap();
    info.lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&mp)).then(|| f[5].to_string())
        })
        .unwrap_or_else(|| panic!("{mp} is not a mount point"))
}

fn assert_nosuid_nodev(mount_point: &Path) {
    let opts = mount_options(mount_point);
    let opts: Vec<&str> = opts.split(',').collect();
    assert!(
        opts.contains(&"nosuid") && opts.contains(&"nodev"),
        "host-side mount {} lacks nosuid,nodev: {opts:?}",
        mount_point.display()
    );
}

/// Runs `cmd` (a shell command line) as uid/gid 65534 with no supplementary groups: an
/// unprivileged host user. Returns (exit code, stdout + stderr).
fn as_nobody(cmd: &str) -> (i32, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
        ])
        .arg(cmd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Executes the file at `path` as an unprivileged host user (uid 65534) and returns what it
/// printed. The file is opened by root and executed through `/proc/self/fd`, so the private
/// directories above it do not stop the exec: only the mount's `nosuid` can.
fn exec_as_nobody(path: &Path, args: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec setpriv --reuid 65534 --regid 65534 --clear-groups /proc/self/fd/3 {args} 3<'{}'",
            path.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cannot run {} as nobody: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn instance_with_volume(d: &Daemon, image: &str) -> String {
    let v = d.json(&crate::common::sleeper_create(
        image,
        &["--volume", "work:/workspace:32MiB"],
    ));
    assert_eq!(v["state"], "running", "{v}");
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn setuid_file_written_by_tenant_is_inert_on_host() {
    let _s = serial();
    let d = Daemon::start(&[]);
    import_probe(&d);
    let id = instance_with_volume(&d, "probe");
    // As root in the instance: setuid-root copies of a binary on the disk and the volume.
    probe::allowed(
        &d,
        &id,
        "make setuid-root files",
        "for f in /root/suid /workspace/suid; do cp /bin/gvprobe $f && chmod 4755 $f || exit 1; done; \
         ls -ln /root/suid /workspace/suid",
    );
    let data = std::fs::canonicalize(d.data()).unwrap();
    let inst = data.join("instances").join(&id);
    let rootfs = inst.join("rootfs");
    let disk = inst.join("disk");
    let volume = inst.join("volumes/work");
    for mp in [&rootfs, &disk, &volume] {
        assert_nosuid_nodev(mp);
    }
    for f in [
        rootfs.join("root/suid"),
        disk.join("upper/root/suid"),
        volume.join("suid"),
    ] {
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o4000),
            (0, 0o4000),
            "{} is not setuid root",
            f.display()
        );
        let out = exec_as_nobody(&f, "euid");
        assert_eq!(
            out.trim(),
            "euid=65534",
            "a setuid file the tenant wrote gave root on the host: {}",
            f.display()
        );
    }
}

#[test]
fn device_node_from_image_is_inert_in_instance_and_on_host() {
    let _s = serial();
    // The host's root disk, as a block device node inside the image.
    let dev = std::fs::metadata("/").unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let root = std::env::temp_dir().join(format!("gv-evil-devnode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let st = Command::new("cp")
        .arg("-a")
        .arg(probe_rootfs())
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    let mk = |name: &str, kind, major, minor| {
        nix::sys::stat::mknod(
            &root.join(name),
            kind,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            libc::makedev(major, minor),
        )
        .unwrap();
    };
    mk("hostdisk", nix::sys::stat::SFlag::S_IFBLK, major, minor);
    // A device root on this host can open (/dev/zero): stands for any device node the host
    // kernel would honour through a mount without nodev.
    mk("hostzero", nix::sys::stat::SFlag::S_IFCHR, 1, 5);
    let d = Daemon::start(&[]);
    import_dir(&d, &root, "devnode");
    std::fs::remove_dir_all(&root).unwrap();
    let id = instance_with_volume(&d, "devnode");

    // Inside: the node is there, but neither it nor a node the tenant makes can be opened.
    probe::allowed(&d, &id, "the node exists", "test -b /hostdisk");
    probe::refused(
        &d,
        &id,
        "read the host disk",
        "head -c 512 /hostdisk >/dev/null",
    );
    probe::refused(
        &d,
        &id,
        "mknod the host disk",
        &format!(
            "mknod /workspace/disk b {major} {minor} && head -c 512 /workspace/disk >/dev/null"
        ),
    );

    // On the host, through the instance's mount: nodev.
    let data = std::fs::canonicalize(d.data()).unwrap();
    let inst = data.join("instances").join(&id);
    let host_path = inst.join("rootfs/hostzero");
    assert!(std::fs::symlink_metadata(&host_path).is_ok());
    let opened = std::fs::File::open(&host_path);
    assert!(
        opened.is_err(),
        "the image's device node opens a host device through {}",
        host_path.display()
    );
    assert_nosuid_nodev(&inst.join("rootfs"));
}

#[test]
fn data_dir_is_private_to_root() {
    let _s = serial();
    let mut d = Daemon::start(&[]);
    import_probe(&d);
    let id = instance_with_volume(&d, "probe");
    probe::allowed(&d, &id, "write a log line", "echo secret-log-line");
    let data = std::fs::canonicalize(d.data()).unwrap();
    // An operator's data dir made with the default umask: the daemon tightens it on start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    d.restart();
    let mode = std::fs::metadata(&data).unwrap().mode() & 0o777;
    assert_eq!(
        mode & 0o066,
        0,
        "data dir is {mode:o}, want 0711 or tighter"
    );

    // Every directory under the data dir is private; the secret files are 0600.
    for e in std::fs::read_dir(&data).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if m.is_dir() {
            assert_eq!(
                m.mode() & 0o077,
                0,
                "{name}/ is {:o}: other host users can enter it",
                m.mode() & 0o777
            );
        } else if name == "admin.key" || name.starts_with("gpuvisor.db") {
            assert_eq!(
                m.mode() & 0o077,
                0,
                "{name} is {:o}: other host users can read it",
                m.mode() & 0o777
            );
        }
    }

    // And, as an unprivileged host user: nothing of the instance can be read.
    let (rc, out) = as_nobody("ls / >/dev/null && echo can-run");
    assert_eq!((rc, out.trim()), (0, "can-run"), "setpriv itself failed");
    let mut secrets: Vec<PathBuf> = vec![
        data.join("admin.key"),
        data.join("gpuvisor.db"),
        data.join("bundles").join(&id).join("config.json"),
        data.join("logs").join(&id),
        data.join("disks").join(format!("{id}.img")),
        data.join("instances").join(&id).join("rootfs/etc/passwd"),
        data.join("instances").join(&id).join("volumes/work"),
        data.join("images/layers"),
    ];
    // The volume image, whatever tenant directory holds it.
    for t in std::fs::read_dir(data.join("volumes")).unwrap() {
        let img = t.unwrap().path().join("work.img");
        if img.exists() {
            secrets.push(img);
        }
    }
    assert!(
        secrets.iter().any(|p| p.ends_with("work.img")),
        "no volume image"
    );
    for p in secrets {
        assert!(
            std::fs::symlink_metadata(&p).is_ok(),
            "{} does not exist (test is stale)",
            p.display()
        );
        let (rc, out) = as_nobody(&format!(
            "ls '{0}' >/dev/null && {{ [ -d '{0}' ] || head -c 1 '{0}'; }}",
            p.display()
        ));
        assert_ne!(
            rc,
            0,
            "{} readable by another host user: {out}",
            p.display()
        );
    }
}
