//! Kernel samepage merging (`/sys/kernel/mm/ksm`): identical pages of the VMs' RAM are kept
//! once. QEMU marks guest RAM mergeable (`-machine mem-merge=on`); the daemon turns KSM on
//! while VMs run, scans faster the more of them run, and turns it off when none does (the
//! pages it merged stay merged until written). Zero-filled pages are merged too, into the
//! kernel's zero page (`use_zero_pages`): a guest's RAM that its kernel zeroed and never used
//! again (freed memory, cleared buffers) is most of an idle VM's touched memory, and each
//! such page costs one `pages_sharing` chain otherwise. Its counters go to `/metrics`.
//!
//! Key decision: the daemon only manages KSM where it owns it (`[vm] manage_ksm`, default
//! on): an operator who runs KSM for other work turns management off and tunes it alone.

use crate::HostRoot;
use std::path::PathBuf;
use std::sync::Mutex;

/// Pages scanned per wake-up for each running VM, and the bounds: a few VMs merge within
/// minutes without a busy host spending more than a few percent of a core on scanning.
const PAGES_PER_VM: u64 = 256;
const MIN_PAGES: u64 = 256;
const MAX_PAGES: u64 = 4096;
/// Milliseconds between wake-ups.
const SLEEP_MS: u64 = 20;

/// KSM's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KsmStats {
    /// Whether it runs (`run` = 1).
    pub running: bool,
    /// Shared pages kept (one copy each).
    pub pages_shared: u64,
    /// Pages that point at a shared one: what merging saved.
    pub pages_sharing: u64,
    /// Pages scanned and found unique.
    pub pages_unshared: u64,
    pub full_scans: u64,
    /// Zero-filled pages mapped to the kernel's zero page instead (`ksm_zero_pages`, kernels
    /// from 6.10; 0 where the kernel does not say).
    pub zero_pages: u64,
    /// The host's page size in bytes.
    pub page_size: u64,
}

impl KsmStats {
    /// Bytes saved: the pages that share another's copy, and those now the zero page.
    pub fn saved_bytes(&self) -> u64 {
        self.pages_sharing
            .saturating_add(self.zero_pages)
            .saturating_mul(self.page_size)
    }
}

/// The scan rate for `vms` running VMs (pages per wake-up); 0: KSM off.
pub fn pages_to_scan(vms: usize) -> u64 {
    if vms == 0 {
        return 0;
    }
    (vms as u64)
        .saturating_mul(PAGES_PER_VM)
        .clamp(MIN_PAGES, MAX_PAGES)
}

/// The host's KSM, managed or only read.
#[derive(Debug)]
pub struct Ksm {
    dir: PathBuf,
    managed: bool,
    /// Present while this daemon (or one before it on the same data dir) has KSM on: a daemon
    /// restarted after its last VM went turns it off.
    marker: PathBuf,
    /// The VM count last applied (nothing is written while it stays the same).
    applied: Mutex<Option<usize>>,
}

impl Ksm {
    pub fn new(root: &HostRoot, managed: bool, marker: PathBuf) -> Self {
        Self {
            dir: root.path("/sys/kernel/mm/ksm"),
            managed,
            marker,
            applied: Mutex::new(None),
        }
    }

    /// Whether the kernel has KSM.
    pub fn available(&self) -> bool {
        self.dir.join("run").exists()
    }

    fn read(&self, name: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The counters, where the kernel has KSM.
    pub fn stats(&self) -> Option<KsmStats> {
        Some(KsmStats {
            running: self.read("run")? == 1,
            pages_shared: self.read("pages_shared")?,
            pages_sharing: self.read("pages_sharing")?,
            pages_unshared: self.read("pages_unshared").unwrap_or(0),
            full_scans: self.read("full_scans").unwrap_or(0),
            zero_pages: self.read("ksm_zero_pages").unwrap_or(0),
            page_size: page_size(),
        })
    }

    /// KSM for `vms` running VMs: on at [`pages_to_scan`] when there are any, off when the
    /// last of them stopped (a daemon that never turned it on leaves it as it found it).
    /// Writes only when the count changed since the last call (and never when unmanaged or
    /// without KSM); answers whether it wrote.
    pub fn tune(&self, vms: usize) -> std::io::Result<bool> {
        if !self.managed || !self.available() {
            return Ok(false);
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if *applied == Some(vms) {
            return Ok(false);
        }
        let was_on = match *applied {
            Some(n) => n > 0,
            None => self.marker.exists(),
        };
        let pages = pages_to_scan(vms);
        if pages == 0 && !was_on {
            *applied = Some(0);
            return Ok(false);
        }
        if pages > 0 {
            std::fs::write(self.dir.join("pages_to_scan"), pages.to_string())?;
            std::fs::write(self.dir.join("sleep_millisecs"), SLEEP_MS.to_string())?;
            // Older kernels may lack it: merging works without, only less.
            let _ = std::fs::write(self.dir.join("use_zero_pages"), "1");
            std::fs::write(self.dir.join("run"), "1")?;
            std::fs::write(&self.marker, b"")?;
        } else {
            std::fs::write(self.dir.join("run"), "0")?;
            std::fs::remove_file(&self.marker).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
        *applied = Some(vms);
        Ok(true)
    }
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_rate_follows_the_vm_count_within_bounds() {
        assert_eq!(pages_to_scan(0), 0);
        assert_eq!(pages_to_scan(1), 256);
        assert_eq!(pages_to_scan(4), 1024);
        assert_eq!(pages_to_scan(1000), 4096);
    }

    /// On a fake sysfs: on with the rate for the count, written once per change, off at 0;
    /// unmanaged writes nothing; the counters read back with the bytes saved.
    #[test]
    fn tune_writes_on_changes_only_and_reads_the_counters() {
        let tmp = tempfile::tempdir().unwrap();
        let root = HostRoot::at(tmp.path());
        let dir = tmp.path().join("sys/kernel/mm/ksm");
        std::fs::create_dir_all(&dir).unwrap();
        for (f, v) in [
            ("run", "0"),
            ("pages_to_scan", "100"),
            ("sleep_millisecs", "200"),
            ("pages_shared", "10"),
            ("pages_sharing", "30"),
            ("pages_unshared", "5"),
            ("full_scans", "2"),
            ("ksm_zero_pages", "7"),
            ("use_zero_pages", "0"),
        ] {
            std::fs::write(dir.join(f), v).unwrap();
        }
        let get = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let marker = tmp.path().join("ksm-on");
        let off = Ksm::new(&root, false, marker.clone());
        assert!(!off.tune(3).unwrap());
        assert_eq!(get("run"), "0");
        // No VM yet: KSM as the host had it (the operator's, running here).
        std::fs::write(dir.join("run"), "1").unwrap();
        let k = Ksm::new(&root, true, marker.clone());
        assert!(!k.tune(0).unwrap());
        assert_eq!(get("run"), "1");
        std::fs::write(dir.join("run"), "0").unwrap();
        assert!(k.tune(3).unwrap());
        assert_eq!(
            (
                get("run").as_str(),
                get("pages_to_scan").as_str(),
                get("sleep_millisecs").as_str()
            ),
            ("1", "768", "20")
        );
        assert_eq!(get("use_zero_pages"), "1");
        std::fs::write(dir.join("pages_to_scan"), "1").unwrap();
        assert!(!k.tune(3).unwrap(), "the same count wrote again");
        assert_eq!(get("pages_to_scan"), "1");
        assert!(marker.exists());
        // A daemon started again after it turned KSM on (the marker) turns it off at 0.
        let again = Ksm::new(&root, true, marker.clone());
        assert!(again.tune(0).unwrap());
        assert_eq!(get("run"), "0");
        assert!(!marker.exists());
        std::fs::write(dir.join("run"), "1").unwrap();
        assert!(k.tune(0).unwrap());
        assert_eq!(get("run"), "0");
        let s = k.stats().unwrap();
        assert_eq!(
            (s.pages_shared, s.pages_sharing, s.running),
            (10, 30, false)
        );
        assert_eq!(s.saved_bytes(), (30 + 7) * s.page_size);
        let gone = Ksm::new(&HostRoot::at(tmp.path().join("none")), true, marker);
        assert!(!gone.available() && gone.stats().is_none());
        assert!(!gone.tune(2).unwrap());
    }
}
