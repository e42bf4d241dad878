use super::*;
use std::os::unix::fs::symlink;
use std::process::Command;

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// Root, mkfs.ext4, qemu-img and debugfs (to read the base back without mounting it).
fn prereqs() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        crate::testfx::prerequisite_missing("root (overlay mounts)");
        return false;
    }
    for tool in ["mkfs.ext4", "qemu-img", "debugfs"] {
        if Command::new(tool).arg("-V").output().is_err() {
            crate::testfx::prerequisite_missing(&format!("{tool} (scripts/install-deps)"));
            return false;
        }
    }
    true
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// An OCI whiteout as the image store unpacks it: a 0/0 character device.
fn whiteout(path: &Path) {
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        0,
    )
    .unwrap();
}

fn opaque(dir: &Path) {
    set_xattr(dir, "trusted.overlay.opaque", b"y");
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and live across the call; value is valid for
    // value.len() bytes.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr {name} on {}", path.display());
}

fn debugfs(base: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(base)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names in a directory of the base disk (`ls -p` lines: /ino/mode/uid/gid/name/size/).
fn names(base: &Path, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = debugfs(base, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    v.sort();
    v
}

fn cat(base: &Path, path: &str) -> String {
    debugfs(base, &format!("cat {path}"))
}

fn layout(dir: &Path) -> (PathBuf, PathBuf) {
    let bottom = dir.join("layers/bottom");
    let top = dir.join("layers/top");
    write(&bottom.join("etc/hostname"), "bottom\n");
    write(&bottom.join("etc/gone"), "deleted by the top layer\n");
    write(&bottom.join("opt/old/a"), "hidden by an opaque dir\n");
    write(&bottom.join("bin/tool"), "#!/bin/sh\n");
    write(&top.join("etc/hostname"), "top\n");
    whiteout(&top.join("etc/gone"));
    write(&top.join("opt/old/b"), "new\n");
    opaque(&top.join("opt/old"));
    // Links out of the tree are copied as links, never followed.
    symlink("/etc/shadow", top.join("shadow-link")).unwrap();
    symlink("../../../../../../etc", top.join("etc/up")).unwrap();
    (top, bottom)
}

#[test]
fn flattens_layers_with_whiteouts_and_never_follows_links() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (top, bottom) = layout(dir.path());
    let kernel = dir.path().join("default-vmlinuz");
    write(&kernel, "default kernel");
    let t = Templates::new(&dir.path().join("data"), Some(kernel.clone()), None);
    let tpl = t.ensure(D1, &[top.clone(), bottom.clone()]).unwrap();

    assert_eq!(tpl.digest, D1);
    assert_eq!(tpl.cmdline, "root=/dev/vda rw");
    assert_eq!(fs::read_to_string(&tpl.kernel).unwrap(), "default kernel");
    assert_eq!(tpl.initrd, None);
    assert_eq!(
        fs::metadata(&tpl.base).unwrap().mode() & 0o777,
        0o444,
        "the base disk is read-only"
    );
    assert_eq!(cat(&tpl.base, "/etc/hostname"), "top\n");
    assert_eq!(names(&tpl.base, "/etc"), ["hostname", "up"]);
    assert_eq!(names(&tpl.base, "/opt/old"), ["b"]);
    assert_eq!(cat(&tpl.base, "/bin/tool"), "#!/bin/sh\n");
    let link = debugfs(&tpl.base, "stat /shadow-link");
    assert!(link.contains("Type: symlink"), "{link}");
    assert!(link.contains("/etc/shadow"), "{link}");
    // Nothing of the host's /etc came in through the links: the root holds exactly the
    // layers' entries, and both links are links.
    assert_eq!(
        names(&tpl.base, "/"),
        ["bin", "etc", "lost+found", "opt", "shadow-link"]
    );
    let up = debugfs(&tpl.base, "stat /etc/up");
    assert!(up.contains("Type: symlink"), "{up}");
    assert!(up.contains("../../../../../../etc"), "{up}");
    // No build leftovers: only the template and the lock dir.
    let mut entries: Vec<String> = fs::read_dir(t.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, [".locks", &dir_name(D1).unwrap()]);
    assert!(crate::disk::mounts_under(dir.path()).unwrap().is_empty());
    assert_eq!(t.digests(), [D1]);

    // A second ensure returns the same template without building again.
    let again = t.ensure(D1, &[top, bottom]).unwrap();
    assert_eq!(again, tpl);
}

#[test]
fn kernel_and_initrd_come_from_the_images_boot() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write(
        &layer.join("boot/vmlinuz-6.1.0-9-cloud-amd64"),
        "old kernel",
    );
    write(
        &layer.join("boot/vmlinuz-6.1.0-10-cloud-amd64"),
        "new kernel",
    );
    write(
        &layer.join("boot/initrd.img-6.1.0-9-cloud-amd64"),
        "old initrd",
    );
    write(
        &layer.join("boot/initrd.img-6.1.0-10-cloud-amd64"),
        "new initrd",
    );
    // A newer-looking "kernel" that is a link to a host file is not a candidate.
    symlink("/etc/shadow", layer.join("boot/vmlinuz-9.9.9")).unwrap();
    let default = dir.path().join("default-vmlinuz");
    write(&default, "default kernel");
    let t = Templates::new(&dir.path().join("data"), Some(default), None);
    // Each guard on its own (review 12): the listing skips the link, and the copy refuses to
    // open a link even if one got through.
    assert_eq!(
        find_boot(&layer).unwrap().unwrap().0,
        "vmlinuz-6.1.0-10-cloud-amd64"
    );
    let copied = dir.path().join("copied");
    assert!(copy_capped(
        &layer.join("boot/vmlinuz-9.9.9"),
        &copied,
        MAX_KERNEL_BYTES,
        D1,
        "kernel"
    )
    .is_err());
    let tpl = t.ensure(D1, &[layer]).unwrap();
    assert_eq!(fs::read_to_string(&tpl.kernel).unwrap(), "new kernel");
    assert_eq!(
        fs::read_to_string(tpl.initrd.as_ref().unwrap()).unwrap(),
        "new initrd"
    );
}

#[test]
fn a_boot_symlink_is_not_followed_and_no_kernel_is_an_error_leaving_nothing() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host_boot = dir.path().join("host-boot");
    write(&host_boot.join("vmlinuz"), "a host kernel");
    let layer = dir.path().join("layer");
    fs::create_dir_all(&layer).unwrap();
    symlink(&host_boot, layer.join("boot")).unwrap();

    let t = Templates::new(&dir.path().join("data"), None, None);
    match t.ensure(D1, std::slice::from_ref(&layer)) {
        Err(TemplateError::NoKernel { digest }) => assert_eq!(digest, D1),
        other => panic!("expected NoKernel, got {other:?}"),
    }
    let left: Vec<_> = fs::read_dir(t.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [".locks"], "a failed build leaves nothing");
    assert!(crate::disk::mounts_under(dir.path()).unwrap().is_empty());
    assert!(t.digests().is_empty());

    // With an operator kernel the same image builds, still ignoring the image's link.
    let default = dir.path().join("default-vmlinuz");
    let initrd = dir.path().join("default-initrd");
    write(&default, "default kernel");
    write(&initrd, "default initrd");
    let t = Templates::new(&dir.path().join("data"), Some(default), Some(initrd));
    let tpl = t.ensure(D1, &[layer]).unwrap();
    assert_eq!(fs::read_to_string(&tpl.kernel).unwrap(), "default kernel");
    assert_eq!(
        fs::read_to_string(tpl.initrd.unwrap()).unwrap(),
        "default initrd"
    );
}

#[test]
fn concurrent_ensures_build_once() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (top, bottom) = layout(dir.path());
    let kernel = dir.path().join("vmlinuz");
    write(&kernel, "k");
    let t = Templates::new(&dir.path().join("data"), Some(kernel), None);
    let layers = [top, bottom];
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| t.ensure(D1, &layers))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // A second build would have failed to rename onto the first one's directory.
    let inodes: Vec<u64> = results
        .into_iter()
        .map(|r| fs::metadata(r.unwrap().base).unwrap().ino())
        .collect();
    assert!(inodes.windows(2).all(|w| w[0] == w[1]), "{inodes:?}");
    assert_eq!(t.digests(), [D1]);
}

#[test]
fn leftovers_of_a_killed_build_are_cleared() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    write(&kernel, "k");
    let t = Templates::new(&dir.path().join("data"), Some(kernel), None);
    let name = dir_name(D1).unwrap();
    // A build killed with its overlay still mounted.
    let stale = t.root().join(format!(".tmp-{name}-dead"));
    let lower = dir.path().join("lower");
    write(&lower.join("f"), "x");
    fs::create_dir_all(stale.join("root")).unwrap();
    fs::create_dir_all(stale.join("empty")).unwrap();
    let opts = format!(
        "lowerdir={}:{}",
        lower.display(),
        stale.join("empty").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &stale.join("root"),
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .unwrap();
    t.ensure(D1, &[lower]).unwrap();
    assert!(!stale.exists());
    assert!(crate::disk::mounts_under(dir.path()).unwrap().is_empty());

    // Leftovers of a digest nobody builds again go at the next sweep (digests), unless a
    // build of that digest holds its lock.
    let name2 = dir_name(D2).unwrap();
    let stale2 = t.root().join(format!(".tmp-{name2}-dead"));
    fs::create_dir_all(stale2.join("root")).unwrap();
    let held = t.lock(&name2).unwrap();
    assert_eq!(t.digests(), [D1]);
    assert!(stale2.exists(), "a build in progress is left alone");
    drop(held);
    assert_eq!(t.digests(), [D1]);
    assert!(!stale2.exists());
}

#[test]
fn overlay_is_qcow2_backed_by_the_base_with_the_exact_size() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write(&layer.join("etc/hostname"), "x\n");
    let kernel = dir.path().join("vmlinuz");
    write(&kernel, "k");
    let t = Templates::new(&dir.path().join("data"), Some(kernel), None);
    let tpl = t.ensure(D1, &[layer]).unwrap();
    let overlay = dir.path().join("vm/disk.qcow2");
    fs::create_dir_all(overlay.parent().unwrap()).unwrap();
    let size = (10u64 << 30) + 512;
    t.create_overlay(&tpl, &overlay, size).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&overlay).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "overlay mode {mode:o}");
    }
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], size);
    assert_eq!(info["backing-filename"], tpl.base.display().to_string());
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    // QEMU's own consistency check: refcounts, L1, header.
    let check = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // Reads fall through to the base: the guest sees the template's filesystem.
    let mut head = vec![0u8; 2048];
    let mut base_head = vec![0u8; 2048];
    let img = Command::new("qemu-img")
        .args(["dd", "-U", "-f", "qcow2", "-O", "raw", "bs=2048", "count=1"])
        .arg(format!("if={}", overlay.display()))
        .arg(format!("of={}", dir.path().join("head.raw").display()))
        .output()
        .unwrap();
    assert!(
        img.status.success(),
        "{}",
        String::from_utf8_lossy(&img.stderr)
    );
    File::open(dir.path().join("head.raw"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    File::open(&tpl.base)
        .unwrap()
        .read_exact(&mut base_head)
        .unwrap();
    assert_eq!(head, base_head);
    fs::remove_file(dir.path().join("head.raw")).unwrap();
    // The overlay is small: nothing copied.
    assert!(fs::metadata(&overlay).unwrap().len() < 1 << 20);

    let base = fs::metadata(&tpl.base).unwrap().len();
    match t.create_overlay(&tpl, &dir.path().join("small.qcow2"), base - 512) {
        Err(TemplateError::OverlayTooSmall { .. }) => {}
        other => panic!("expected OverlayTooSmall, got {other:?}"),
    }
    assert!(matches!(
        t.create_overlay(&tpl, &dir.path().join("odd.qcow2"), size + 1),
        Err(TemplateError::Invalid(_))
    ));
    // Failures leave no file behind, not even a temporary one.
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("qcow2"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn digests_and_remove() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write(&layer.join("f"), "x");
    let kernel = dir.path().join("vmlinuz");
    write(&kernel, "k");
    let t = Templates::new(&dir.path().join("data"), Some(kernel), None);
    assert!(t.digests().is_empty());
    t.ensure(D2, std::slice::from_ref(&layer)).unwrap();
    t.ensure(D1, std::slice::from_ref(&layer)).unwrap();
    assert_eq!(t.digests(), [D1, D2]);
    // An image without layers is an empty disk (the default kernel boots it).
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
    let empty = t.ensure(D3, &[]).unwrap();
    assert_eq!(names(&empty.base, "/"), ["lost+found"]);
    // Held (a VM being created): refused, and nothing is removed.
    assert!(
        matches!(t.remove(D3), Err(TemplateError::InUse { .. })),
        "remove of a held template"
    );
    assert!(empty.base.is_file());
    drop(empty);
    t.remove(D3).unwrap();
    t.remove(D1).unwrap();
    assert_eq!(t.digests(), [D2]);
    t.remove(D1).unwrap(); // nothing to remove: fine
    assert!(!t.root().join(dir_name(D1).unwrap()).exists());
}

#[test]
fn digests_are_checked_before_becoming_paths() {
    let t = Templates::new(Path::new("/nonexistent"), None, None);
    for bad in [
        "../../etc",
        "sha256:../../x",
        "sha256:",
        "SHA256:1111111111111111111111111111111111111111111111111111111111111111",
        "sha256:zz11111111111111111111111111111111111111111111111111111111111111",
        "sha256/1111111111111111111111111111111111111111111111111111111111111111",
    ] {
        assert!(
            matches!(t.ensure(bad, &[]), Err(TemplateError::Invalid(_))),
            "{bad}"
        );
        assert!(
            matches!(t.remove(bad), Err(TemplateError::Invalid(_))),
            "{bad}"
        );
    }
}

#[test]
fn measuring_counts_allocated_bytes_and_stops_at_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 TiB sparse file costs nothing (mkfs keeps holes).
    let f = File::create(dir.path().join("sparse")).unwrap();
    f.set_len(1 << 40).unwrap();
    fs::write(dir.path().join("data"), vec![7u8; 1 << 20]).unwrap();
    let u = measure(dir.path(), D1, MAX_BASE_BYTES).unwrap();
    assert_eq!(u.inodes, 2);
    assert!(u.bytes >= 1 << 20 && u.bytes < 2 << 20, "{}", u.bytes);
    match measure(dir.path(), D1, 512 << 10) {
        Err(TemplateError::TooLarge { what, .. }) => assert!(what.contains("flattened")),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn kernel_copies_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("vmlinuz");
    fs::write(&src, vec![0u8; 4096]).unwrap();
    match copy_capped(&src, &dir.path().join("out"), 1024, D1, "kernel") {
        Err(TemplateError::TooLarge { size, max, .. }) => assert_eq!((size, max), (4096, 1024)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Never through a symlink.
    symlink(&src, dir.path().join("link")).unwrap();
    assert!(copy_capped(
        &dir.path().join("link"),
        &dir.path().join("out2"),
        1 << 20,
        D1,
        "kernel"
    )
    .is_err());
}

#[test]
fn versions_compare_numerically() {
    use std::cmp::Ordering::*;
    assert_eq!(version_cmp("vmlinuz-6.1.0-10", "vmlinuz-6.1.0-9"), Greater);
    assert_eq!(version_cmp("vmlinuz-5.10.0", "vmlinuz-6.1.0"), Less);
    assert_eq!(version_cmp("vmlinuz", "vmlinuz-6.1"), Less);
}

/// Review 3: a build is used only for the layers and the operator's kernel it was made from;
/// review 4: a rebuild never reuses a path.
#[test]
fn a_changed_kernel_or_layer_list_rebuilds_in_a_new_directory() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("layers/a");
    let b = dir.path().join("layers/b");
    write(&a.join("etc/which"), "a\n");
    write(&b.join("etc/which"), "b\n");
    let kernel = dir.path().join("vmlinuz");
    write(&kernel, "kernel one");
    let t = Templates::new(&dir.path().join("data"), Some(kernel.clone()), None);
    let first = t.ensure(D1, std::slice::from_ref(&a)).unwrap();
    assert_eq!(cat(&first.base, "/etc/which"), "a\n");
    let first_base = first.base.clone();
    drop(first);

    // The operator swaps --kernel (same path, new file).
    write(&kernel, "kernel two, longer");
    let second = t.ensure(D1, std::slice::from_ref(&a)).unwrap();
    assert_eq!(
        fs::read_to_string(&second.kernel).unwrap(),
        "kernel two, longer"
    );
    assert_ne!(second.base, first_base, "a rebuild reuses no path");
    assert!(
        !first_base.exists(),
        "the stale build is removed once unused"
    );

    // Same digest, other layers: other contents.
    let third = t.ensure(D1, std::slice::from_ref(&b)).unwrap();
    assert_eq!(cat(&third.base, "/etc/which"), "b\n");
    assert_ne!(third.key, second.key);
    // `second` is still held: its build stays until it is dropped.
    assert!(second.base.is_file());
    let second_base = second.base.clone();
    drop(second);
    let again = t.ensure(D1, std::slice::from_ref(&b)).unwrap();
    assert_eq!(again, third);
    assert!(!second_base.exists());

    // A build of another format version is not used.
    let meta_path = third.base.parent().unwrap().join(META);
    let mut meta: serde_json::Value =
        serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    meta["format"] = serde_json::json!(FORMAT_VERSION - 1);
    fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    drop((third, again));
    let fourth = t.ensure(D1, std::slice::from_ref(&b)).unwrap();
    assert_ne!(fourth.base.parent(), meta_path.parent());
    assert_eq!(cat(&fourth.base, "/etc/which"), "b\n");
}

/// Review 4: a base a process has open (a running QEMU) is never removed.
#[test]
fn remove_refuses_a_base_a_process_has_open() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write(&layer.join("f"), "x");
    let kernel = dir.path().join("vmlinuz");
    write(&kernel, "k");
    let t = Templates::new(&dir.path().join("data"), Some(kernel), None);
    let tpl = t.ensure(D1, std::slice::from_ref(&layer)).unwrap();
    let base = tpl.base.clone();
    drop(tpl);
    let open = File::open(&base).unwrap();
    match t.remove(D1) {
        Err(TemplateError::InUse { why, .. }) => assert!(why.contains("open"), "{why}"),
        other => panic!("remove of an open base: {other:?}"),
    }
    assert!(base.is_file());
    drop(open);
    t.remove(D1).unwrap();
    assert!(!base.exists());
    assert!(t.digests().is_empty());
}

/// Review 5: the build holds the image store's shared lock (gc takes it exclusively).
#[test]
fn the_image_stores_lock_is_taken_for_store_layers() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("images");
    let layer = store.join("layers/sha256-aa");
    fs::create_dir_all(&layer).unwrap();
    fs::write(store.join("lock"), "").unwrap();
    let held = image_store_lock(std::slice::from_ref(&layer)).unwrap();
    assert!(held.is_some());
    let gc = File::options()
        .write(true)
        .open(store.join("lock"))
        .unwrap();
    assert!(
        Flock::lock(gc, FlockArg::LockExclusiveNonblock).is_err(),
        "gc's exclusive lock must wait for the build"
    );
    drop(held);
    let gc = File::options()
        .write(true)
        .open(store.join("lock"))
        .unwrap();
    assert!(Flock::lock(gc, FlockArg::LockExclusiveNonblock).is_ok());
    // Layers outside an image store: no lock to take.
    assert!(image_store_lock(&[dir.path().join("x")]).unwrap().is_none());
}

/// Review 6 and 12: the walk stops at the inode cap and at the nesting cap (it keeps one open
/// directory per level, never a list of every directory).
#[test]
fn measuring_stops_at_the_inode_and_depth_caps() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide");
    for i in 0..50 {
        fs::create_dir_all(wide.join(format!("d{i}"))).unwrap();
    }
    assert_eq!(measure_capped(&wide, D1, u64::MAX, 50).unwrap().inodes, 50);
    match measure_capped(&wide, D1, u64::MAX, 49) {
        Err(TemplateError::TooLarge { what, .. }) => assert_eq!(what, "the number of files"),
        other => panic!("inode cap: {other:?}"),
    }
    let deep = dir.path().join("deep");
    let mut p = deep.clone();
    for _ in 0..MAX_DEPTH {
        p.push("d");
    }
    fs::create_dir_all(&p).unwrap();
    assert!(measure(&deep, D1, u64::MAX).is_ok());
    fs::create_dir(p.join("d")).unwrap();
    match measure(&deep, D1, u64::MAX) {
        Err(TemplateError::TooLarge { what, .. }) => assert_eq!(what, "the directory nesting"),
        other => panic!("depth cap: {other:?}"),
    }
}

/// Review 6: mkfs is killed at its deadline (and its log removed).
#[test]
fn mkfs_past_its_deadline_is_killed() {
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        crate::testfx::prerequisite_missing("mkfs.ext4 (scripts/install-deps)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let log = dir.path().join("mkfs.log");
    let args: Vec<&std::ffi::OsStr> = vec!["-q".as_ref(), "-F".as_ref(), img.as_os_str()];
    match run_mkfs(&args, &log, std::time::Duration::ZERO) {
        Err(TemplateError::Cmd(CmdError::Failed { status, .. })) => {
            assert!(status.contains("killed"), "{status}")
        }
        other => panic!("mkfs with no time left: {other:?}"),
    }
    assert!(!log.exists());
    run_mkfs(&args, &log, std::time::Duration::from_secs(600)).unwrap();
    assert!(!log.exists());
}

/// Review 12: the layers are mounted read-only, nosuid and nodev while mkfs reads them.
#[test]
fn the_build_mount_is_read_only_nosuid_nodev() {
    if !prereqs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let mnt = dir.path().join("mnt");
    for d in [&a, &b, &mnt] {
        fs::create_dir_all(d).unwrap();
    }
    mount_layers(&[a.display().to_string(), b.display().to_string()], &mnt).unwrap();
    let st = nix::sys::statvfs::statvfs(&mnt);
    nix::mount::umount2(&mnt, MntFlags::empty()).unwrap();
    let flags = st.unwrap().flags();
    use nix::sys::statvfs::FsFlags;
    for f in [FsFlags::ST_RDONLY, FsFlags::ST_NOSUID, FsFlags::ST_NODEV] {
        assert!(flags.contains(f), "{f:?} missing from {flags:?}");
    }
}
