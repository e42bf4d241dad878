//! Fixture host trees for the host-preparation tests (`hostcheck`, `vfio`, `mig`): a temporary
//! directory laid out like `/` with the sysfs, procfs and `/dev` entries those modules read.
//!
//! Built in code rather than checked in, because sysfs is made of symlinks (`driver`,
//! `iommu_group`, `/sys/bus/pci/devices/*`) that are awkward to keep in git, and because each
//! test wants a small variation of the same host. The presets are the hosts the issue names: clean
//! IOMMU groups, a GPU sharing its group with a SATA controller, IOMMU off, SR-IOV, MIG.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::HostRoot;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

pub(crate) const GPU: &str = "0000:3b:00.0";
pub(crate) const GPU_AUDIO: &str = "0000:3b:00.1";
pub(crate) const SATA: &str = "0000:3a:00.0";
pub(crate) const DRIVER_VERSION: &str = "550.54.15";

/// One PCI function as the kernel lays it out.
pub(crate) struct Pci<'a> {
    pub addr: &'a str,
    pub vendor: &'a str,
    pub device: &'a str,
    pub class: &'a str,
    pub driver: Option<&'a str>,
    pub group: Option<u32>,
}

pub(crate) struct Fx {
    pub dir: tempfile::TempDir,
}

impl Fx {
    pub fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
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
        let real = self.real_dir(addr);
        let _ = fs::remove_file(real.join("driver"));
        if let Some(d) = driver {
            let ddir = self.path(&format!("/sys/bus/pci/drivers/{d}"));
            fs::create_dir_all(&ddir).unwrap();
            for f in ["bind", "unbind"] {
                if !ddir.join(f).exists() {
                    fs::write(ddir.join(f), "").unwrap();
                }
            }
            symlink(format!("../../../bus/pci/drivers/{d}"), real.join("driver")).unwrap();
        }
    }

    pub fn real_dir(&self, addr: &str) -> PathBuf {
        self.path(&format!("/sys/devices/pci0000:00/{addr}"))
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
        let bus = self.path("/sys/bus/pci/devices");
        fs::create_dir_all(&bus).unwrap();
        let _ = fs::remove_file(bus.join(addr));
        symlink(
            format!("../../../devices/pci0000:00/{addr}"),
            bus.join(addr),
        )
        .unwrap();
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
