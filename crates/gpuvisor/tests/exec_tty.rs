//! Interactive exec (`instance exec -i/-t`) end to end: the real CLI runs under a pty this test
//! opens (its controlling terminal, as a user's shell would give it), types into a shell in a
//! real instance and reads the screen; resizes the outer terminal; sends ^C; kills the CLI and
//! checks nothing is left in the instance; pipes bytes through `-i`; and tries another tenant's
//! key. Runs as root (CI does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{instance_pids, serial, sleeper, Daemon};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A daemon with a network prefix and pool of this test's own, so that bridges other suites
/// leave or make on the same host never meet ours.
fn daemon(extra: &[&str]) -> Daemon {
    let mut a = vec!["--net-prefix", "gx", "--net-pool", "10.83.0.0"];
    a.extend(extra);
    Daemon::start(&a)
}

/// Longest any step may take before the test gives up (a hang guard, not a measurement).
const PATIENCE: Duration = Duration::from_secs(60);

/// The CLI running under a pty whose master we hold.
struct Term {
    child: Child,
    master: OwnedFd,
    /// Everything read from the screen, and where the next `expect` starts looking.
    seen: Vec<u8>,
    from: usize,
}

impl Term {
    /// `gpuvisor ARGS` on a new terminal of `rows`×`cols`, in its own session with the terminal
    /// as its controlling tty.
    fn spawn(d: &Daemon, key: &str, args: &[&str], rows: u16, cols: u16) -> Term {
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).unwrap();
        let slave = pty.slave;
        let mut cmd = d.command_as(key, args);
        cmd.env("TERM", "dumb")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()));
        // SAFETY: between fork and exec only async-signal-safe calls: setsid and ioctl.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(slave);
        let flags = nix::fcntl::fcntl(&pty.master, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        nix::fcntl::fcntl(
            &pty.master,
            nix::fcntl::FcntlArg::F_SETFL(
                nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK,
            ),
        )
        .unwrap();
        Term {
            child,
            master: pty.master,
            seen: Vec::new(),
            from: 0,
        }
    }

    fn type_(&mut self, s: &str) {
        let mut at = 0;
        let b = s.as_bytes();
        while at < b.len() {
            match nix::unistd::write(&self.master, &b[at..]) {
                Ok(n) => at += n,
                Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("typing into the terminal: {e}"),
            }
        }
    }

    /// Reads what the terminal shows for up to `wait`; false when the CLI's side is gone.
    fn pump(&mut self, wait: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(wait.as_millis() as i32).unwrap();
        if poll(&mut fds, ms).unwrap_or(0) == 0 {
            return true;
        }
        let mut buf = [0u8; 8192];
        match nix::unistd::read(&self.master, &mut buf) {
            Ok(0) | Err(nix::errno::Errno::EIO) => false,
            Ok(n) => {
                self.seen.extend_from_slice(&buf[..n]);
                true
            }
            Err(_) => true,
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.seen[self.from..]).into_owned()
    }

    /// Waits until `text` shows on the screen after what earlier calls matched; moves past it.
    fn expect(&mut self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = String::from_utf8_lossy(&self.seen[self.from..]).into_owned();
            if let Some(i) = s.find(text) {
                // `i` is in the lossy string; the screen is ASCII here.
                self.from += (i + text.len()).min(self.seen.len() - self.from);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never showed; the screen after the last match:\n{s}"
            );
            if !self.pump(Duration::from_millis(200)) {
                let s = self.screen();
                assert!(
                    s.contains(text),
                    "the CLI ended before {text:?} showed:\n{s}"
                );
            }
        }
    }

    /// Waits for the CLI to exit (reading its screen meanwhile) and returns its status.
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // What it printed last is still in the terminal.
                loop {
                    let before = self.seen.len();
                    if !self.pump(Duration::from_millis(50)) || self.seen.len() == before {
                        break;
                    }
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the CLI did not exit; screen:\n{}",
                self.screen()
            );
            self.pump(Duration::from_millis(100));
        }
    }

    /// Local mode flags of the outer terminal (raw mode clears ICANON and ECHO).
    fn lflags(&self) -> nix::sys::termios::LocalFlags {
        nix::sys::termios::tcgetattr(&self.master)
            .unwrap()
            .local_flags
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live pointer.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
        // The kernel signals the terminal's foreground group; say it once more to the CLI in
        // case it is not that group's leader.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGWINCH,
        );
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids in instance `id` whose command line is exactly `argv`.
fn pids_running(id: &str, argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    instance_pids(id)
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default() == want)
        .collect()
}

/// Waits until `cond` holds (a hang guard: PATIENCE at most).
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: never happened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Exec processes of this daemon: exec shims and `runc exec` under our data dir.
fn exec_helpers(d: &Daemon) -> Vec<String> {
    let data = d.data().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let s = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if s.contains(&data) && (s.contains("exec-shim") || s.contains(" exec ")) {
            out.push(format!("{}: {s}", e.file_name().to_string_lossy()));
        }
    }
    out
}

/// Files an exec session leaves in the instance's bundle while it runs.
fn exec_files(d: &Daemon, id: &str) -> Vec<String> {
    std::fs::read_dir(d.data().join("bundles").join(id))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("exec-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The shell prompt the tests set, so that a prompt is recognisable on the screen.
const PS1: &str = "PS1=gv$ ";

/// A shell on a real terminal: typed commands run and their output shows; the window size is
/// the outer terminal's and follows a resize; ^C interrupts the foreground command (the shell
/// survives; the command's status is 130); `exit 7` is the CLI's exit status; the outer
/// terminal is out of raw mode again afterwards.
#[test]
fn terminal_session_types_resizes_interrupts_and_exits() {
    let _s = serial();
    let d = daemon(&[]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let key = d.key.clone();
    let mut t = Term::spawn(
        &d,
        &key,
        &["instance", "exec", "-it", "-e", PS1, &id, "--", "sh"],
        24,
        80,
    );
    t.expect("gv$ ");
    assert!(
        !t.lflags().contains(nix::sys::termios::LocalFlags::ICANON),
        "the CLI left the outer terminal in canonical mode while the session runs"
    );
    t.type_("echo hello-$((6*7))\r");
    t.expect("hello-42");
    t.expect("gv$ ");
    t.type_("stty size\r");
    t.expect("24 80");
    t.expect("gv$ ");

    // Resize: the shell sees the new size (the resize travels ahead of later keys).
    t.resize(40, 132);
    t.type_("stty size\r");
    t.expect("40 132");
    t.expect("gv$ ");

    // ^C reaches the remote line discipline: the sleep dies of SIGINT, the shell lives on.
    t.type_("sleep 4242\r");
    until("sleep 4242 runs in the instance", || {
        !pids_running(&id, &["sleep", "4242"]).is_empty()
    });
    t.type_("\x03");
    until("^C ends sleep 4242", || {
        pids_running(&id, &["sleep", "4242"]).is_empty()
    });
    t.expect("gv$ ");
    t.type_("echo status=$?\r");
    t.expect("status=130");
    t.expect("gv$ ");

    t.type_("exit 7\r");
    let st = t.wait();
    let exit7 = t.screen();
    assert_eq!(st.code(), Some(7), "screen:\n{exit7}");
    let lf = t.lflags();
    assert!(
        lf.contains(nix::sys::termios::LocalFlags::ICANON | nix::sys::termios::LocalFlags::ECHO),
        "the outer terminal was left in raw mode: {lf:?}"
    );
    until("the session's files and helpers are gone", || {
        exec_files(&d, &id).is_empty() && exec_helpers(&d).is_empty()
    });

    // A command the image does not have: the runtime's complaint, a failing status, and
    // nothing left behind.
    let mut t = Term::spawn(
        &d,
        &key,
        &["instance", "exec", "-it", &id, "--", "no-such-command"],
        24,
        80,
    );
    let st = t.wait();
    let screen = t.screen();
    assert_eq!(st.code(), Some(255), "{screen}");
    assert!(screen.contains("no-such-command"), "{screen}");
    until("the failed session's files and helpers are gone", || {
        exec_files(&d, &id).is_empty() && exec_helpers(&d).is_empty()
    });
    // A command that is over at once still gives its status.
    let mut t = Term::spawn(
        &d,
        &key,
        &["instance", "exec", "-it", &id, "--", "sh", "-c", "exit 3"],
        24,
        80,
    );
    assert_eq!(t.wait().code(), Some(3), "{}", t.screen());
}

/// Killing the CLI mid-session (as a dropped network or a closed laptop would end it) kills
/// the command's whole process tree in the instance, removes the session's files and frees
/// its exec slot — on a terminal and on pipes.
#[test]
fn a_client_that_goes_away_leaves_nothing_running() {
    let _s = serial();
    let d = daemon(&["--exec-per-tenant", "1"]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let key = d.key.clone();

    // On a terminal: a shell with a child of its own.
    let mut t = Term::spawn(
        &d,
        &key,
        &["instance", "exec", "-it", "-e", PS1, &id, "--", "sh"],
        24,
        80,
    );
    t.expect("gv$ ");
    t.type_("sleep 4343 & sleep 4344\r");
    until("both sleeps run", || {
        !pids_running(&id, &["sleep", "4343"]).is_empty()
            && !pids_running(&id, &["sleep", "4344"]).is_empty()
    });
    // The session holds the tenant's only exec slot.
    let (code, _, err) = d.exec(&id, "true");
    assert_eq!(code, 10, "a second exec past exec_per_tenant=1: {err}");
    let _ = t.child.kill();
    let _ = t.child.wait();
    until("the shell and both sleeps are gone", || {
        pids_running(&id, &["sleep", "4343"]).is_empty()
            && pids_running(&id, &["sleep", "4344"]).is_empty()
            && pids_running(&id, &["sh"]).is_empty()
    });
    until("the session's files and helpers are gone", || {
        exec_files(&d, &id).is_empty() && exec_helpers(&d).is_empty()
    });
    until("the exec slot is free again", || d.exec(&id, "true").0 == 0);

    // On pipes.
    let mut c = d
        .command_as(&key, ["instance", "exec", "-i", &id, "--", "sleep", "4545"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    until("sleep 4545 runs", || {
        !pids_running(&id, &["sleep", "4545"]).is_empty()
    });
    let _ = c.kill();
    let _ = c.wait();
    until("sleep 4545 is gone", || {
        pids_running(&id, &["sleep", "4545"]).is_empty()
    });
    until("the exec slot is free again", || d.exec(&id, "true").0 == 0);
    assert!(exec_files(&d, &id).is_empty(), "{:?}", exec_files(&d, &id));
}

/// A daemon that dies mid-session (SIGKILL) takes the session's command with it: the exec
/// shim's parent-death signal kills the command's tree. The CLI says the session was cut and
/// gives its terminal back.
#[test]
fn a_daemon_that_dies_takes_its_terminal_sessions_with_it() {
    let _s = serial();
    let mut d = daemon(&[]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let key = d.key.clone();
    let mut t = Term::spawn(
        &d,
        &key,
        &["instance", "exec", "-it", "-e", PS1, &id, "--", "sh"],
        24,
        80,
    );
    t.expect("gv$ ");
    // Deaf to the terminal's hangup (the pty closes with the daemon): only a kill ends it.
    t.type_("trap '' HUP; sleep 4747\r");
    until("sleep 4747 runs", || {
        !pids_running(&id, &["sleep", "4747"]).is_empty()
    });
    d.kill9();
    until("sleep 4747 is gone with the daemon", || {
        pids_running(&id, &["sleep", "4747"]).is_empty()
    });
    let st = t.wait();
    assert_eq!(st.code(), Some(1), "screen:\n{}", t.screen());
    t.expect("cut");
    assert!(t
        .lflags()
        .contains(nix::sys::termios::LocalFlags::ICANON | nix::sys::termios::LocalFlags::ECHO));
    // The shim exits once it has reaped what it killed (it may still be at it here).
    until("the exec helpers are gone with the daemon", || {
        exec_helpers(&d).is_empty()
    });
    // Back up, so that the instance is cleaned away as usual.
    d.restart();
}

/// `-i` without a terminal: stdin arrives byte for byte (every byte value, more than one
/// message's worth), stdin's end is the command's end of file, stdout and stderr stay apart,
/// and the exit status comes back.
#[test]
fn piped_input_arrives_exactly() {
    let _s = serial();
    // A session that never sees its input's end is idle, then ended: a failure, not a hang.
    let d = daemon(&["--exec-session-idle-timeout", "20s"]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let input: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let run = |cmd: &[&str], input: &[u8]| {
        let mut a = vec!["instance", "exec", "-i", id.as_str(), "--"];
        a.extend(cmd);
        let mut c = d
            .command_as(&d.key, &a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = c.stdin.take().unwrap();
        let data = input.to_vec();
        let writer = std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
        });
        let mut out = Vec::new();
        c.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let mut err = Vec::new();
        c.stderr.take().unwrap().read_to_end(&mut err).unwrap();
        writer.join().unwrap();
        (c.wait().unwrap().code(), out, err)
    };
    let (code, out, err) = run(&["wc", "-c"], &input);
    assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&err));
    assert_eq!(String::from_utf8_lossy(&out).trim(), "300000");
    let (code, out, _) = run(&["cat"], &input);
    assert_eq!(code, Some(0));
    assert!(
        out == input,
        "cat gave back {} bytes, not the same",
        out.len()
    );
    let (code, out, err) = run(
        &["sh", "-c", "cat >/dev/null; echo out; echo err >&2; exit 3"],
        b"x",
    );
    assert_eq!(code, Some(3));
    assert_eq!(String::from_utf8_lossy(&out), "out\n");
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
}

/// The WebSocket handshake itself, raw: (status line, body).
fn handshake(port: u16, key: &str, id: &str, request: &str) -> (u16, String) {
    let (status, body, _) = open_raw(port, key, id, request);
    (status, body)
}

/// A raw WebSocket handshake: (status, body, the connection — a session when 101).
fn open_raw(port: u16, key: &str, id: &str, request: &str) -> (u16, String, common::ApiStream) {
    let mut s = common::connect(port);
    s.tcp().set_read_timeout(Some(PATIENCE)).unwrap();
    let enc: String = request
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let req = format!(
        "GET /v1/instances/{id}/exec/ws?request={enc} HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let mut body = String::new();
    if status != 101 {
        let _ = s.read_to_string(&mut body);
    }
    (status, body, s)
}

/// Whether the daemon answers a plain request on a new connection (false: it closed the
/// connection at once, as it does past the per-address cap).
fn answers(port: u16) -> bool {
    let Some(mut s) = common::try_connect(port) else {
        return false;
    };
    s.tcp().set_read_timeout(Some(PATIENCE)).unwrap();
    if s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// A client that opens a terminal session running `yes` and never reads: once a message has
/// waited the liveness period (3 s here) to leave, the client is taken for gone, the session
/// ends and `yes` is killed. While they are open, sessions count against the per-address
/// connection cap (an upgraded connection keeps its place until it closes).
#[test]
fn a_client_that_does_not_read_is_cut_off_and_sessions_hold_their_connection_places() {
    let _s = serial();
    let d = daemon(&[
        "--exec-session-liveness",
        "3s",
        "--max-connections-per-ip",
        "2",
    ]);
    d.import_busybox();
    let id = d.create(&sleeper());
    // A well-behaved session (it reads, and answers pings) on one place...
    let url = format!(
        "{}/v1/instances/{id}/exec/ws?request=%7B%22command%22%3A%5B%22sleep%22%2C%224848%22%5D%7D",
        d.endpoint().replacen("http", "ws", 1)
    );
    let builder = tungstenite::ClientRequestBuilder::new(url.parse().unwrap())
        .with_header("x-api-key", d.key.clone());
    let stream = common::connect(d.port);
    let tcp = stream.tcp().try_clone().unwrap();
    let (mut ws, _) = tungstenite::client::client(builder, stream).unwrap();
    let reader = std::thread::spawn(move || while ws.read().is_ok() {});
    until("sleep 4848 runs", || {
        !pids_running(&id, &["sleep", "4848"]).is_empty()
    });
    // ...and one that never reads on the other.
    let (status, body, deaf) = open_raw(d.port, &d.key, &id, r#"{"command":["yes"],"tty":true}"#);
    assert_eq!(status, 101, "{body}");
    until("yes runs", || !pids_running(&id, &["yes"]).is_empty());
    assert!(
        !answers(d.port),
        "a third connection from this address was served while two sessions were open (cap 2)"
    );
    until(
        "the session that does not read is ended and yes killed",
        || pids_running(&id, &["yes"]).is_empty(),
    );
    until("its connection place is free again", || answers(d.port));
    assert!(
        !pids_running(&id, &["sleep", "4848"]).is_empty(),
        "the session whose client reads was ended too"
    );
    drop(deaf);
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    reader.join().unwrap();
    until("sleep 4848 is gone", || {
        pids_running(&id, &["sleep", "4848"]).is_empty()
    });
}

/// Another tenant's key cannot open a session on an instance it does not own (404, as on
/// every instance route), through the CLI or a raw handshake; platform-owned environment is
/// refused as for any exec; the owner's handshake is accepted.
#[test]
fn another_tenant_cannot_attach() {
    let _s = serial();
    let d = daemon(&[]);
    d.import_busybox();
    d.json(&["tenant", "create", "alice"]);
    d.json(&["tenant", "create", "mallory"]);
    let alice = d.json(&["key", "create", "--tenant", "alice"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mallory = d.json(&["key", "create", "--tenant", "mallory"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let id = d.create_as(&alice, &sleeper());
    let req = r#"{"command":["sh"],"tty":true,"stdin":true}"#;
    let (status, body) = handshake(d.port, &mallory, &id, req);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not_found"), "{body}");
    let out = d.cli_as(&mallory, &["instance", "exec", "-i", &id, "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = handshake(
        d.port,
        &alice,
        &id,
        r#"{"command":["true"],"env":["CUDA_VISIBLE_DEVICES=0,1"]}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("CUDA_VISIBLE_DEVICES"), "{body}");
    let (status, body) = handshake(d.port, &alice, &id, req);
    assert_eq!(status, 101, "{body}");
}

/// The session bounds: a session with no input and no output for the idle timeout is ended
/// (the command killed, a message saying why).
#[test]
fn an_idle_session_is_ended() {
    let _s = serial();
    let d = daemon(&["--exec-session-idle-timeout", "2s"]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let mut c = d
        .command_as(
            &d.key,
            ["instance", "exec", "-i", &id, "--", "sleep", "4646"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stdin stays open: only the idle bound can end this.
    let _stdin = c.stdin.take();
    let mut st = None;
    until("the idle session ends", || {
        st = c.try_wait().unwrap();
        st.is_some()
    });
    let st = st.unwrap();
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(st.code(), Some(137), "{err}");
    assert!(err.contains("idle"), "{err}");
    until("sleep 4646 is gone", || {
        pids_running(&id, &["sleep", "4646"]).is_empty()
    });
}

/// Input typed ahead of a command that reads it late: while it waits, the daemon does not read
/// the socket (back pressure), so the client's pongs wait too — that silence is not the client
/// going away. Here the liveness period is 2 s and the command starts reading after 6 s.
#[test]
fn input_waiting_for_a_slow_reader_does_not_end_the_session() {
    let _s = serial();
    let d = daemon(&["--exec-session-liveness", "2s"]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let input = vec![b'x'; 8 << 20];
    let mut c = d
        .command_as(
            &d.key,
            [
                "instance",
                "exec",
                "-i",
                &id,
                "--",
                "sh",
                "-c",
                "sleep 6; wc -c",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    writer.join().unwrap();
    assert_eq!(c.wait().unwrap().code(), Some(0), "{err}");
    assert_eq!(out.trim(), (8 << 20).to_string(), "{err}");
}

/// The daemon's zombie sweep (every second here) leaves alone the children the daemon waits
/// for itself: a `runc exec` whose command left a background child holding its output stays
/// a zombie until the output closes, and its status is still the command's — one-shot and
/// on pipes alike.
#[test]
fn the_zombie_sweep_leaves_exec_statuses_alone() {
    let _s = serial();
    let d = daemon(&["--sweep-every", "1s"]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let (code, _, err) = d.exec(&id, "(sleep 5) & exit 3");
    assert_eq!(code, 3, "one-shot exec: {err}");
    let out = d.cli_as(
        &d.key,
        &[
            "instance",
            "exec",
            "-i",
            &id,
            "--",
            "sh",
            "-c",
            "(sleep 5) & exit 3",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "session on pipes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An exec shim that dies (the OOM killer, or a kill by hand) before its command: the command
/// is killed rather than left running unwatched, and the client is told the shim died (137),
/// not that the command could not start.
#[test]
fn a_dead_shim_takes_its_command_with_it() {
    let _s = serial();
    let d = daemon(&[]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let key = d.key.clone();
    let mut t = Term::spawn(
        &d,
        &key,
        &["instance", "exec", "-it", "-e", PS1, &id, "--", "sh"],
        24,
        80,
    );
    t.expect("gv$ ");
    t.type_("sleep 4949\r");
    until("sleep 4949 runs", || {
        !pids_running(&id, &["sleep", "4949"]).is_empty()
    });
    let shims: Vec<i32> = exec_helpers(&d)
        .iter()
        .filter(|h| h.contains("exec-shim"))
        .filter_map(|h| h.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(shims.len(), 1, "{:?}", exec_helpers(&d));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = t.wait();
    let screen = t.screen();
    assert_eq!(st.code(), Some(137), "screen:\n{screen}");
    assert!(screen.contains("shim was killed"), "{screen}");
    until("sleep 4949 and the shell are gone", || {
        pids_running(&id, &["sleep", "4949"]).is_empty() && pids_running(&id, &["sh"]).is_empty()
    });
}

/// A daemon that dies mid-session takes a `-i` session's command (no terminal) with it too:
/// pipes sessions run through the exec shim, whose parent-death signal kills the tree.
#[test]
fn a_daemon_that_dies_takes_its_pipe_sessions_with_it() {
    let _s = serial();
    let mut d = daemon(&[]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let mut c = d
        .command_as(
            &d.key,
            [
                "instance",
                "exec",
                "-i",
                &id,
                "--",
                "sh",
                "-c",
                "trap '' HUP TERM; sleep 5151",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until("sleep 5151 runs", || {
        !pids_running(&id, &["sleep", "5151"]).is_empty()
    });
    d.kill9();
    until("sleep 5151 is gone with the daemon", || {
        pids_running(&id, &["sleep", "5151"]).is_empty()
    });
    let _ = c.kill();
    let _ = c.wait();
    until("no exec helper is left", || exec_helpers(&d).is_empty());
    d.restart();
}

/// A session whose instance is stopped or terminated under it ends with a message that says
/// so, not a bare 137.
#[test]
fn a_session_says_when_its_instance_was_stopped_or_terminated() {
    let _s = serial();
    let d = daemon(&[]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let session = |id: &str| {
        d.command_as(
            &d.key,
            ["instance", "exec", "-i", id, "--", "sleep", "5353"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let ended = |mut c: Child| {
        let _stdin = c.stdin.take();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (c.wait().unwrap().code(), err)
    };
    let c = session(&id);
    until("sleep 5353 runs", || {
        !pids_running(&id, &["sleep", "5353"]).is_empty()
    });
    d.json(&["instance", "stop", &id, "--wait"]);
    let (code, err) = ended(c);
    assert_eq!(code, Some(137), "{err}");
    assert!(err.contains("instance was stopped"), "{err}");

    d.json(&["instance", "start", &id, "--wait"]);
    let c = session(&id);
    until("sleep 5353 runs again", || {
        !pids_running(&id, &["sleep", "5353"]).is_empty()
    });
    d.json(&["instance", "terminate", &id, "--wait"]);
    let (code, err) = ended(c);
    assert_eq!(code, Some(137), "{err}");
    assert!(err.contains("instance was terminated"), "{err}");
}

/// Signals sent to the CLI with `kill` while the terminal is raw: SIGTSTP stops it with the
/// terminal given back (canonical mode, echo) and SIGCONT makes it raw again, the session
/// still working; SIGINT ends it (130) with the terminal restored.
#[test]
fn signals_sent_to_the_client_never_leave_the_terminal_raw() {
    let _s = serial();
    let d = daemon(&[]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let key = d.key.clone();
    let mut t = Term::spawn(
        &d,
        &key,
        &["instance", "exec", "-it", "-e", PS1, &id, "--", "sh"],
        24,
        80,
    );
    t.expect("gv$ ");
    let cli = nix::unistd::Pid::from_raw(t.child.id() as i32);
    let cooked = nix::sys::termios::LocalFlags::ICANON | nix::sys::termios::LocalFlags::ECHO;
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{cli}/stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('T')))
            .unwrap_or(false)
    };
    nix::sys::signal::kill(cli, nix::sys::signal::Signal::SIGTSTP).unwrap();
    until("the CLI stops", stopped);
    assert!(t.lflags().contains(cooked), "stopped with the terminal raw");
    nix::sys::signal::kill(cli, nix::sys::signal::Signal::SIGCONT).unwrap();
    until("the terminal is raw again", || {
        !t.lflags().contains(nix::sys::termios::LocalFlags::ICANON)
    });
    t.type_("echo back-$((2*21))\r");
    t.expect("back-42");
    t.expect("gv$ ");
    nix::sys::signal::kill(cli, nix::sys::signal::Signal::SIGINT).unwrap();
    let st = t.wait();
    assert_eq!(st.code(), Some(130), "{}", t.screen());
    assert!(t.lflags().contains(cooked), "SIGINT left the terminal raw");
}

/// The other session bounds: bytes (input and output together) and the deadline a request
/// asks for — each kills the command and says why.
#[test]
fn the_byte_cap_and_the_deadline_end_a_session() {
    let _s = serial();
    let d = daemon(&["--exec-session-max-bytes", "64KiB"]);
    d.import_busybox();
    let id = d.create(&sleeper());
    let run = |args: &[&str]| {
        let mut a = vec!["instance", "exec", "-i"];
        a.extend(args);
        let mut c = d
            .command_as(&d.key, &a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _stdin = c.stdin.take();
        let mut out = Vec::new();
        c.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (c.wait().unwrap().code(), out.len(), err)
    };
    let (code, n, err) = run(&[&id, "--", "sh", "-c", "yes | head -c 1000000"]);
    assert_eq!(code, Some(137), "{err}");
    assert!(n <= 64 << 10, "{n} bytes passed a 64 KiB cap");
    assert!(err.contains("exec_session_max_bytes"), "{err}");
    let (code, _, err) = run(&["--timeout", "2s", &id, "--", "sleep", "5454"]);
    assert_eq!(code, Some(124), "{err}");
    assert!(err.contains("deadline"), "{err}");
    until("sleep 5454 is gone", || {
        pids_running(&id, &["sleep", "5454"]).is_empty()
    });
}

/// A session lives no longer than its key: revoking the key that opened it ends it (the client
/// gets a close saying why) and kills its command, within a liveness tick.
#[test]
fn revoking_the_key_ends_its_sessions() {
    let _s = serial();
    // The raw client below answers no pings: 10 s of silence allowed (a tick every 2.5 s),
    // well past the revoke.
    let d = daemon(&["--exec-session-liveness", "10s"]);
    d.import_busybox();
    d.json(&["tenant", "create", "acme"]);
    let k = d.json(&["key", "create", "--tenant", "acme"]);
    let (key, key_id) = (
        k["secret"].as_str().unwrap().to_string(),
        k["key"]["id"].as_str().unwrap().to_string(),
    );
    let id = d.create_as(&key, &sleeper());
    let (status, body, mut s) = open_raw(
        d.port,
        &key,
        &id,
        r#"{"command":["sleep","4849"],"tty":true}"#,
    );
    assert_eq!(status, 101, "{body}");
    until("sleep 4849 runs", || {
        !pids_running(&id, &["sleep", "4849"]).is_empty()
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !pids_running(&id, &["sleep", "4849"]).is_empty(),
        "ended before the revoke"
    );
    d.json(&["key", "revoke", &key_id]);
    // The daemon closes: read to the end (the close frame, then EOF).
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + PATIENCE;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        assert!(
            Instant::now() < deadline,
            "the session outlived its revoked key"
        );
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("revoked"),
        "no reason given: {:?}",
        String::from_utf8_lossy(&seen)
    );
    until("its command is killed", || {
        pids_running(&id, &["sleep", "4849"]).is_empty()
    });
}
