//! Interactive exec (`instance exec -it`): a real terminal inside an instance.
//!
//! The terminal is made by the OCI runtime, as containerd does it: `runc exec --detach --tty
//! --console-socket S` creates a pty inside the instance (the command's controlling terminal, so
//! its line discipline turns a typed ^C into SIGINT) and sends the master end over the unix
//! socket `S` (SCM_RIGHTS); the daemon listens there ([`ConsoleSocket`]), receives it
//! ([`recv_master`]) and reads/writes it directly, sizing it with [`set_window_size`].
//!
//! A detached `runc exec` leaves its command's exit status to whoever reaps it. So the runtime
//! is not started by the daemon itself but by a *shim*: this binary in its hidden
//! [`SHIM_SUBCOMMAND`] mode ([`shim_main`]), a child subreaper that runs runc, then waits for the
//! command (reparented to it when runc exits) and prints its exit status. The daemon is a child
//! subreaper too (for its instances' exit codes, [`crate::reap`]), but the command is the
//! shim's child, so its status is never mixed up with the daemon's other orphans; the daemon
//! inherits it only if the shim dies first (then it kills and reaps it). Sessions on pipes
//! (`exec -i` without `-t`) run through the shim too, with runc in the foreground on the shim's
//! stdio. If the daemon dies, the shim gets SIGTERM (parent-death signal; blocked and taken
//! with `sigtimedwait`, so it is never lost) and kills the command's process tree, so a shell
//! never outlives the session it belonged to.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The hidden subcommand of the `gpuvisor` binary that runs [`shim_main`].
pub const SHIM_SUBCOMMAND: &str = "exec-shim";

/// What the shim prints on stdout once the command has ended: `exit <code>`.
pub const SHIM_EXIT_PREFIX: &str = "exit ";

/// Longest path of a unix socket (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The listening end of a `--console-socket`; the socket file is removed on drop.
#[derive(Debug)]
pub struct ConsoleSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl ConsoleSocket {
    /// Listens at `path` (in a directory only root can enter: the instance's bundle).
    pub fn bind(path: &Path) -> io::Result<Self> {
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "console socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter data dir",
                    path.display()
                ),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let sock = Self {
            path: path.to_path_buf(),
            listener: Some(listener),
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(sock)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener, for the caller's own (async) accept; the file stays ours to remove.
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives the pty master the runtime sends on a connected console socket: the first file
/// descriptor of an SCM_RIGHTS message (any other is closed). `WouldBlock` on a non-blocking
/// socket with nothing to read yet.
pub fn recv_master(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut master = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in our table for this message; nothing
                // else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if master.is_none() {
                    master = Some(owned);
                }
            }
        }
    }
    master.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the runtime's console message carried no file descriptor",
        )
    })
}

/// Sets a terminal's window size (TIOCSWINSZ); the kernel sends SIGWINCH to its foreground
/// process group when it changes.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `d` for one of the (blocked) signals of `set`; the signal number, if one came.
fn wait_signal(set: &nix::sys::signal::SigSet, d: std::time::Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    };
    // SAFETY: `set` is a valid sigset_t and `ts` a valid timespec, both alive across the call;
    // a null siginfo pointer is allowed.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// Waits for child `pid` and returns its status (128+N for signal N) and whether SIGTERM came.
/// On SIGTERM (taken with `sigtimedwait`: blocked, so never lost between a check and a wait)
/// calls `kill`, again on every round until the child is gone.
fn wait_child(
    pid: i32,
    signals: &nix::sys::signal::SigSet,
    mut kill: impl FnMut(),
) -> nix::Result<(i32, bool)> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    let mut term = false;
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, c)) => return Ok((c, term)),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok((128 + s as i32, term)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
        if term {
            kill();
        }
        if wait_signal(signals, std::time::Duration::from_secs(1)) == Some(libc::SIGTERM) {
            term = true;
            kill();
        }
    }
}

/// Kills the trees of the shim's own children in instance `id`: processes reparented to it
/// (a child subreaper) when the runtime that started them died.
fn kill_orphans(root: &crate::HostRoot, id: &str) {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    for (pid, parent) in crate::oci::proc_parents(root) {
        if parent == me && crate::cgroup::holds(root, id, pid) {
            crate::oci::kill_exec_tree(root, id, pid);
        }
    }
}

/// The shim: becomes a child subreaper and runs `runtime`, a `runc exec` command line that
/// writes `pid_file`. On a terminal (`pipes` false) that is a `runc exec --detach`; the shim
/// then waits for the command (reparented to it when runc exits), prints `exit <code>` (128+N
/// for a signal) and returns 0, or the runtime's status when it failed to start the command.
/// On pipes (`pipes` true) runc runs in the foreground with the shim's stdin, stdout and
/// stderr, and the shim returns runc's status (the command's). Either way, on SIGTERM (the
/// daemon died: parent-death signal, or the daemon ends the session) it kills the command's
/// process tree in instance `id`.
pub fn shim_main(
    root: &crate::HostRoot,
    id: &str,
    pid_file: &Path,
    runtime: &[String],
    pipes: bool,
) -> i32 {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    let Some((bin, args)) = runtime.split_first() else {
        eprintln!("exec-shim: no runtime command");
        return 2;
    };
    // SIGTERM and SIGCHLD are taken with sigtimedwait; SIGINT, SIGHUP and SIGPIPE (a ^C or a
    // hangup at the daemon's terminal) stay pending, unused. Children start with an empty mask
    // (the standard library resets it between fork and exec).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGCHLD);
    let mut blocked = signals;
    for s in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE] {
        blocked.add(s);
    }
    if let Err(e) = blocked.thread_block() {
        eprintln!("exec-shim: cannot block signals: {e}");
        return 2;
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        eprintln!("exec-shim: cannot set the parent-death signal: {e}");
        return 2;
    }
    // The daemon may have died before the parent-death signal was armed.
    if nix::unistd::getppid() == Pid::from_raw(1) {
        return 2;
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("exec-shim: cannot become a child subreaper: {e}");
        return 2;
    }
    let read_pid = || {
        std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|p| *p > 1)
    };
    let code = if pipes {
        let runc = match std::process::Command::new(bin).args(args).spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("exec-shim: cannot run {bin}: {e}");
                return 125;
            }
        };
        let runc_pid = runc.id() as i32;
        let waited = wait_child(runc_pid, &signals, || match read_pid() {
            Some(pid) => {
                crate::oci::kill_exec_tree(root, id, pid);
            }
            // Not started yet: the runtime goes, and its command never starts.
            None => {
                let _ = nix::sys::signal::kill(Pid::from_raw(runc_pid), Signal::SIGKILL);
            }
        });
        match waited {
            Ok((c, term)) => {
                if term {
                    // The runtime may have started the command and been killed before it wrote
                    // its pid: the command is then ours (a child subreaper's) and goes too.
                    kill_orphans(root, id);
                }
                c
            }
            Err(e) => {
                eprintln!("exec-shim: waiting for the runtime: {e}");
                125
            }
        }
    } else {
        let status = std::process::Command::new(bin)
            .args(args)
            .stdin(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                // runc said why on our stderr (the daemon's pipe).
                return s.code().unwrap_or(125);
            }
            Err(e) => {
                eprintln!("exec-shim: cannot run {bin}: {e}");
                return 125;
            }
        }
        let Some(pid) = read_pid() else {
            eprintln!(
                "exec-shim: the runtime wrote no pid to {}",
                pid_file.display()
            );
            return 125;
        };
        match wait_child(pid, &signals, || {
            crate::oci::kill_exec_tree(root, id, pid);
        }) {
            Ok((c, _)) => c,
            Err(e) => {
                eprintln!("exec-shim: waiting for pid {pid}: {e}");
                return 125;
            }
        }
    };
    // Anything else that was reparented to us (nothing, normally): reap it.
    while let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG))
    {}
    if pipes {
        return code;
    }
    println!("{SHIM_EXIT_PREFIX}{code}");
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A descriptor sent with SCM_RIGHTS comes out of `recv_master` as a working descriptor of
    /// the same file; a message without one is an error, not a hang.
    #[test]
    fn receives_the_descriptor_a_peer_sends() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let dir = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(&dir.path().join("c.sock")).unwrap();
        let path = sock.path().to_path_buf();
        let peer = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut sock = sock;
        let (conn, _) = sock.take_listener().unwrap().accept().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let fds = [w.as_raw_fd()];
        let iov = [std::io::IoSlice::new(b"/dev/pts/9")];
        sendmsg::<UnixAddr>(
            peer.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(w);
        let got = recv_master(conn.as_fd()).unwrap();
        nix::unistd::write(&got, b"hi").unwrap();
        let mut buf = [0u8; 2];
        nix::unistd::read(&r, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        sendmsg::<UnixAddr>(peer.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).unwrap();
        assert!(recv_master(conn.as_fd()).is_err());
        drop(sock);
        assert!(!path.exists(), "the socket file is removed with the socket");
    }

    #[test]
    fn window_size_reaches_the_terminal() {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_window_size(pty.master.as_fd(), 33, 101).unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
        let r = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(r, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (33, 101));
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(set_window_size(r.as_fd(), 1, 1).is_err());
    }

    #[test]
    fn refuses_a_socket_path_unix_cannot_hold() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let e = ConsoleSocket::bind(&long).unwrap_err();
        assert!(e.to_string().contains("shorter data dir"), "{e}");
    }
}
