//! Fixture host trees for the host-preparation tests (`hostcheck`, `vfio`, `mig`): a temporary
//! directory laid out like `/` with the sysfs, procfs and `/dev` entries those modules read.
//!
//! Built in code rather than checked in, because sysfs is made of symlinks (`driver`,
//! `iommu_group`, `/sys/bus/pci/devices/*`) that are awkward to keep in git, and because each
//! test wants a small variation of the same host. The presets are the hosts the issue names: clean
//! IOMMU groups, a GPU sharing its group with a SATA controller, IOMMU off, SR-IOV, MIG.
//!
//! Other crates' tests (the engine's `bind_vfio`/`release_gpu`) get this module through the
//! `testfx` feature. They write sysfs with the real writer, so [`FifoKernel`] plays the kernel
//! behind the fixture's attributes. The module needs no dev-dependency for that reason:
//! [`FxDir`] stands in for `tempfile`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::HostRoot;
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const GPU: &str = "0000:3b:00.0";
pub const GPU_AUDIO: &str = "0000:3b:00.1";
pub const SATA: &str = "0000:3a:00.0";
pub const DRIVER_VERSION: &str = "550.54.15";

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

/// What a FIFO of the [`FifoKernel`] stands for.
#[derive(Debug, Clone)]
enum Attr {
    /// `devices/<addr>/driver_override`.
    Override(String),
    /// `drivers/<driver>/bind`.
    Bind(String),
    /// `drivers/<driver>/unbind`.
    Unbind(String),
    /// `drivers_probe`.
    Probe,
    /// `rescan`.
    Rescan,
}

struct Fifo {
    attr: Attr,
    /// The path a caller writes (`/sys/bus/pci/devices/<addr>/driver_override`), for the log.
    host: String,
    /// The FIFO itself, canonical (as `/proc/self/fd` shows it).
    path: PathBuf,
    /// Held open read-write and non-blocking: callers' opens never block, and the pipe is kept
    /// full so their writes do.
    end: fs::File,
}

#[derive(Default)]
struct KernelState {
    writes: Vec<(String, String)>,
    overrides: HashMap<String, String>,
    problems: Vec<String>,
    cycles: u64,
}

struct Shared {
    state: Mutex<KernelState>,
    cycled: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, KernelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The kernel behind a fixture's sysfs attributes, for code that writes them with the real
/// writer (`vfio::FsWriter`, as the engine does), where a recording `SysWriter` cannot be
/// passed in.
///
/// [`FifoKernel::install`] turns every attribute that binding writes (`driver_override` of
/// each device, `bind`/`unbind` of each driver, `drivers_probe`, `rescan`) into a FIFO, and
/// one thread serves them all, in order, applying what the kernel would: the override is
/// stored; `unbind` drops the driver link when the device is bound to that driver; `bind`
/// binds an unbound device; `drivers_probe` binds an unbound device to its override, else to
/// the driver the fixture had bound it to (its default); `rescan` puts vanished devices back
/// on the bus. Every write is logged as (path written, data).
///
/// How a write is made synchronous without hooking the writer: each pipe is kept full, so a
/// caller's `write` blocks; the thread notices the caller's descriptor in `/proc/self/fd`,
/// applies everything before it, drains the pipe (the write lands and returns), refills it,
/// then applies the write. So a caller's next write (to any attribute) finds the previous one
/// applied. The last write of a call is applied just after the call returns: [`Self::settle`]
/// waits for it (the accessors settle first). Linux only; build the fixture before installing
/// (writing an attribute through [`Fx`] afterwards would block).
pub struct FifoKernel {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    // Dropped after the thread stops (see `Drop`), which removes the FIFOs.
    fx: Fx,
}

/// A caller blocked this long on one write means the kernel thread lost track of it.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

impl FifoKernel {
    pub fn install(fx: Fx) -> Self {
        let root = HostRoot::at(fs::canonicalize(fx.dir_path()).unwrap());
        let mut fifos = Vec::new();
        let mut defaults: HashMap<String, Option<String>> = HashMap::new();
        let mut overrides = HashMap::new();
        let devices = root.path("/sys/devices/pci0000:00");
        for e in fs::read_dir(&devices).into_iter().flatten().flatten() {
            let addr = e.file_name().to_string_lossy().into_owned();
            defaults.insert(addr.clone(), link_name(&e.path().join("driver")));
            let ov = e.path().join("driver_override");
            if let Ok(v) = fs::read_to_string(&ov) {
                let v = v.trim();
                if !v.is_empty() && v != "(null)" {
                    overrides.insert(addr.clone(), v.to_string());
                }
            }
            fifos.push(make_fifo(
                &ov,
                Attr::Override(addr.clone()),
                format!("/sys/bus/pci/devices/{addr}/driver_override"),
            ));
        }
        for e in fs::read_dir(root.path("/sys/bus/pci/drivers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let d = e.file_name().to_string_lossy().into_owned();
            fifos.push(make_fifo(
                &e.path().join("bind"),
                Attr::Bind(d.clone()),
                format!("/sys/bus/pci/drivers/{d}/bind"),
            ));
            fifos.push(make_fifo(
                &e.path().join("unbind"),
                Attr::Unbind(d.clone()),
                format!("/sys/bus/pci/drivers/{d}/unbind"),
            ));
        }
        for (f, attr) in [("drivers_probe", Attr::Probe), ("rescan", Attr::Rescan)] {
            let host = format!("/sys/bus/pci/{f}");
            fifos.push(make_fifo(&root.path(&host), attr, host));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(KernelState {
                overrides,
                ..Default::default()
            }),
            cycled: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut kernel = Served {
            root,
            fifos,
            defaults,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("fixture-kernel".into())
            .spawn(move || kernel.run())
            .unwrap();
        Self {
            shared,
            thread: Some(thread),
            fx,
        }
    }

    pub fn fx(&self) -> &Fx {
        &self.fx
    }

    pub fn root(&self) -> HostRoot {
        self.fx.root()
    }

    /// Waits until every write made so far has been applied; panics if one was lost.
    pub fn settle(&self) {
        let s = self.shared.state();
        let target = s.cycles + 2;
        let (s, wait) = self
            .shared
            .cycled
            .wait_timeout_while(s, WRITE_DEADLINE, |s| s.cycles < target)
            .unwrap_or_else(|p| p.into_inner());
        assert!(!wait.timed_out(), "the fixture kernel thread is stuck");
        assert!(s.problems.is_empty(), "fixture kernel: {:?}", s.problems);
    }

    /// The writes so far, in order: (path written, data).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.settle();
        self.shared.state().writes.clone()
    }

    /// The writes so far, forgetting them.
    pub fn take_writes(&self) -> Vec<(String, String)> {
        self.settle();
        std::mem::take(&mut self.shared.state().writes)
    }

    /// The device's `driver_override` as the kernel holds it (`None`: not set).
    pub fn driver_override(&self, addr: &str) -> Option<String> {
        self.settle();
        self.shared.state().overrides.get(addr).cloned()
    }

    /// The driver the device is bound to now.
    pub fn driver(&self, addr: &str) -> Option<String> {
        self.settle();
        link_name(&self.fx.real_dir(addr).join("driver"))
    }
}

impl Drop for FifoKernel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn link_name(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn make_fifo(path: &Path, attr: Attr, host: String) -> Fifo {
    let _ = fs::remove_file(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
    // Linux opens a FIFO read-write without waiting for a partner.
    let mut end = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap();
    fill(&mut end);
    Fifo {
        attr,
        host,
        path: path.to_path_buf(),
        end,
    }
}

/// Fills the pipe with NUL bytes (never part of a sysfs write) until a write would block.
fn fill(end: &mut fs::File) {
    let page = [0u8; 4096];
    for chunk in [&page[..], &page[..1]] {
        while end.write(chunk).is_ok_and(|n| n > 0) {}
    }
}

/// Empties the pipe; returns what callers wrote (everything but the NUL filler).
fn drain(end: &mut fs::File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    while let Ok(n @ 1..) = end.read(&mut buf) {
        out.extend(buf[..n].iter().copied().filter(|&b| b != 0));
    }
    out
}

/// The kernel thread's side of a [`FifoKernel`].
struct Served {
    root: HostRoot,
    fifos: Vec<Fifo>,
    defaults: HashMap<String, Option<String>>,
    shared: Arc<Shared>,
}

impl Served {
    fn run(&mut self) {
        let mut last_busy = Instant::now();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let busy = self.callers();
            for &i in &busy {
                self.serve(i);
            }
            self.shared.state().cycles += 1;
            self.shared.cycled.notify_all();
            if busy.is_empty() {
                // Writes come in bursts (one bind is six); poll fast just after one.
                let idle = if last_busy.elapsed() < Duration::from_millis(50) {
                    Duration::from_micros(100)
                } else {
                    Duration::from_millis(2)
                };
                std::thread::sleep(idle);
            } else {
                last_busy = Instant::now();
            }
        }
    }

    /// The FIFOs some descriptor other than ours has open: callers about to write, or blocked
    /// writing.
    fn callers(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let Ok(dir) = fs::read_dir("/proc/self/fd") else {
            return out;
        };
        for e in dir.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if self.fifos.iter().any(|f| f.end.as_raw_fd() == fd) {
                continue;
            }
            let Ok(target) = fs::read_link(e.path()) else {
                continue;
            };
            if let Some(i) = self.fifos.iter().position(|f| f.path == target) {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Lets one caller's write through and applies it. A descriptor whose write was already
    /// served (the caller has not closed it yet) writes nothing more: stop when it is gone.
    fn serve(&mut self, i: usize) {
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut data = drain(&mut self.fifos[i].end);
        while data.is_empty() {
            if !self.callers().contains(&i) {
                data = drain(&mut self.fifos[i].end);
                break;
            }
            if Instant::now() > deadline {
                let host = self.fifos[i].host.clone();
                self.shared
                    .state()
                    .problems
                    .push(format!("a writer of {host} never wrote"));
                break;
            }
            std::thread::sleep(Duration::from_micros(20));
            data = drain(&mut self.fifos[i].end);
        }
        fill(&mut self.fifos[i].end);
        if !data.is_empty() {
            self.apply(i, &String::from_utf8_lossy(&data));
        }
    }

    fn driver_of(&self, addr: &str) -> Option<String> {
        link_name(&real_dir_in(&self.root, addr).join("driver"))
    }

    fn has_driver(&self, d: &str) -> bool {
        self.root.path(format!("/sys/bus/pci/drivers/{d}")).is_dir()
    }

    fn known(&self, addr: &str) -> bool {
        real_dir_in(&self.root, addr).is_dir()
    }

    fn apply(&self, i: usize, data: &str) {
        let (attr, host) = (self.fifos[i].attr.clone(), self.fifos[i].host.clone());
        let arg = data.trim_end_matches('\n').trim().to_string();
        let mut s = self.shared.state();
        s.writes.push((host, data.to_string()));
        match attr {
            Attr::Override(addr) => {
                if arg.is_empty() {
                    s.overrides.remove(&addr);
                } else {
                    s.overrides.insert(addr, arg);
                }
            }
            Attr::Unbind(d) => {
                if self.driver_of(&arg).as_deref() == Some(d.as_str()) {
                    set_driver_in(&self.root, &arg, None);
                }
            }
            Attr::Bind(d) => {
                if self.known(&arg) && self.driver_of(&arg).is_none() {
                    set_driver_in(&self.root, &arg, Some(&d));
                }
            }
            Attr::Probe => {
                if self.known(&arg) && self.driver_of(&arg).is_none() {
                    // An override names the only driver the device may take.
                    let want = match s.overrides.get(&arg) {
                        Some(o) => Some(o.clone()),
                        None => self.defaults.get(&arg).cloned().flatten(),
                    };
                    if let Some(d) = want.filter(|d| self.has_driver(d)) {
                        set_driver_in(&self.root, &arg, Some(&d));
                    }
                }
            }
            Attr::Rescan => {
                let addrs: Vec<String> = self.defaults.keys().cloned().collect();
                for a in addrs {
                    let bus = self.root.path(format!("/sys/bus/pci/devices/{a}"));
                    if self.known(&a) && fs::symlink_metadata(&bus).is_err() {
                        link_bus_in(&self.root, &a);
                    }
                }
            }
        }
    }
}
