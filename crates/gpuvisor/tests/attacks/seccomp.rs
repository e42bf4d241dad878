//! Attacks: seccomp. Each refused syscall is called from inside a real instance by a static C
//! probe (`gvprobe`, built here and copied into a variant of the busybox rootfs), and each test
//! also runs an allowed neighbour of the refused call through the same probe, so a probe that
//! could not run (or a profile that refuses everything) fails the test instead of passing it.
//! The refusals must come from seccomp: the tests check the errno the profile returns (EPERM,
//! or ENOSYS for io_uring), not just any failure (the host may lack a socket family).

use crate::common::{busybox_rootfs, serial, Daemon};
use crate::probe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// `gvprobe MODE [ARG]`: performs one syscall, prints `NAME=RET errno=N`, exits 0 when the call
/// succeeded and 1 when it failed.
const PROBE_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
static int report(const char *what, long r) {
    printf("%s=%ld errno=%d\n", what, r, r < 0 ? errno : 0);
    return r < 0 ? 1 : 0;
}
int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: gvprobe MODE [ARG]\n"); return 2; }
    const char *m = argv[1];
    long arg = argc > 2 ? strtol(argv[2], 0, 0) : 0;
    if (!strcmp(m, "socket")) {
        /* argv[2] = family; stream sockets, except AF_ALG which only has seqpacket. */
        int type = arg == 38 ? SOCK_SEQPACKET : SOCK_STREAM;
        return report("socket", syscall(SYS_socket, arg, type, 0));
    }
    if (!strcmp(m, "socket_hi")) {
        /* The family with high bits set: the kernel reads an int, a filter sees 64 bits. */
        return report("socket_hi", syscall(SYS_socket, arg | 0x100000000L, SOCK_STREAM, 0));
    }
    if (!strcmp(m, "socketcall32")) {
        /* The i386 ABI from a 64-bit program: socketcall(SYS_SOCKET, {family, STREAM, 0}),
           its arguments in memory below 4 GiB where seccomp cannot look. */
        unsigned int *a = mmap(0, 4096, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
        if (a == MAP_FAILED) { fprintf(stderr, "gvprobe: mmap failed\n"); return 2; }
        a[0] = (unsigned int)arg; a[1] = SOCK_STREAM; a[2] = 0;
        long r;
        __asm__ volatile ("int $0x80" : "=a"(r) : "a"(102L), "b"(1L), "c"((long)a) : "memory");
        if (r < 0 && r > -4096) { errno = (int)-r; r = -1; }
        return report("socketcall32", r);
    }
    if (!strcmp(m, "x32socket")) {
        /* The x32 ABI: socket is syscall 41 with __X32_SYSCALL_BIT. */
        return report("x32socket", syscall(0x40000000L | 41, arg, SOCK_STREAM, 0));
    }
    if (!strcmp(m, "io_uring_setup")) {
        char params[256];
        memset(params, 0, sizeof params);
        return report("io_uring_setup", syscall(SYS_io_uring_setup, 8, params));
    }
    if (!strcmp(m, "pidfd_open")) {
        return report("pidfd_open", syscall(SYS_pidfd_open, getpid(), 0));
    }
    if (!strcmp(m, "pidfd_getfd")) {
        long pidfd = syscall(SYS_pidfd_open, getpid(), 0);
        if (pidfd < 0) return report("pidfd_open", pidfd);
        return report("pidfd_getfd", syscall(SYS_pidfd_getfd, pidfd, 1, 0));
    }
    if (!strcmp(m, "personality")) {
        return report("personality", syscall(SYS_personality, (unsigned long)arg));
    }
    if (!strcmp(m, "euid")) {
        printf("euid=%d\n", (int)geteuid());
        return 0;
    }
    fprintf(stderr, "gvprobe: unknown mode %s\n", m);
    return 2;
}
"#;

/// The busybox rootfs plus `/bin/gvprobe` (built once per test binary). Also used by the
/// hostfs attacks (a setuid copy of the probe reports its effective uid).
pub fn probe_rootfs() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = busybox_rootfs();
        let dir = std::env::temp_dir().join(format!("gv-test-probefs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = Command::new("cp")
            .arg("-a")
            .arg(&base)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "cannot copy the busybox rootfs");
        let src = std::env::temp_dir().join(format!("gvprobe-{}.c", std::process::id()));
        std::fs::write(&src, PROBE_C).unwrap();
        let out = Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(dir.join("bin/gvprobe"))
            .arg(&src)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot build the static syscall probe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(src).unwrap();
        dir
    })
    .clone()
}

/// Imports [`probe_rootfs`] as image `probe`.
pub fn import_probe(d: &Daemon) {
    let root = probe_rootfs();
    import_dir(d, &root, "probe");
}

pub fn import_dir(d: &Daemon, root: &Path, name: &str) {
    d.json(&["image", "import", root.to_str().unwrap(), "--name", name]);
}

/// A daemon with the probe image and one running instance of it.
fn instance() -> (Daemon, String) {
    let d = Daemon::start(&[]);
    import_probe(&d);
    let v = d.json(&crate::common::sleeper_create("probe", &[]));
    assert_eq!(v["state"], "running", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    (d, id)
}

/// Asserts that `gvprobe MODE ARG` failed with exactly `errno` (the profile's answer).
fn refused_with(d: &Daemon, id: &str, what: &str, cmd: &str, errno: i32) {
    let p = probe::refused(d, id, what, cmd);
    assert!(
        p.out.contains(&format!(" errno={errno}\n")),
        "{what}: refused, but not by seccomp (expected errno {errno}): {}{}",
        p.out,
        p.err
    );
}

#[test]
fn vsock_socket_is_refused() {
    let _s = serial();
    let (d, id) = instance();
    probe::allowed(&d, &id, "socket(AF_INET)", "gvprobe socket 2");
    probe::allowed(&d, &id, "socket(AF_UNIX)", "gvprobe socket 1");
    refused_with(
        &d,
        &id,
        "socket(AF_VSOCK)",
        "gvprobe socket 40",
        libc::EPERM,
    );
}

#[test]
fn vsock_socket_with_high_bits_in_family_is_refused() {
    let _s = serial();
    let (d, id) = instance();
    probe::allowed(&d, &id, "socket(AF_INET)", "gvprobe socket 2");
    // 0x1_0000_0028 passes a 64-bit "family > 40" comparison; the kernel reads AF_VSOCK.
    refused_with(
        &d,
        &id,
        "socket(AF_VSOCK | 1 << 32)",
        "gvprobe socket_hi 40",
        libc::EPERM,
    );
    refused_with(
        &d,
        &id,
        "socket(AF_INET | 1 << 32)",
        "gvprobe socket_hi 2",
        libc::EPERM,
    );
}

/// The i386 and x32 ABIs from a 64-bit program: `int $0x80` socketcall hides the family from
/// seccomp, so only refusing those ABIs outright closes AF_VSOCK there. A refusal here is an
/// error return or the process killed by the filter (SIGSYS), never a descriptor.
#[test]
fn vsock_socket_through_the_32bit_abis_is_refused() {
    let _s = serial();
    let (d, id) = instance();
    probe::allowed(&d, &id, "native socket(AF_INET)", "gvprobe socket 2");
    for mode in ["socketcall32", "x32socket"] {
        let p = probe::refused(
            &d,
            &id,
            &format!("{mode} AF_VSOCK"),
            &format!("gvprobe {mode} 40"),
        );
        assert!(
            !p.err.contains("unknown mode") && !p.err.contains("mmap failed"),
            "{mode}: the probe did not make the call: {}",
            p.err
        );
    }
}

#[test]
fn alg_socket_is_refused() {
    let _s = serial();
    let (d, id) = instance();
    probe::allowed(&d, &id, "socket(AF_INET)", "gvprobe socket 2");
    refused_with(&d, &id, "socket(AF_ALG)", "gvprobe socket 38", libc::EPERM);
}

#[test]
fn io_uring_setup_is_refused() {
    let _s = serial();
    let (d, id) = instance();
    probe::allowed(&d, &id, "socket(AF_INET)", "gvprobe socket 2");
    refused_with(
        &d,
        &id,
        "io_uring_setup",
        "gvprobe io_uring_setup",
        libc::ENOSYS,
    );
}

#[test]
fn pidfd_getfd_is_refused() {
    let _s = serial();
    let (d, id) = instance();
    probe::allowed(&d, &id, "pidfd_open(self)", "gvprobe pidfd_open");
    refused_with(
        &d,
        &id,
        "pidfd_getfd(self)",
        "gvprobe pidfd_getfd",
        libc::EPERM,
    );
}

#[test]
fn personality_read_implies_exec_is_refused() {
    let _s = serial();
    let (d, id) = instance();
    probe::allowed(
        &d,
        &id,
        "personality(0xffffffff) query",
        "gvprobe personality 0xffffffff",
    );
    probe::allowed(&d, &id, "personality(PER_LINUX)", "gvprobe personality 0");
    // READ_IMPLIES_EXEC: every readable mapping becomes executable.
    refused_with(
        &d,
        &id,
        "personality(READ_IMPLIES_EXEC)",
        "gvprobe personality 0x0400000",
        libc::EPERM,
    );
    // ADDR_NO_RANDOMIZE: turns ASLR off (Docker allows only the values above).
    refused_with(
        &d,
        &id,
        "personality(ADDR_NO_RANDOMIZE)",
        "gvprobe personality 0x0040000",
        libc::EPERM,
    );
}
