//! Runs a limited test process the way an instance runs it: the library reads its configuration
//! only from `config::PATH` (`/etc/gpuvisor/limiter.conf`), so each test process gets a private
//! mount namespace in which a directory holding the test instance's `limiter.conf` is bound over
//! `/etc/gpuvisor`. Nothing changes for the rest of the host (the mount is private), and no
//! build of the library reads its configuration from anywhere else. Needs root (CI runs as root).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Where the library looks; the bind target.
pub const CONF_DIR: &str = "/etc/gpuvisor";

/// Makes `cmd` run with `dir` (which should hold `limiter.conf`, or not, for the fail-closed
/// tests) seen at `/etc/gpuvisor`.
pub fn confine(cmd: &mut Command, dir: &Path) {
    // The mount point must exist on the host; an empty directory is all it takes.
    std::fs::create_dir_all(CONF_DIR).expect("creating /etc/gpuvisor (the tests run as root)");
    let src = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let dst = CString::new(CONF_DIR).unwrap();
    // SAFETY: the closure runs between fork and exec and only makes raw syscalls on C strings
    // prepared before the fork (no allocation, no lock).
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
