//! VM templates (CORE's interim implementation of TEMPLATE's API, see docs/ARCHITECTURE.md:
//! replaced by TEMPLATE's `vm/template.rs` at the merge; the signatures are the agreed ones).
//! A template is one per image digest: a read-only raw ext4 base disk holding the image's
//! flattened layers (built once through a read-only overlay mount of the layers and
//! `mkfs.ext4 -d`), and a kernel (the image's `/boot/vmlinuz*`, else the daemon's default).
//! Each VM gets a qcow2 overlay backed by it (`qemu-img create`), sized exactly as asked.

use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TemplateError {
    #[error("template {digest}: {why}")]
    Build { digest: String, why: String },
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cmd(#[from] crate::cmd::CmdError),
}

fn tio(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A VM template: one per image digest, built once, shared read-only by every VM of the image.
#[derive(Debug, Clone)]
pub struct Template {
    pub digest: String,
    /// Read-only base disk (raw ext4 holding the image's flattened layers).
    pub base: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line arguments the template needs.
    pub cmdline: String,
}

pub struct Templates {
    dir: PathBuf,
    default_kernel: Option<PathBuf>,
    default_initrd: Option<PathBuf>,
    lock: std::sync::Mutex<()>,
}

impl Templates {
    pub fn new(
        data_dir: &Path,
        default_kernel: Option<PathBuf>,
        default_initrd: Option<PathBuf>,
    ) -> Self {
        Self {
            dir: data_dir.join("vm").join("templates"),
            default_kernel,
            default_initrd,
            lock: std::sync::Mutex::new(()),
        }
    }

    fn dir_of(&self, digest: &str) -> PathBuf {
        self.dir.join(digest.replace(':', "-"))
    }

    /// Builds (once; concurrent callers wait; atomic) or returns the template of an image.
    pub fn ensure(&self, digest: &str, layers: &[PathBuf]) -> Result<Template, TemplateError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.dir_of(digest);
        let base = dir.join("base.img");
        if !base.exists() {
            std::fs::create_dir_all(&self.dir).map_err(tio(&self.dir))?;
            let tmp = self.dir.join(format!(".tmp-{}", digest.replace(':', "-")));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(tmp.join("mnt")).map_err(tio(&tmp))?;
            let built = build_base(&tmp, layers);
            let _ = nix::mount::umount2(&tmp.join("mnt"), nix::mount::MntFlags::MNT_DETACH);
            if let Err(e) = built {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            let _ = std::fs::remove_dir(tmp.join("mnt"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(tio(&dir))?;
        }
        let boot = |prefix: &str| -> Option<PathBuf> {
            layers.iter().find_map(|l| {
                let rd = std::fs::read_dir(l.join("boot")).ok()?;
                rd.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                        && p.is_file()
                })
            })
        };
        let (kernel, initrd) = match boot("vmlinuz") {
            Some(k) => (k, boot("initrd")),
            None => (
                self.default_kernel
                    .clone()
                    .ok_or_else(|| TemplateError::Build {
                        digest: digest.to_string(),
                        why: "the image has no /boot/vmlinuz* and the daemon has no default VM kernel (vm.kernel)".into(),
                    })?,
                self.default_initrd.clone(),
            ),
        };
        Ok(Template {
            digest: digest.to_string(),
            base,
            kernel,
            initrd,
            cmdline: "root=/dev/vda rw".into(),
        })
    }

    /// A qcow2 overlay backed by the template's base, virtual size exactly `size` bytes.
    pub fn create_overlay(
        &self,
        t: &Template,
        path: &Path,
        size: u64,
    ) -> Result<(), TemplateError> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(tio(d))?;
        }
        let _ = std::fs::remove_file(path);
        crate::cmd::run(
            "qemu-img",
            [
                std::ffi::OsStr::new("create"),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                "raw".as_ref(),
                "-b".as_ref(),
                t.base.as_os_str(),
                path.as_os_str(),
                size.to_string().as_ref(),
            ],
        )?;
        Ok(())
    }

    /// Digests with a template on disk.
    pub fn digests(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().replacen('-', ":", 1))
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn remove(&self, digest: &str) -> Result<(), TemplateError> {
        let d = self.dir_of(digest);
        match std::fs::remove_dir_all(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(tio(&d)(e)),
            _ => Ok(()),
        }
    }
}

/// The layers (top first) through a read-only overlay mount at `tmp/mnt`, into `tmp/base.img`.
fn build_base(tmp: &Path, layers: &[PathBuf]) -> Result<(), TemplateError> {
    let mnt = tmp.join("mnt");
    let lower = layers
        .iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    // One layer: overlayfs wants two lower dirs for a read-only mount; the empty dir serves.
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty).map_err(tio(&empty))?;
    let opts = format!("lowerdir={lower}:{}", empty.display());
    nix::mount::mount(
        Some("overlay"),
        &mnt,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY
            | nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| tio(&mnt)(e.into()))?;
    let used: u64 = crate::cmd::run("du", [std::ffi::OsStr::new("-sbx"), mnt.as_os_str()])?
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let size = (used + used / 2 + (64 << 20)) >> 20;
    let img = tmp.join("base.img");
    crate::cmd::run(
        "mkfs.ext4",
        [
            std::ffi::OsStr::new("-q"),
            "-F".as_ref(),
            "-d".as_ref(),
            mnt.as_os_str(),
            img.as_os_str(),
            format!("{size}M").as_ref(),
        ],
    )?;
    Ok(())
}
