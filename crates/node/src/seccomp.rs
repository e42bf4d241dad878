//! The default seccomp profile: an allowlist at least as strict as Docker's current default
//! (moby/profiles `seccomp/default.json`), compared name by name in the tests below; every
//! remaining difference is listed there (`DOCKER_ONLY`) and in docs/SECURITY.md. Everything not
//! listed fails with EPERM; namespace creation (`unshare`, `setns`, `clone` with `CLONE_NEW*`
//! flags), mounts, the kernel keyring, module loading, kexec, BPF, perf, cross-process access
//! (`process_vm_*`, `pidfd_getfd`, `kcmp`) and clock changes are refused. `socket` is refused for
//! AF_ALG and AF_VSOCK, `personality` allows only Docker's five values, and `io_uring_*` answer
//! ENOSYS. `clone3` answers ENOSYS, as in Docker, so that glibc falls back to `clone`, whose flags
//! we *can* inspect (clone3 passes them in memory where seccomp cannot look). Only the native
//! x86_64 ABI is allowed: i386 (`int $0x80`, whose `socketcall` hides the socket family from
//! seccomp) and x32 system calls are refused outright, so 32-bit programs do not run.
//!
//! Key decision: every argument rule is one comparison on the whole 64-bit register. runc turns
//! two comparisons on the same argument into two alternative rules (an OR), and a bare
//! `family > 40` lets `AF_VSOCK | 1 << 32` through (the kernel truncates to an `int`), so ranges
//! are written as masked equalities that also pin the upper half to zero.
//! Names unknown to the host's libseccomp are skipped by runc, so one list serves every kernel.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};
use oci_spec::OciSpecError;

/// Syscalls every ordinary workload (shells, Python, CUDA programs, JITs) needs.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
    "chroot",
    "ptrace",
];

/// Every `CLONE_NEW*` flag: a `clone` carrying any of them is refused.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// Socket families refused (as in Docker's profile): `AF_ALG` (38, the kernel crypto API, a
/// steady source of kernel bugs) and `AF_VSOCK` (40: host and VM vsock services).
pub const REFUSED_SOCKET_FAMILIES: &[u64] = &[38, 40];

/// `socket` is allowed for these families, as single-comparison rules on the *whole* 64-bit
/// argument: families 0..=37, 39, 41..=63. Docker writes the last as `family > 40`, which a caller
/// passes with `AF_VSOCK | 1 << 32` (the kernel reads an `int`, so it sees AF_VSOCK); every rule
/// here also requires the upper 32 bits to be zero. Families from 64 up do not exist (AF_MAX is
/// 46 in 6.x kernels). (op, value, mask) with mask only for `MaskedEq`.
const SOCKET_RULES: &[(LinuxSeccompOperator, u64, u64)] = &[
    (LinuxSeccompOperator::ScmpCmpLt, 38, 0),
    (LinuxSeccompOperator::ScmpCmpEq, 39, 0),
    (LinuxSeccompOperator::ScmpCmpEq, 41, 0),
    (LinuxSeccompOperator::ScmpCmpMaskedEq, 42, !0x1),
    (LinuxSeccompOperator::ScmpCmpMaskedEq, 44, !0x3),
    (LinuxSeccompOperator::ScmpCmpMaskedEq, 48, !0xf),
];

/// `personality` values Docker allows: PER_LINUX, PER_LINUX32 (UNAME26 is not here),
/// PER_LINUX | UNAME26, PER_LINUX32 | UNAME26, and 0xffffffff (query). Everything else
/// (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, ...) is refused.
pub const ALLOWED_PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Answered ENOSYS rather than EPERM: io_uring is "not there", and libraries (liburing users,
/// libuv, tokio-uring) fall back to ordinary syscalls.
const ENOSYS: &[&str] = &[
    "clone3",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
];

fn rule(
    name: &str,
    op: LinuxSeccompOperator,
    value: u64,
    mask: u64,
) -> Result<LinuxSyscall, OciSpecError> {
    let arg = LinuxSeccompArgBuilder::default().index(0usize).op(op);
    let arg = if op == LinuxSeccompOperator::ScmpCmpMaskedEq {
        // runc/libseccomp: for SCMP_CMP_MASKED_EQ, `value` is the mask and `valueTwo` the datum.
        arg.value(mask).value_two(value)
    } else {
        arg.value(value)
    };
    LinuxSyscallBuilder::default()
        .names(vec![name.to_string()])
        .action(LinuxSeccompAction::ScmpActAllow)
        .args(vec![arg.build()?])
        .build()
}

/// The profile runc installs in every instance.
pub fn default_profile() -> Result<LinuxSeccomp, OciSpecError> {
    let mut syscalls = vec![LinuxSyscallBuilder::default()
        .names(ALLOWED.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActAllow)
        .build()?];
    // Allowed when (flags & CLONE_NAMESPACE_FLAGS) == 0.
    syscalls.push(rule(
        "clone",
        LinuxSeccompOperator::ScmpCmpMaskedEq,
        0,
        CLONE_NAMESPACE_FLAGS,
    )?);
    for (op, value, mask) in SOCKET_RULES {
        syscalls.push(rule("socket", *op, *value, *mask)?);
    }
    for p in ALLOWED_PERSONALITIES {
        syscalls.push(rule("personality", LinuxSeccompOperator::ScmpCmpEq, *p, 0)?);
    }
    syscalls.push(
        LinuxSyscallBuilder::default()
            .names(ENOSYS.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc::ENOSYS as u32)
            .build()?,
    );
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(libc::EPERM as u32)
        // Native x86_64 only, unlike Docker: through the i386 ABI (`int $0x80`) `socketcall`
        // opens any socket family, and libseccomp compiles even our filtered `socket` rule into
        // an unfiltered `socketcall(SYS_SOCKET)` allow there. No GPU stack runs 32-bit code, so
        // i386 and x32 system calls get the filter's bad-architecture action (the call fails or
        // the thread is killed) instead.
        .architectures(vec![Arch::ScmpArchX86_64])
        .syscalls(syscalls)
        .build()
}

/// Syscalls the profile must never allow; checked by the tests so an edit of [`ALLOWED`] cannot
/// silently open one.
pub const DENIED: &[&str] = &[
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "reboot",
    "swapon",
    "swapoff",
    "settimeofday",
    "clock_settime",
    "process_vm_readv",
    "process_vm_writev",
    "open_by_handle_at",
    "userfaultfd",
    "acct",
    "fsopen",
    "fsmount",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "pidfd_getfd",
    "kcmp",
    "process_madvise",
    "modify_ldt",
    "vmsplice",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_syscalls_are_not_allowed() {
        let p = default_profile().unwrap();
        let allowed: Vec<&String> = p
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow)
            .flat_map(|s| s.names())
            .collect();
        for d in DENIED {
            assert!(!allowed.iter().any(|a| a == d), "{d} must be denied");
        }
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
    }

    #[test]
    fn clone_is_filtered_on_namespace_flags() {
        let p = default_profile().unwrap();
        let clone = p
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|s| s.names() == &vec!["clone".to_string()])
            .unwrap();
        let arg = clone.args().as_ref().unwrap()[0];
        assert_eq!(
            arg.value() & libc::CLONE_NEWUSER as u64,
            libc::CLONE_NEWUSER as u64
        );
        assert_eq!(arg.value_two(), Some(0));
    }

    /// Docker's default profile (moby/profiles `seccomp/default.json`, commit cd3bed8, May 2026)
    /// as it applies to an x86_64 container with Docker's default capabilities: the
    /// unconditional allow list, the kernel >= 4.8 group (ptrace, process_vm_*), the amd64/x86
    /// arch groups (arch_prctl, modify_ldt) and `chroot` (CAP_SYS_CHROOT, which we keep too).
    /// `socket`, `personality` and `clone` are argument-filtered in both and compared in
    /// their own tests.
    const DOCKER_ALLOWED: &[&str] = &[
        "_llseek",
        "_newselect",
        "accept",
        "accept4",
        "access",
        "adjtimex",
        "alarm",
        "arch_prctl",
        "bind",
        "brk",
        "cachestat",
        "capget",
        "capset",
        "chdir",
        "chmod",
        "chown",
        "chown32",
        "chroot",
        "clock_adjtime",
        "clock_adjtime64",
        "clock_getres",
        "clock_getres_time64",
        "clock_gettime",
        "clock_gettime64",
        "clock_nanosleep",
        "clock_nanosleep_time64",
        "close",
        "close_range",
        "connect",
        "copy_file_range",
        "creat",
        "dup",
        "dup2",
        "dup3",
        "epoll_create",
        "epoll_create1",
        "epoll_ctl",
        "epoll_ctl_old",
        "epoll_pwait",
        "epoll_pwait2",
        "epoll_wait",
        "epoll_wait_old",
        "eventfd",
        "eventfd2",
        "execve",
        "execveat",
        "exit",
        "exit_group",
        "faccessat",
        "faccessat2",
        "fadvise64",
        "fadvise64_64",
        "fallocate",
        "fanotify_mark",
        "fchdir",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        "fchown",
        "fchown32",
        "fchownat",
        "fcntl",
        "fcntl64",
        "fdatasync",
        "fgetxattr",
        "flistxattr",
        "flock",
        "fork",
        "fremovexattr",
        "fsetxattr",
        "fstat",
        "fstat64",
        "fstatat64",
        "fstatfs",
        "fstatfs64",
        "fsync",
        "ftruncate",
        "ftruncate64",
        "futex",
        "futex_requeue",
        "futex_time64",
        "futex_wait",
        "futex_waitv",
        "futex_wake",
        "futimesat",
        "get_robust_list",
        "get_thread_area",
        "getcpu",
        "getcwd",
        "getdents",
        "getdents64",
        "getegid",
        "getegid32",
        "geteuid",
        "geteuid32",
        "getgid",
        "getgid32",
        "getgroups",
        "getgroups32",
        "getitimer",
        "getpeername",
        "getpgid",
        "getpgrp",
        "getpid",
        "getppid",
        "getpriority",
        "getrandom",
        "getresgid",
        "getresgid32",
        "getresuid",
        "getresuid32",
        "getrlimit",
        "getrusage",
        "getsid",
        "getsockname",
        "getsockopt",
        "gettid",
        "gettimeofday",
        "getuid",
        "getuid32",
        "getxattr",
        "getxattrat",
        "inotify_add_watch",
        "inotify_init",
        "inotify_init1",
        "inotify_rm_watch",
        "io_cancel",
        "io_destroy",
        "io_getevents",
        "io_pgetevents",
        "io_pgetevents_time64",
        "io_setup",
        "io_submit",
        "ioctl",
        "ioprio_get",
        "ioprio_set",
        "ipc",
        "kill",
        "landlock_add_rule",
        "landlock_create_ruleset",
        "landlock_restrict_self",
        "lchown",
        "lchown32",
        "lgetxattr",
        "link",
        "linkat",
        "listen",
        "listmount",
        "listxattr",
        "listxattrat",
        "llistxattr",
        "lremovexattr",
        "lseek",
        "lsetxattr",
        "lstat",
        "lstat64",
        "madvise",
        "map_shadow_stack",
        "membarrier",
        "memfd_create",
        "memfd_secret",
        "mincore",
        "mkdir",
        "mkdirat",
        "mknod",
        "mknodat",
        "mlock",
        "mlock2",
        "mlockall",
        "mmap",
        "mmap2",
        "modify_ldt",
        "mprotect",
        "mq_getsetattr",
        "mq_notify",
        "mq_open",
        "mq_timedreceive",
        "mq_timedreceive_time64",
        "mq_timedsend",
        "mq_timedsend_time64",
        "mq_unlink",
        "mremap",
        "mseal",
        "msgctl",
        "msgget",
        "msgrcv",
        "msgsnd",
        "msync",
        "munlock",
        "munlockall",
        "munmap",
        "name_to_handle_at",
        "nanosleep",
        "newfstatat",
        "open",
        "openat",
        "openat2",
        "pause",
        "pidfd_open",
        "pidfd_send_signal",
        "pipe",
        "pipe2",
        "pkey_alloc",
        "pkey_free",
        "pkey_mprotect",
        "poll",
        "ppoll",
        "ppoll_time64",
        "prctl",
        "pread64",
        "preadv",
        "preadv2",
        "prlimit64",
        "process_mrelease",
        "process_vm_readv",
        "process_vm_writev",
        "pselect6",
        "pselect6_time64",
        "ptrace",
        "pwrite64",
        "pwritev",
        "pwritev2",
        "read",
        "readahead",
        "readlink",
        "readlinkat",
        "readv",
        "recv",
        "recvfrom",
        "recvmmsg",
        "recvmmsg_time64",
        "recvmsg",
        "remap_file_pages",
        "removexattr",
        "removexattrat",
        "rename",
        "renameat",
        "renameat2",
        "restart_syscall",
        "riscv_hwprobe",
        "rmdir",
        "rseq",
        "rt_sigaction",
        "rt_sigpending",
        "rt_sigprocmask",
        "rt_sigqueueinfo",
        "rt_sigreturn",
        "rt_sigsuspend",
        "rt_sigtimedwait",
        "rt_sigtimedwait_time64",
        "rt_tgsigqueueinfo",
        "sched_get_priority_max",
        "sched_get_priority_min",
        "sched_getaffinity",
        "sched_getattr",
        "sched_getparam",
        "sched_getscheduler",
        "sched_rr_get_interval",
        "sched_rr_get_interval_time64",
        "sched_setaffinity",
        "sched_setattr",
        "sched_setparam",
        "sched_setscheduler",
        "sched_yield",
        "seccomp",
        "select",
        "semctl",
        "semget",
        "semop",
        "semtimedop",
        "semtimedop_time64",
        "send",
        "sendfile",
        "sendfile64",
        "sendmmsg",
        "sendmsg",
        "sendto",
        "set_robust_list",
        "set_thread_area",
        "set_tid_address",
        "setfsgid",
        "setfsgid32",
        "setfsuid",
        "setfsuid32",
        "setgid",
        "setgid32",
        "setgroups",
        "setgroups32",
        "setitimer",
        "setpgid",
        "setpriority",
        "setregid",
        "setregid32",
        "setresgid",
        "setresgid32",
        "setresuid",
        "setresuid32",
        "setreuid",
        "setreuid32",
        "setrlimit",
        "setsid",
        "setsockopt",
        "setuid",
        "setuid32",
        "setxattr",
        "setxattrat",
        "shmat",
        "shmctl",
        "shmdt",
        "shmget",
        "shutdown",
        "sigaltstack",
        "signalfd",
        "signalfd4",
        "sigprocmask",
        "sigreturn",
        "socketcall",
        "socketpair",
        "splice",
        "stat",
        "stat64",
        "statfs",
        "statfs64",
        "statmount",
        "statx",
        "symlink",
        "symlinkat",
        "sync",
        "sync_file_range",
        "syncfs",
        "sysinfo",
        "tee",
        "tgkill",
        "time",
        "timer_create",
        "timer_delete",
        "timer_getoverrun",
        "timer_gettime",
        "timer_gettime64",
        "timer_settime",
        "timer_settime64",
        "timerfd_create",
        "timerfd_gettime",
        "timerfd_gettime64",
        "timerfd_settime",
        "timerfd_settime64",
        "times",
        "tkill",
        "truncate",
        "truncate64",
        "ugetrlimit",
        "umask",
        "uname",
        "unlink",
        "unlinkat",
        "uretprobe",
        "utime",
        "utimensat",
        "utimensat_time64",
        "utimes",
        "vfork",
        "vmsplice",
        "wait4",
        "waitid",
        "waitpid",
        "write",
        "writev",
    ];

    /// Every name Docker allows that we refuse, with the reason; docs/SECURITY.md has the same
    /// table. Any change to [`ALLOWED`] that is not mirrored here fails
    /// [`differences_from_docker_are_the_documented_ones`].
    const DOCKER_ONLY: &[(&str, &str)] = &[
        (
            "modify_ldt",
            "16-bit segments (Wine, DOSEMU); a history of kernel bugs",
        ),
        (
            "process_vm_readv",
            "cross-process memory access without ptrace's checks in the tracee",
        ),
        (
            "process_vm_writev",
            "cross-process memory access without ptrace's checks in the tracee",
        ),
        ("riscv_hwprobe", "riscv64 only; we build x86 profiles"),
        (
            "vmsplice",
            "page-cache splicing (Dirty Pipe class); rare outside benchmarks",
        ),
    ];

    fn unconditional_allows(p: &LinuxSeccomp) -> std::collections::BTreeSet<String> {
        p.syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow && s.args().is_none())
            .flat_map(|s| s.names().iter().cloned())
            .collect()
    }

    #[test]
    fn differences_from_docker_are_the_documented_ones() {
        let ours = unconditional_allows(&default_profile().unwrap());
        let docker: std::collections::BTreeSet<String> =
            DOCKER_ALLOWED.iter().map(|s| s.to_string()).collect();
        let ours_only: Vec<&String> = ours.difference(&docker).collect();
        assert!(
            ours_only.is_empty(),
            "allowed here but not by Docker: {ours_only:?}"
        );
        let docker_only: Vec<&str> = docker.difference(&ours).map(|s| s.as_str()).collect();
        let documented: Vec<&str> = DOCKER_ONLY.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            docker_only, documented,
            "allowed by Docker, refused here: document each in DOCKER_ONLY and docs/SECURITY.md"
        );
    }

    fn arg_rules(p: &LinuxSeccomp, name: &str) -> Vec<oci_spec::runtime::LinuxSeccompArg> {
        p.syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|s| s.names().iter().any(|n| n == name))
            .map(|s| {
                assert_eq!(s.action(), LinuxSeccompAction::ScmpActAllow, "{name}");
                let args = s.args().as_ref().expect("argument-filtered");
                assert_eq!(
                    args.len(),
                    1,
                    "one comparison per rule (runc ORs repeated args)"
                );
                args[0]
            })
            .collect()
    }

    /// What the kernel does with a rule set on one 64-bit argument: allowed if any rule
    /// matches (libseccomp's comparisons are on the full 64 bits on x86_64).
    fn allows(rules: &[oci_spec::runtime::LinuxSeccompArg], v: u64) -> bool {
        rules.iter().any(|a| match a.op() {
            LinuxSeccompOperator::ScmpCmpEq => v == a.value(),
            LinuxSeccompOperator::ScmpCmpLt => v < a.value(),
            LinuxSeccompOperator::ScmpCmpMaskedEq => v & a.value() == a.value_two().unwrap(),
            op => panic!("unexpected operator {op:?}"),
        })
    }

    #[test]
    fn socket_refuses_alg_and_vsock_even_with_high_bits() {
        let rules = arg_rules(&default_profile().unwrap(), "socket");
        for family in 0..64u64 {
            let refused = REFUSED_SOCKET_FAMILIES.contains(&family);
            assert_eq!(allows(&rules, family), !refused, "family {family}");
            assert!(
                !allows(&rules, family | 1 << 32),
                "family {family} | 1 << 32"
            );
            assert!(
                !allows(&rules, family | 0xffff_ffff_0000_0000),
                "family {family} sign-extended"
            );
        }
        for family in [64, 128, 0xffff_ffff, u64::MAX] {
            assert!(!allows(&rules, family), "family {family:#x}");
        }
    }

    #[test]
    fn personality_allows_only_dockers_values() {
        let rules = arg_rules(&default_profile().unwrap(), "personality");
        for v in [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff] {
            assert!(allows(&rules, v), "{v:#x}");
        }
        // READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, PER_BSD, and an allowed value with high bits.
        for v in [0x0400000, 0x0040000, 0x6, 0x1_0000_0000, u64::MAX] {
            assert!(!allows(&rules, v), "{v:#x}");
        }
    }

    #[test]
    fn io_uring_pidfd_getfd_and_vsock_are_closed() {
        let p = default_profile().unwrap();
        let ours = unconditional_allows(&p);
        for n in [
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "pidfd_getfd",
        ] {
            assert!(!ours.contains(n), "{n}");
        }
        let enosys = p
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|s| s.names().iter().any(|n| n == "io_uring_setup"))
            .unwrap();
        assert_eq!(enosys.action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(enosys.errno_ret(), Some(libc::ENOSYS as u32));
    }
}
