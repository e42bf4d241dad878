//! The client side of `instance exec -i/-t`: one thread, one `poll` over the session's socket,
//! our stdin and a self-pipe the signal handlers write to (SIGWINCH → a `resize` message;
//! SIGTERM/SIGHUP → leave). With `-it` the local terminal is put in raw mode for the session, so
//! every key (^C included) goes to the remote terminal, whose line discipline acts on it; the
//! [`RawMode`] guard restores it on every way out (return, error, panic unwinding). The handlers
//! ([`Signals`]) are installed before raw mode is entered and put back after it is left, so no
//! signal finds the terminal raw with its default action: SIGINT and SIGQUIT sent with `kill`
//! end the session like SIGTERM, and SIGTSTP gives the terminal back while the client is
//! stopped (raw again on SIGCONT).

use crate::client::{ClientError, SessionSocket};
use gpuvisor_wire::session::{self as proto, Control, Size};
use gpuvisor_wire::ExecEnd;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// How the session ended, for the CLI's exit code.
pub enum Outcome {
    Exit(ExecEnd),
    /// A signal (SIGTERM, SIGHUP) ended the client: 128 + N.
    Signalled(i32),
    /// The escape key was typed: the client left, the other side goes on (a console).
    Detached,
}

/// The local terminal's settings before raw mode; put back on drop.
pub struct RawMode {
    fd: OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Puts the terminal on `fd` in raw mode.
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<Self> {
        use nix::sys::termios::tcgetattr;
        let fd = fd.try_clone_to_owned()?;
        let saved = tcgetattr(&fd).map_err(io::Error::from)?;
        let me = Self { fd, saved };
        me.raw()?;
        Ok(me)
    }

    fn raw(&self) -> io::Result<()> {
        use nix::sys::termios::{cfmakeraw, tcsetattr, SetArg};
        let mut raw = self.saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&self.fd, SetArg::TCSADRAIN, &raw).map_err(io::Error::from)
    }

    /// The terminal as it was, for a while (the client is being stopped).
    fn suspend(&self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}

/// The size of the terminal on `fd`, if it is one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<Size> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`, which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(Size {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The write end of the self-pipe (-1: none), and what the handlers saw.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static WINCH: AtomicBool = AtomicBool::new(false);
static TERM_SIG: AtomicI32 = AtomicI32::new(0);
static TSTP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGWINCH {
        WINCH.store(true, Ordering::SeqCst);
    } else if sig == libc::SIGTSTP {
        TSTP.store(true, Ordering::SeqCst);
    } else {
        TERM_SIG.store(sig, Ordering::SeqCst);
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = [1u8];
        // SAFETY: write(2) is async-signal-safe; the buffer lives across the call. A full
        // pipe (EAGAIN) already holds a wake-up.
        unsafe {
            libc::write(fd, b.as_ptr().cast(), 1);
        }
    }
}

/// The signal handlers and their self-pipe; the previous dispositions come back on drop.
pub struct Signals {
    read: OwnedFd,
    _write: OwnedFd,
    watched: Vec<(nix::sys::signal::Signal, nix::sys::signal::SigAction)>,
}

impl Signals {
    /// Installs the session's handlers: SIGTERM and SIGHUP end it; with `tty` SIGWINCH
    /// resizes; in `raw` mode SIGINT and SIGQUIT (which only `kill` sends then) end it and
    /// SIGTSTP stops the client with the terminal given back.
    pub fn install(tty: bool, raw: bool) -> io::Result<Self> {
        use nix::fcntl::OFlag;
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)?;
        WAKE_FD.store(write.as_raw_fd(), Ordering::SeqCst);
        let mut signals = vec![Signal::SIGTERM, Signal::SIGHUP];
        if tty {
            signals.push(Signal::SIGWINCH);
        }
        if raw {
            signals.extend([Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTSTP]);
        }
        let act = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut me = Self {
            read,
            _write: write,
            watched: Vec::new(),
        };
        for s in signals {
            // SAFETY: the handler only stores to atomics and calls write(2).
            let old = unsafe { sigaction(s, &act) }.map_err(io::Error::from)?;
            me.watched.push((s, old));
        }
        Ok(me)
    }

    /// Empties the self-pipe.
    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.read, &mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        use nix::sys::signal::sigaction;
        for (s, old) in &self.watched {
            // SAFETY: puts back the disposition that was there before `install`.
            let _ = unsafe { sigaction(*s, old) };
        }
        WAKE_FD.store(-1, Ordering::SeqCst);
    }
}

fn cut(reason: impl std::fmt::Display) -> ClientError {
    ClientError::Transport {
        endpoint: "the exec session".into(),
        reason: format!("the session was cut: {reason}"),
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

/// Queues `msg`; true when it is written out, false when part of it waits for the socket.
fn send(ws: &mut SessionSocket, msg: tungstenite::Message) -> Result<bool, ClientError> {
    match ws.send(msg) {
        Ok(()) => Ok(true),
        Err(e) if would_block(&e) => Ok(false),
        Err(e) => Err(cut(e)),
    }
}

/// Leaves a session from this side: what was typed goes out first, then the close (bounded).
fn leave(mut ws: SessionSocket) -> Outcome {
    let _ = ws.get_mut().set_nonblocking(false);
    let _ = ws
        .get_mut()
        .set_write_timeout(Some(std::time::Duration::from_secs(5)));
    let _ = ws.flush();
    let _ = ws.close(None);
    let _ = ws.flush();
    Outcome::Detached
}

/// Runs a session until the remote command ends: stdin forwarded when `stdin`, resizes sent
/// when `tty`, output written as it comes (on a terminal it is all stdout). The `escape` byte
/// in the input ends the session from this side ([`Outcome::Detached`]); what was typed before
/// it is sent first. With an `escape` (a console), the end of the input detaches too.
pub fn run(
    mut ws: SessionSocket,
    stdin: bool,
    signals: &Signals,
    raw: Option<&RawMode>,
    escape: Option<u8>,
) -> Result<Outcome, ClientError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use tungstenite::Message;
    ws.get_mut().set_nonblocking(true).map_err(cut)?;
    let input = io::stdin();
    let mut stdin_open = stdin;
    let mut flushed = true;
    let mut buf = vec![0u8; 32 * 1024];
    let mut end: Option<ExecEnd> = None;
    loop {
        if let Some(sig) = match TERM_SIG.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        } {
            let _ = ws.close(None);
            let _ = ws.flush();
            return Ok(Outcome::Signalled(128 + sig));
        }
        let (sock_ev, in_ev, sig_ev) = {
            let sock_fd = ws.get_ref().as_fd();
            let mut sock_flags = PollFlags::POLLIN;
            if !flushed {
                sock_flags |= PollFlags::POLLOUT;
            }
            let in_fd = input.as_fd();
            let mut fds = vec![
                PollFd::new(sock_fd, sock_flags),
                PollFd::new(signals.read.as_fd(), PollFlags::POLLIN),
            ];
            // Input waits while earlier input is still on its way (back pressure).
            if stdin_open && flushed {
                fds.push(PollFd::new(in_fd, PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(cut(e)),
            }
            let ev = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .unwrap_or(PollFlags::empty())
            };
            (ev(0), ev(2), ev(1))
        };
        if !sig_ev.is_empty() {
            signals.drain();
            if TSTP.swap(false, Ordering::SeqCst) {
                // Stopped with the terminal as the user had it; raw again once continued (the
                // window may have changed meanwhile).
                if let Some(r) = raw {
                    r.suspend();
                }
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
                if let Some(r) = raw {
                    let _ = r.raw();
                }
                WINCH.store(true, Ordering::SeqCst);
            }
            if WINCH.swap(false, Ordering::SeqCst) {
                if let Some(size) = window_size(io::stdout().as_fd()) {
                    let text = serde_json::to_string(&Control::Resize(size)).unwrap_or_default();
                    flushed = send(&mut ws, Message::text(text))?;
                }
            }
        }
        if !in_ev.is_empty() {
            match input.lock().read(&mut buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Ok(0) | Err(_) if escape.is_some() => {
                    // A console has no end of input to pass on: the input ending detaches.
                    return Ok(leave(ws));
                }
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    let text = serde_json::to_string(&Control::Eof).unwrap_or_default();
                    flushed = send(&mut ws, Message::text(text))?;
                }
                Ok(n) => {
                    let cut_at = escape.and_then(|e| buf[..n].iter().position(|b| *b == e));
                    let typed = &buf[..cut_at.unwrap_or(n)];
                    if !typed.is_empty() {
                        let data = proto::data(proto::STDIN, typed);
                        flushed = send(&mut ws, Message::binary(data))?;
                    }
                    if cut_at.is_some() {
                        return Ok(leave(ws));
                    }
                }
            }
        }
        if sock_ev.contains(PollFlags::POLLOUT) {
            match ws.flush() {
                Ok(()) => flushed = true,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(cut(e)),
            }
        }
        if sock_ev.is_empty() {
            continue;
        }
        // Everything the socket has now.
        loop {
            match ws.read() {
                Ok(Message::Binary(b)) => {
                    let (channel, data) = match b.split_first() {
                        Some((c, d)) => (*c, d),
                        None => continue,
                    };
                    let w = if channel == proto::STDERR {
                        let mut e = io::stderr().lock();
                        e.write_all(data).and_then(|()| e.flush())
                    } else {
                        let mut o = io::stdout().lock();
                        o.write_all(data).and_then(|()| o.flush())
                    };
                    w.map_err(|e| cut(format!("writing the command's output: {e}")))?;
                }
                Ok(Message::Text(t)) => {
                    if let Ok(Control::Exit(e)) = serde_json::from_str::<Control>(t.as_str()) {
                        end = Some(e);
                    }
                }
                Ok(Message::Close(_)) => {
                    return end
                        .map(Outcome::Exit)
                        .ok_or_else(|| cut("the daemon closed it before the command ended"));
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return end
                        .map(Outcome::Exit)
                        .ok_or_else(|| cut("the connection closed"));
                }
                Err(e) => {
                    return match end {
                        Some(x) => Ok(Outcome::Exit(x)),
                        None => Err(cut(e)),
                    }
                }
            }
        }
    }
}
