//! Host-side access to files inside an instance's rootfs, resolved *inside* that rootfs.
//!
//! Why: the daemon runs as root on the host and writes `/etc/hostname`, `/etc/hosts`,
//! `/etc/resolv.conf` into the rootfs and reads `/etc/passwd` and `/etc/group` from it, while the
//! rootfs is an image from anywhere. Images legitimately hold absolute symlinks (`etc -> /etc`,
//! `resolv.conf -> /run/systemd/resolve/stub-resolv.conf`); followed on the host, they would point
//! the daemon at the host's own files.
//!
//! Key decision: every path is opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV)` on a descriptor of the rootfs, so the kernel resolves symlinks and `..`
//! exactly as the container will see them (an absolute link is relative to the rootfs), with no
//! check-then-use race. Files are replaced by `unlinkat` + `openat(O_CREAT | O_EXCL |
//! O_NOFOLLOW)` in the directory's descriptor; reads accept only regular files (a FIFO or device
//! node named `/etc/passwd` would block or read the host device) and only up to a size cap.

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RootfsError {
    /// The image's tree is unusable for what the daemon must do there.
    #[error("the image's {path} {why}")]
    Image { path: String, why: String },
    #[error("{path} in the instance's rootfs {root}: {source}")]
    Io {
        root: PathBuf,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// An open instance rootfs.
pub struct Rootfs {
    dir: OwnedFd,
    path: PathBuf,
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

impl Rootfs {
    pub fn open(path: &Path) -> Result<Self, RootfsError> {
        let dir = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| RootfsError::Io {
            root: path.to_path_buf(),
            path: "/".into(),
            source: e.into(),
        })?;
        Ok(Self {
            dir,
            path: path.to_path_buf(),
        })
    }

    fn io(&self, rel: &str, e: impl Into<std::io::Error>) -> RootfsError {
        RootfsError::Io {
            root: self.path.clone(),
            path: format!("/{rel}"),
            source: e.into(),
        }
    }

    fn image(rel: &str, why: impl Into<String>) -> RootfsError {
        RootfsError::Image {
            path: format!("/{rel}"),
            why: why.into(),
        }
    }

    /// `rel` (relative to the rootfs) opened with `flags`, resolved inside the rootfs.
    fn open_in(&self, rel: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(resolve_flags());
        nix::fcntl::openat2(&self.dir, rel, how)
    }

    /// The whole content of the regular file `rel`, `None` if it does not exist. Anything but a
    /// regular file, or a file over `max` bytes, is an error.
    pub fn read_file(&self, rel: &str, max: u64) -> Result<Option<Vec<u8>>, RootfsError> {
        let fd = match self.open_in(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP | Errno::EXDEV) => {
                return Err(Self::image(
                    rel,
                    "is a symlink that does not resolve inside the image",
                ))
            }
            Err(e) => return Err(self.io(rel, e)),
        };
        let st = fstat(&fd).map_err(|e| self.io(rel, e))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(Self::image(rel, "is not a regular file"));
        }
        let mut buf = Vec::new();
        File::from(fd)
            .take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|e| self.io(rel, e))?;
        if buf.len() as u64 > max {
            return Err(Self::image(rel, format!("is larger than {max} bytes")));
        }
        Ok(Some(buf))
    }

    /// The directory `name` (one component, directly under the rootfs, e.g. `etc`), made 0755
    /// if missing. A symlink there is followed inside the rootfs, as in the container.
    fn dir(&self, name: &str) -> Result<OwnedFd, RootfsError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let fd = match self.open_in(name, flags) {
            Err(Errno::ENOENT) => {
                match nix::sys::stat::mkdirat(&self.dir, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => {
                        let fd = self.open_in(name, flags).map_err(|e| self.io(name, e))?;
                        File::from(fd.try_clone().map_err(|e| self.io(name, e))?)
                            .set_permissions(std::fs::Permissions::from_mode(0o755))
                            .map_err(|e| self.io(name, e))?;
                        Ok(fd)
                    }
                    // `name` exists but leads nowhere: a dangling symlink.
                    Err(Errno::EEXIST) => Err(Errno::ENOENT),
                    Err(e) => Err(e),
                }
            }
            r => r,
        };
        fd.map_err(|e| match e {
            Errno::ENOENT | Errno::ELOOP | Errno::EXDEV => Self::image(
                name,
                "is a symlink that does not resolve to a directory inside the image",
            ),
            Errno::ENOTDIR => Self::image(name, "is not a directory"),
            e => self.io(name, e),
        })
    }

    /// Replaces `dir/name` (one level below the rootfs, e.g. `etc`, `hosts`) with a new regular
    /// file holding `text`, mode 0644. Whatever was there (a file, a symlink anywhere) is
    /// removed, never followed.
    pub fn replace_file(&self, dir: &str, name: &str, text: &[u8]) -> Result<(), RootfsError> {
        let rel = format!("{dir}/{name}");
        let dfd = self.dir(dir)?;
        match nix::unistd::unlinkat(&dfd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR) => return Err(Self::image(&rel, "is a directory")),
            Err(e) => return Err(self.io(&rel, e)),
        }
        let fd = nix::fcntl::openat(
            &dfd,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| self.io(&rel, e))?;
        let mut f = File::from(fd);
        f.write_all(text).map_err(|e| self.io(&rel, e))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| self.io(&rel, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let host = t.path().join("host");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("passwd"), "evil:x:4242:4242::/:/bin/sh\n").unwrap();
        (t, root, host)
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let (_t, root, host) = setup();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/passwd"), "mine\n").unwrap();
        symlink("/usr/lib/passwd", root.join("etc/passwd")).unwrap();
        symlink(host.join("passwd"), root.join("etc/group")).unwrap();
        let r = Rootfs::open(&root).unwrap();
        assert_eq!(r.read_file("etc/passwd", 100).unwrap().unwrap(), b"mine\n");
        // The host file is not reachable: inside the root it does not exist.
        assert_eq!(r.read_file("etc/group", 100).unwrap(), None);
        // `..` stops at the root.
        symlink("../../../../../../host/passwd", root.join("etc/shadow")).unwrap();
        assert_eq!(r.read_file("etc/shadow", 100).unwrap(), None);
        assert!(r.read_file("etc/passwd", 2).is_err(), "size cap");
    }

    #[test]
    fn special_files_are_not_read() {
        let (_t, root, _host) = setup();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        nix::unistd::mkfifo(&root.join("etc/passwd"), Mode::from_bits_truncate(0o644)).unwrap();
        let r = Rootfs::open(&root).unwrap();
        let e = r.read_file("etc/passwd", 100).unwrap_err().to_string();
        assert!(e.contains("/etc/passwd is not a regular file"), "{e}");
    }

    #[test]
    fn writes_replace_links_and_never_follow_them() {
        let (_t, root, host) = setup();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        symlink(host.join("passwd"), root.join("etc/hosts")).unwrap();
        let r = Rootfs::open(&root).unwrap();
        r.replace_file("etc", "hosts", b"127.0.0.1 localhost\n")
            .unwrap();
        r.replace_file("etc", "hostname", b"h\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        let m = std::fs::symlink_metadata(root.join("etc/hosts")).unwrap();
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::read_to_string(host.join("passwd")).unwrap(),
            "evil:x:4242:4242::/:/bin/sh\n"
        );
    }

    #[test]
    fn etc_linked_out_of_the_root_is_refused_and_a_missing_etc_is_made() {
        let (_t, root, host) = setup();
        symlink(&host, root.join("etc")).unwrap();
        let r = Rootfs::open(&root).unwrap();
        let e = r
            .replace_file("etc", "hosts", b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc is a symlink"), "{e}");
        std::fs::remove_file(root.join("etc")).unwrap();
        symlink("/etc", root.join("etc")).unwrap();
        let e = r
            .replace_file("etc", "hosts", b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc is a symlink"), "{e}");
        assert_eq!(std::fs::read_dir(&host).unwrap().count(), 1);

        // A link that stays inside the root is followed, as in the container.
        std::fs::remove_file(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("private/etc")).unwrap();
        symlink("/private/etc", root.join("etc")).unwrap();
        r.replace_file("etc", "hosts", b"x").unwrap();
        assert!(root.join("private/etc/hosts").is_file());

        std::fs::remove_file(root.join("etc")).unwrap();
        r.replace_file("etc", "hosts", b"x").unwrap();
        let m = std::fs::symlink_metadata(root.join("etc")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o755);
    }
}
