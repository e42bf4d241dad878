//! Fixture host trees for the host-preparation tests (`hostcheck`, `vfio`, `mig`): a temporary
//! directory laid out like `/` with the sysfs, procfs and `/dev` entries those modules read.
//!
//! Built in code rather than checked in, because sysfs is made of symlinks (`driver`,
//! `iommu_group`, `/sys/bus/pci/devices/*`) that are awkward to keep in git, and because each
//! test wants a small variation of the same host. The presets are the hosts the issue names: clean
//! IOMMU groups, a GPU sharing its group with a SATA controller, IOMMU off, SR-IOV, MIG.
//!
//! Other crates' tests (the engine's `bind_vfio`/`release_gpu`) get this module through the
//! `testfx` feature, so it needs no dev-dependency: [`FxDir`] stands in for `tempfile`. Writes to
//! the fixture's sysfs go through [`Kernel`], the one kernel double: the `vfio` tests pass it to
//! `bind_vfio_with`/`release_with`, the engine's tests install it in the node with
//! `Node::with_sys_writer`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::vfio::SysWriter;
use crate::HostRoot;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub const GPU: &str = "0000:3b:00.0";
pub const GPU_AUDIO: &str = "0000:3b:00.1";
pub const SATA: &str = "0000:3a:00.0";
pub const DRIVER_VERSION: &str = "550.54.15";

/// Where skipped tests are recorded, one line each (`.ci/run` prints them): a passing test's
/// output is captured by the harness, so a skip must leave a trace somewhere else.
pub fn skip_log() -> PathBuf {
    std::env::var_os("GPUVISOR_SKIP_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("gpuvisor-test-skips.log"))
}

/// The rule for a test whose prerequisite is missing: under CI (`CI=true`) the test fails;
/// elsewhere it prints and records a skip (see [`skip_log`]) and the caller returns.
pub fn prerequisite_missing(what: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "missing prerequisite under CI=true: {what}");
    record_skip(what);
}

/// GPU tests run only where asked (`GPUVISOR_GPU_TESTS=1`, on a GPU machine); elsewhere this
/// records a skip (never a failure: CI has no GPU) and returns false.
pub fn gpu_tests_enabled() -> bool {
    if std::env::var_os("GPUVISOR_GPU_TESTS").is_some() {
        return true;
    }
    record_skip("needs a GPU (GPUVISOR_GPU_TESTS=1)");
    false
}

fn record_skip(what: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    let line = format!("SKIP {test}: {what}\n");
    eprint!("{line}");
    let _ = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_log())
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
}

/// One PCI function as the kernel lays it out.
pub struct Pci<'a> {
    pub addr: &'a str,
    pub vendor: &'a str,
    pub device: &'a str,
    pub class: &'a str,
    pub driver: Option<&'a str>,
    pub group: Option<u32>,
}

/// A temporary directory, removed (without following symlinks) on drop.
pub struct FxDir {
    path: PathBuf,
}

impl FxDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("gpuvisor-fx-{}-{n}-{nanos}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
                    return Self { path };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create a fixture directory {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FxDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

pub struct Fx {
    pub dir: FxDir,
}

impl Fx {
    pub fn empty() -> Self {
        Self { dir: FxDir::new() }
    }

    pub fn root(&self) -> HostRoot {
        HostRoot::at(self.dir.path())
    }

    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root().path(host_path)
    }

    /// Writes a file (creating its parents).
    pub fn file(&self, host_path: &str, contents: &str) {
        let p = self.path(host_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, contents).unwrap();
    }

    pub fn mkdir(&self, host_path: &str) {
        fs::create_dir_all(self.path(host_path)).unwrap();
    }

    pub fn remove(&self, host_path: &str) {
        let p = self.path(host_path);
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(p).unwrap();
        } else {
            let _ = fs::remove_file(p);
        }
    }

    pub fn chmod(&self, host_path: &str, mode: u32) {
        fs::set_permissions(self.path(host_path), fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A running process with this `comm`.
    pub fn process(&self, pid: u32, comm: &str) {
        self.file(&format!("/proc/{pid}/comm"), &format!("{comm}\n"));
    }

    /// Points `devices/<addr>/driver` at `drivers/<driver>` (or removes it).
    pub fn set_driver(&self, addr: &str, driver: Option<&str>) {
        set_driver_in(&self.root(), addr, driver);
    }

    pub fn real_dir(&self, addr: &str) -> PathBuf {
        real_dir_in(&self.root(), addr)
    }

    /// Adds a PCI function: real directory under `/sys/devices`, the bus symlink, `driver` and
    /// `iommu_group` links, and the group's `devices/` entry.
    pub fn pci(&self, f: &Pci<'_>) {
        let real = self.real_dir(f.addr);
        fs::create_dir_all(&real).unwrap();
        for (name, value) in [
            ("vendor", f.vendor),
            ("device", f.device),
            ("class", f.class),
            ("numa_node", "0"),
            ("driver_override", "(null)"),
        ] {
            fs::write(real.join(name), format!("{value}\n")).unwrap();
        }
        self.set_driver(f.addr, f.driver);
        if let Some(g) = f.group {
            let gdir = self.path(&format!("/sys/kernel/iommu_groups/{g}/devices"));
            fs::create_dir_all(&gdir).unwrap();
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                real.join("iommu_group"),
            )
            .unwrap();
            symlink(
                format!("../../../../devices/pci0000:00/{}", f.addr),
                gdir.join(f.addr),
            )
            .unwrap();
        }
        self.link_bus(f.addr);
        for f in ["drivers_probe", "rescan"] {
            let p = self.path(&format!("/sys/bus/pci/{f}"));
            if !p.exists() {
                fs::write(p, "").unwrap();
            }
        }
    }

    pub fn link_bus(&self, addr: &str) {
        link_bus_in(&self.root(), addr);
    }

    /// The GPU's BARs in the kernel's `resource` format: 16 MiB BAR0, 128 GiB 64-bit prefetchable
    /// BAR1 at `bar1_start`, 32 MiB BAR3.
    pub fn bars(&self, addr: &str, bar1_start: u64, bar1_size: u64) {
        let line = |start: u64, size: u64, flags: u64| {
            if size == 0 {
                "0x0000000000000000 0x0000000000000000 0x0000000000000000\n".to_string()
            } else {
                format!(
                    "0x{start:016x} 0x{:016x} 0x{flags:016x}\n",
                    start + size - 1
                )
            }
        };
        let mut text = String::new();
        text += &line(0x9a00_0000, 16 << 20, 0x0004_0200);
        text += &line(bar1_start, bar1_size, 0x0014_220c);
        text += &line(0, 0, 0);
        text += &line(bar1_start + bar1_size, 32 << 20, 0x0014_220c);
        text += &line(0, 0, 0);
        text += &line(0, 0, 0);
        text += &line(0x9b00_0000, 512 << 10, 0x0004_6200);
        fs::write(self.real_dir(addr).join("resource"), text).unwrap();
    }

    /// A host with clean IOMMU groups: kernel 6.1, Intel IOMMU on, one H100 (with its audio
    /// function) alone in group 17, vfio-pci loaded, matching driver 550.54.15, persistenced,
    /// AppArmor, cgroup v2, `/dev/kvm`, device nodes 0660.
    pub fn clean() -> Self {
        let fx = Self::empty();
        fx.file("/proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
        fx.file(
            "/proc/cmdline",
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on iommu=pt\n",
        );
        fx.mkdir("/sys/class/iommu/dmar0");
        fx.pci(&Pci {
            addr: GPU,
            vendor: "0x10de",
            device: "0x2330",
            class: "0x030200",
            driver: Some("nvidia"),
            group: Some(17),
        });
        fx.pci(&Pci {
            addr: GPU_AUDIO,
            vendor: "0x10de",
            device: "0x22a3",
            class: "0x040300",
            driver: Some("snd_hda_intel"),
            group: Some(17),
        });
        fx.bars(GPU, 0x38_0000_0000, 128 << 30);
        fx.mkdir("/sys/bus/pci/drivers/vfio-pci");
        for f in ["bind", "unbind"] {
            fx.file(&format!("/sys/bus/pci/drivers/vfio-pci/{f}"), "");
        }
        fx.mkdir("/sys/module/vfio_pci");
        fx.file(
            "/proc/driver/nvidia/version",
            &format!(
                "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {DRIVER_VERSION}  Tue Mar  5 22:14:41 UTC 2024\n\
                 GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
            ),
        );
        fx.file("/sys/module/nvidia/version", &format!("{DRIVER_VERSION}\n"));
        fx.file(
            &format!("/proc/driver/nvidia/gpus/{GPU}/information"),
            "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-11111111-2222-3333-4444-555555555555\n\
             Device Minor: \t 0\n",
        );
        fx.file(
            &format!("/usr/lib/x86_64-linux-gnu/libcuda.so.{DRIVER_VERSION}"),
            "elf",
        );
        fx.process(1, "systemd");
        fx.process(812, "nvidia-persistenced");
        fx.file("/sys/module/apparmor/parameters/enabled", "Y\n");
        fx.file(
            "/proc/self/mountinfo",
            "25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
             30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n",
        );
        for (dev, mode) in [
            ("/dev/nvidia0", 0o660),
            ("/dev/nvidiactl", 0o660),
            ("/dev/kvm", 0o660),
            ("/dev/vfio/vfio", 0o666),
        ] {
            fx.file(dev, "");
            fx.chmod(dev, mode);
        }
        fx
    }

    /// [`Fx::clean`] with a SATA controller (driver `ahci`) in the GPU's IOMMU group.
    pub fn shared_group() -> Self {
        let fx = Self::clean();
        fx.pci(&Pci {
            addr: SATA,
            vendor: "0x8086",
            device: "0xa182",
            class: "0x010601",
            driver: Some("ahci"),
            group: Some(17),
        });
        fx
    }

    /// [`Fx::clean`] without an IOMMU: no command-line flag, no DMAR unit, no groups.
    pub fn iommu_off() -> Self {
        let fx = Self::clean();
        fx.file(
            "/proc/cmdline",
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n",
        );
        fx.remove("/sys/class/iommu/dmar0");
        fx.remove("/sys/kernel/iommu_groups");
        for a in [GPU, GPU_AUDIO] {
            fs::remove_file(fx.real_dir(a).join("iommu_group")).unwrap();
        }
        fx
    }

    /// [`Fx::clean`] whose GPU has SR-IOV (16 VFs possible, 4 enabled).
    pub fn sriov() -> Self {
        let fx = Self::clean();
        fs::write(fx.real_dir(GPU).join("sriov_totalvfs"), "16\n").unwrap();
        fs::write(fx.real_dir(GPU).join("sriov_numvfs"), "4\n").unwrap();
        fx
    }

    /// [`Fx::clean`] whose GPU is in MIG mode with two GPU instances.
    pub fn mig() -> Self {
        let fx = Self::clean();
        for gi in ["gi1/access", "gi2/access", "config", "monitor"] {
            fx.file(
                &format!("/proc/driver/nvidia/capabilities/gpu0/mig/{gi}"),
                "",
            );
        }
        fx
    }

    pub fn dir_path(&self) -> &Path {
        self.dir.path()
    }
}

fn real_dir_in(root: &HostRoot, addr: &str) -> PathBuf {
    root.path(format!("/sys/devices/pci0000:00/{addr}"))
}

fn set_driver_in(root: &HostRoot, addr: &str, driver: Option<&str>) {
    let real = real_dir_in(root, addr);
    let _ = fs::remove_file(real.join("driver"));
    if let Some(d) = driver {
        let ddir = root.path(format!("/sys/bus/pci/drivers/{d}"));
        fs::create_dir_all(&ddir).unwrap();
        for f in ["bind", "unbind"] {
            if !ddir.join(f).exists() {
                fs::write(ddir.join(f), "").unwrap();
            }
        }
        symlink(format!("../../../bus/pci/drivers/{d}"), real.join("driver")).unwrap();
    }
}

fn link_bus_in(root: &HostRoot, addr: &str) {
    let bus = root.path("/sys/bus/pci/devices");
    fs::create_dir_all(&bus).unwrap();
    let _ = fs::remove_file(bus.join(addr));
    symlink(
        format!("../../../devices/pci0000:00/{addr}"),
        bus.join(addr),
    )
    .unwrap();
}

/// The kernel behind a fixture's sysfs: a [`SysWriter`] that logs every write (host path, data)
/// and applies it to the fixture tree as the kernel would. `Send + Sync`, so the engine's tests
/// install it in the node (`Node::with_sys_writer(Arc::new(kernel))`, keeping a clone of the
/// `Arc` to read the log) and the node's blocking tasks write through it.
///
/// What each attribute does:
/// - `devices/<a>/driver_override`: stored in the file as sysfs shows it (`vfio-pci`; an empty
///   write clears it to `(null)`).
/// - `drivers/<d>/unbind`: drops the device's driver link when it is bound to `<d>`.
/// - `drivers/<d>/bind`: binds an unbound device to `<d>`.
/// - `drivers_probe`: binds an unbound device to its override, else to its default driver (by
///   class, as the kernel matches IDs: NVIDIA GPUs `nvidia`, HD audio `snd_hda_intel`, SATA
///   `ahci`); a driver that is not loaded (no `drivers/<d>`) binds nothing.
/// - `rescan`: puts back on the bus every device that vanished from it.
/// - anything else: the data is stored in the file.
///
/// Like sysfs, a write to a missing attribute fails (`ENOENT`) and nothing is ever created.
/// Failed writes are not logged. Writes are applied one at a time, before `write` returns.
pub struct Kernel {
    root: HostRoot,
    log: Mutex<Vec<(String, String)>>,
    vanish_on_unbind: bool,
    ignore_override: bool,
    fail_on: Option<String>,
    /// Time each write takes after it is logged (a slow driver unbind), to open race windows.
    delay: std::time::Duration,
}

impl Kernel {
    /// The kernel of the fixture at `root` (`Fx::root`).
    pub fn new(root: HostRoot) -> Self {
        Self {
            root,
            log: Mutex::new(Vec::new()),
            vanish_on_unbind: false,
            ignore_override: false,
            fail_on: None,
            delay: std::time::Duration::ZERO,
        }
    }

    /// Every write takes `delay` after it is logged (real unbinds take hundreds of ms), so a
    /// test can act while an operation is half done.
    #[must_use]
    pub fn slow_writes(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    /// A device unbound from its driver also falls off the bus (a GPU that dropped out), until
    /// a `rescan`.
    #[must_use]
    pub fn vanish_on_unbind(mut self) -> Self {
        self.vanish_on_unbind = true;
        self
    }

    /// `drivers_probe` ignores `driver_override` and binds the default driver (a kernel where
    /// binding to vfio-pci does not take).
    #[must_use]
    pub fn ignoring_override(mut self) -> Self {
        self.ignore_override = true;
        self
    }

    /// Writes to a path ending with `suffix` fail with `EBUSY` (and are not applied or logged).
    #[must_use]
    pub fn fail_on(mut self, suffix: &str) -> Self {
        self.fail_on = Some(suffix.to_string());
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writes so far, in order: (host path written, data).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.lock().clone()
    }

    /// The writes so far, forgetting them.
    pub fn take_writes(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.lock())
    }

    /// The device's `driver_override` (`None`: not set).
    pub fn driver_override(&self, addr: &str) -> Option<String> {
        let v = fs::read_to_string(real_dir_in(&self.root, addr).join("driver_override")).ok()?;
        let v = v.trim();
        (!v.is_empty() && v != "(null)").then(|| v.to_string())
    }

    /// The driver the device is bound to now.
    pub fn driver(&self, addr: &str) -> Option<String> {
        link_name(&real_dir_in(&self.root, addr).join("driver"))
    }

    fn known(&self, addr: &str) -> bool {
        !addr.is_empty() && !addr.contains('/') && real_dir_in(&self.root, addr).is_dir()
    }

    fn loaded(&self, driver: &str) -> bool {
        self.root
            .path(format!("/sys/bus/pci/drivers/{driver}"))
            .is_dir()
    }

    /// The driver the kernel would pick for the device without an override.
    fn default_driver(&self, addr: &str) -> Option<&'static str> {
        let read = |f: &str| {
            fs::read_to_string(real_dir_in(&self.root, addr).join(f))
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        };
        let (vendor, class) = (read("vendor"), read("class"));
        if class.starts_with("0x03") && vendor == "0x10de" {
            Some("nvidia")
        } else if class.starts_with("0x0403") {
            Some("snd_hda_intel")
        } else if class.starts_with("0x0106") {
            Some("ahci")
        } else {
            None
        }
    }

    fn apply(&self, host: &str, path: &Path, data: &str) -> std::io::Result<()> {
        let arg = data.trim();
        let attr = host.strip_prefix("/sys/bus/pci/");
        if let Some(rest) = attr.and_then(|r| r.strip_prefix("devices/")) {
            if rest.ends_with("/driver_override") {
                let v = if arg.is_empty() { "(null)" } else { arg };
                return fs::write(path, format!("{v}\n"));
            }
        }
        if let Some(rest) = attr.and_then(|r| r.strip_prefix("drivers/")) {
            if let Some(d) = rest.strip_suffix("/unbind") {
                if self.known(arg) && self.driver(arg).as_deref() == Some(d) {
                    set_driver_in(&self.root, arg, None);
                    if self.vanish_on_unbind {
                        fs::remove_file(self.root.path(format!("/sys/bus/pci/devices/{arg}")))?;
                    }
                }
                return Ok(());
            }
            if let Some(d) = rest.strip_suffix("/bind") {
                if self.known(arg) && self.driver(arg).is_none() {
                    set_driver_in(&self.root, arg, Some(d));
                }
                return Ok(());
            }
        }
        match attr {
            Some("drivers_probe") => {
                if self.known(arg) && self.driver(arg).is_none() {
                    let want = match self.driver_override(arg) {
                        Some(o) if !self.ignore_override => Some(o),
                        _ => self.default_driver(arg).map(str::to_string),
                    };
                    if let Some(d) = want.filter(|d| self.loaded(d)) {
                        set_driver_in(&self.root, arg, Some(&d));
                    }
                }
                Ok(())
            }
            Some("rescan") => {
                let devices = self.root.path("/sys/devices/pci0000:00");
                for e in fs::read_dir(devices)?.flatten() {
                    let a = e.file_name().to_string_lossy().into_owned();
                    let bus = self.root.path(format!("/sys/bus/pci/devices/{a}"));
                    if fs::symlink_metadata(&bus).is_err() {
                        link_bus_in(&self.root, &a);
                    }
                }
                Ok(())
            }
            _ => fs::write(path, data),
        }
    }
}

impl SysWriter for Kernel {
    fn write(&self, path: &Path, data: &str) -> std::io::Result<()> {
        // Held throughout: the kernel applies one write at a time.
        let mut log = self.lock();
        let rel = path.strip_prefix(self.root.path("/")).map_err(|_| {
            std::io::Error::other(format!("{} is outside the fixture", path.display()))
        })?;
        let host = format!("/{}", rel.display());
        if self.fail_on.as_deref().is_some_and(|f| host.ends_with(f)) {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        // Like sysfs: attributes exist or the open fails; none is created.
        if !path.exists() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        log.push((host.clone(), data.to_string()));
        let applied = self.apply(&host, path, data);
        drop(log);
        std::thread::sleep(self.delay);
        applied
    }
}

fn link_name(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}
