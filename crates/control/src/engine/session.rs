//! Interactive exec sessions (`instance exec -i/-t`): input streamed in, output streamed out,
//! on a terminal or on pipes, until the command ends, the client goes away, or a bound is hit.
//!
//! A session is an exec like any other for the limits: it takes a place in the same per-tenant
//! and total concurrency gate (held until the command is dead), and it is bounded by bytes
//! (input and output together, `session_max_bytes`), an idle timeout (no input and no output)
//! and a total deadline, all killing the command's process tree when hit. The front end talks
//! to it through two channels ([`ExecSession`]); dropping them is the client going away, which
//! kills the command too. No HTTP here: the API maps WebSocket messages onto the channels.
//!
//! On a terminal the node layer's exec shim runs `runc exec --detach --tty` and the pty master
//! comes back over a console socket ([`gpuvisor_node::console`]); its exit status is the
//! shim's `exit N` line. On pipes the shim runs `runc exec` in the foreground on its own
//! stdio and exits with the command's status; on both, the shim kills the command's tree when
//! the daemon dies.

use super::authz::Op;
use super::limits::{read_some, ExecPermit};
use super::{Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use gpuvisor_node::Node;
use gpuvisor_wire::{self as wire, session::Size};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{unix::AsyncFd, Interest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// From the client to the command.
#[derive(Debug)]
pub enum SessionInput {
    Stdin(Vec<u8>),
    /// The client's input ended: the command's stdin is closed (on a terminal: ignored).
    Eof,
    Resize(Size),
}

/// From the command to the client; `End` is last.
#[derive(Debug)]
pub enum SessionOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    End(wire::ExecEnd),
}

/// A running session. Dropping it (both ends) is the client going away: the command is killed.
pub struct ExecSession {
    pub input: mpsc::Sender<SessionInput>,
    pub output: mpsc::Receiver<SessionOutput>,
}

/// A session that passed every check and holds its place in the exec gate, not started yet
/// (the API answers errors up to here as plain HTTP errors, then upgrades and starts it).
pub struct SessionTicket {
    node: Arc<Node>,
    store: crate::store::Store,
    id: String,
    req: wire::ExecSessionRequest,
    permit: ExecPermit,
    bounds: Bounds,
}

#[derive(Debug, Clone, Copy)]
struct Bounds {
    max_bytes: u64,
    idle: Duration,
    total: Duration,
}

/// How long the runtime has to hand over the terminal.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most bytes of one data message.
const CHUNK: usize = 32 * 1024;

impl Engine {
    /// Checks and admits an interactive exec of `req.command` in instance `id` (the caller's,
    /// running): the same rules as [`Engine::exec`] (environment, tenancy, state), a place in
    /// the exec gate (`resource_exhausted` when the tenant or the daemon runs as many execs as
    /// allowed), a deadline within `session_max_time`. [`SessionTicket::start`] starts it.
    pub async fn exec_session(
        &self,
        who: &Principal,
        id: &str,
        req: &wire::ExecSessionRequest,
    ) -> Result<SessionTicket> {
        who.allow(Op::ExecSession)?;
        let row = self.exec_target(who, id, &req.command, &req.env).await?;
        let l = self.limits().exec;
        let total = match req.timeout_ms {
            None => l.session_max_time,
            Some(0) => return Err(invalid("exec timeout must be positive")),
            Some(ms) if Duration::from_millis(ms) > l.session_max_time => {
                return Err(invalid(format!(
                    "session timeout {ms} ms is over the daemon's maximum of {} ms (exec_session_max_time)",
                    l.session_max_time.as_millis()
                )))
            }
            Some(ms) => Duration::from_millis(ms),
        };
        let permit = self.exec_permit(who, &l, &row.id)?;
        Ok(SessionTicket {
            node: self.node.clone(),
            store: self.store.clone(),
            id: row.id,
            req: req.clone(),
            permit,
            bounds: Bounds {
                max_bytes: l.session_max_bytes,
                idle: l.session_idle_timeout,
                total,
            },
        })
    }
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Internal(format!("{what}: {e}"))
}

impl SessionTicket {
    /// Starts the command; errors (the runtime refused, no terminal came) leave nothing
    /// running.
    pub async fn start(self) -> Result<ExecSession> {
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(16);
        let activity = Arc::new(Activity::default());
        let init = {
            let (node, id) = (self.node.clone(), self.id.clone());
            tokio::task::spawn_blocking(move || {
                gpuvisor_node::reap::init(&node, &id).map(|i| i.pid)
            })
            .await
            .ok()
            .flatten()
        };
        let run = Run {
            node: self.node.clone(),
            store: self.store.clone(),
            init,
            id: self.id.clone(),
            bounds: self.bounds,
            activity: activity.clone(),
            started: Instant::now(),
        };
        if self.req.tty {
            let tty = self.start_tty(&run).await?;
            let (permit, stdin) = (self.permit, self.req.stdin);
            tokio::spawn(async move {
                tty.run(run, stdin, in_rx, out_tx).await;
                drop(permit);
            });
        } else {
            // Through the shim, not killed on drop: as on a terminal, the shim kills the
            // command's tree when the daemon goes (a `runc exec` killed with the daemon would
            // leave its command running).
            let (cmd, pid_file) =
                self.node
                    .exec_pipes_command(&self.id, &self.req.command, &self.req.env, true)?;
            let child = tokio::process::Command::from(cmd)
                .spawn()
                .map_err(internal("cannot start the exec shim"))?;
            let waited = gpuvisor_node::reap::Waited::new(child.id());
            let pipes = Pipes { child, pid_file };
            let (permit, stdin) = (self.permit, self.req.stdin);
            tokio::spawn(async move {
                pipes.run(run, stdin, in_rx, out_tx).await;
                drop((permit, waited));
            });
        }
        Ok(ExecSession {
            input: in_tx,
            output: out_rx,
        })
    }

    /// Runs the shim and waits for the runtime to hand over the pty master.
    async fn start_tty(&self, run: &Run) -> Result<Tty> {
        let mut exec = self
            .node
            .exec_tty_command(&self.id, &self.req.command, &self.req.env)?;
        let listener = exec
            .socket
            .take_listener()
            .ok_or_else(|| EngineError::Internal("console socket already taken".into()))?;
        listener
            .set_nonblocking(true)
            .map_err(internal("console socket"))?;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(internal("console socket"))?;
        // Not killed on drop: a SIGKILLed shim would leave its command running, orphaned. The
        // session kills the command's tree itself, and when the daemon exits (a shutdown drops
        // every task) the shim's parent-death signal makes it do so.
        let mut shim = tokio::process::Command::from(exec.shim)
            .spawn()
            .map_err(internal("cannot start the exec shim"))?;
        // Waited for by this session: not the zombie sweep's to reap.
        let waited = gpuvisor_node::reap::Waited::new(shim.id());
        let mut stderr = shim.stderr.take();
        let got = tokio::select! {
            biased;
            m = accept_master(&listener) => m.map_err(internal("receiving the terminal")),
            // A quick command may be over, and the shim gone, before we accepted: the
            // terminal is then waiting in the socket's backlog.
            Ok(st) = shim.wait() => if st.success() {
                tokio::time::timeout(Duration::from_secs(5), accept_master(&listener))
                    .await
                    .map_err(|_| EngineError::Internal(
                        "the OCI runtime started the command but sent no terminal".into(),
                    ))
                    .and_then(|m| m.map_err(internal("receiving the terminal")))
            } else {
                let mut msg = String::new();
                if let Some(e) = stderr.as_mut() {
                    let _ = e.take(64 << 10).read_to_string(&mut msg).await;
                }
                Err(EngineError::InvalidState(format!(
                    "the OCI runtime could not start the command: {}",
                    msg.trim()
                )))
            },
            _ = tokio::time::sleep(CONSOLE_TIMEOUT) => Err(EngineError::Internal(
                "the OCI runtime did not hand over a terminal in time".into(),
            )),
        };
        // The socket file goes now, whatever happened.
        drop(listener);
        drop(exec.socket);
        let master = match got {
            Ok(m) => m,
            Err(e) => {
                kill_tree(run, &exec.pid_file, &mut shim).await;
                return Err(e);
            }
        };
        if let Some(s) = self.req.size {
            let _ = gpuvisor_node::console::set_window_size(master.as_fd(), s.rows, s.cols);
        }
        let master = nonblocking(master)
            .and_then(|fd| {
                // SAFETY: an `OwnedFd` is a valid open descriptor that stays the same file
                // until it is dropped, which only the `AsyncFd` can do.
                unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
            })
            .map_err(internal("terminal"));
        let master = match master {
            Ok(m) => Arc::new(m),
            Err(e) => {
                kill_tree(run, &exec.pid_file, &mut shim).await;
                return Err(e);
            }
        };
        // The runtime may still fail after it handed over the terminal (a command the image
        // does not have): what it says then is the session's last message. Kept bounded, the
        // rest drained.
        let complaint = stderr.map(|mut e| {
            tokio::spawn(async move {
                let mut msg = String::new();
                let _ = (&mut e).take(64 << 10).read_to_string(&mut msg).await;
                let _ = tokio::io::copy(&mut e, &mut tokio::io::sink()).await;
                msg
            })
        });
        Ok(Tty {
            master,
            shim,
            _waited: waited,
            complaint,
            pid_file: exec.pid_file,
        })
    }
}

async fn accept_master(l: &tokio::net::UnixListener) -> std::io::Result<OwnedFd> {
    let (conn, _) = l.accept().await?;
    conn.async_io(Interest::READABLE, || {
        gpuvisor_node::console::recv_master(conn.as_fd())
    })
    .await
}

fn nonblocking(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(fd)
}

/// Bytes moved and the last time anything moved (ms since the session started).
#[derive(Default)]
struct Activity {
    bytes: AtomicU64,
    last_ms: AtomicU64,
}

/// What every session shares: where it runs, its bounds, its activity.
struct Run {
    node: Arc<Node>,
    store: crate::store::Store,
    /// The instance's init when the session started (a session outlived by a restart of the
    /// instance says so).
    init: Option<i32>,
    id: String,
    bounds: Bounds,
    activity: Arc<Activity>,
    started: Instant,
}

/// Why a session ended.
enum Ended {
    /// The command ended by itself.
    Exited,
    /// The runtime could not start it (the message says why).
    Failed(String),
    Limit(wire::ExecLimit),
    /// The client went away.
    Cancelled,
}

impl Run {
    /// Counts `n` bytes moved now; false once the session is over its byte cap.
    fn moved(&self, n: usize) -> bool {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.last_ms.fetch_max(ms, Ordering::Relaxed);
        let total = self.activity.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        total <= self.bounds.max_bytes
    }

    /// When the session is idle if nothing moves before.
    fn idle_at(&self) -> Instant {
        let last = Duration::from_millis(self.activity.last_ms.load(Ordering::Relaxed));
        self.started + last + self.bounds.idle
    }

    fn deadline(&self) -> Instant {
        self.started + self.bounds.total
    }

    /// Waits until a bound of time is hit.
    async fn timed_out(&self) -> wire::ExecLimit {
        loop {
            let (idle, deadline) = (self.idle_at(), self.deadline());
            if deadline <= idle {
                tokio::time::sleep_until(deadline).await;
                return wire::ExecLimit::Deadline;
            }
            tokio::time::sleep_until(idle).await;
            if self.idle_at() <= Instant::now() {
                return wire::ExecLimit::Idle;
            }
        }
    }

    /// Sends output; false when the client is gone. A client that does not read blocks the
    /// command (back pressure), within the session's bounds of time.
    async fn send(&self, tx: &mpsc::Sender<SessionOutput>, o: SessionOutput) -> Option<Ended> {
        tokio::select! {
            r = tx.send(o) => r.err().map(|_| Ended::Cancelled),
            l = self.timed_out() => Some(Ended::Limit(l)),
        }
    }

    /// Sends the last message: the exit status and, when the daemon ended the command, why.
    async fn finish(&self, tx: mpsc::Sender<SessionOutput>, ended: Ended, exit_code: i32) {
        let (limit, message) = match ended {
            Ended::Cancelled => {
                tracing::debug!(instance = %self.id, "exec session client went away: command killed");
                return;
            }
            // Killed by a signal: maybe with its instance.
            Ended::Exited if exit_code > 128 => (None, self.instance_ended().await),
            Ended::Exited => (None, None),
            Ended::Failed(m) => (None, Some(m)),
            Ended::Limit(l) => (Some(l), Some(self.limit_message(l))),
        };
        let end = wire::ExecEnd {
            exit_code,
            limit,
            message,
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(5), tx.send(SessionOutput::End(end))).await;
    }

    /// Why the command died with its instance, when it did: the instance was stopped,
    /// terminated, interrupted, or its main process ended (a restart).
    async fn instance_ended(&self) -> Option<String> {
        use wire::InstanceState as S;
        let row = self.store.instance(&self.id).await.ok().flatten();
        let why = match row.as_ref().map(|r| (r.desired, r.state)) {
            None | Some((S::Terminated, _) | (_, S::Terminating | S::Terminated)) => {
                "the instance was terminated"
            }
            Some((S::Stopped, _) | (_, S::Stopping | S::Stopped)) => "the instance was stopped",
            Some((_, S::Interrupted)) => "the instance was interrupted (preempted)",
            _ => {
                let (node, id) = (self.node.clone(), self.id.clone());
                let now = tokio::task::spawn_blocking(move || {
                    gpuvisor_node::reap::init(&node, &id).map(|i| i.pid)
                })
                .await
                .ok()
                .flatten();
                if now.is_some() && now == self.init {
                    return None;
                }
                "the instance's main process ended (it restarts if its restart policy says so)"
            }
        };
        Some(format!("{why}: the command was killed with it"))
    }

    fn limit_message(&self, l: wire::ExecLimit) -> String {
        match l {
            wire::ExecLimit::OutputLimit => format!(
                "the session moved {} bytes, its limit (exec_session_max_bytes): the command was killed",
                self.bounds.max_bytes
            ),
            wire::ExecLimit::Deadline => format!(
                "the session ran past its deadline of {} s: the command was killed",
                self.bounds.total.as_secs()
            ),
            wire::ExecLimit::Idle => format!(
                "the session was idle for {} s (exec_session_idle_timeout): the command was killed",
                self.bounds.idle.as_secs()
            ),
        }
    }
}

/// Kills the command's process tree (its pid from `pid_file`); how many processes were killed.
async fn kill_command(run: &Run, pid_file: &std::path::Path) -> usize {
    let (node, id, pid_file) = (run.node.clone(), run.id.clone(), pid_file.to_path_buf());
    tokio::task::spawn_blocking(move || node.kill_exec(&id, &pid_file))
        .await
        .unwrap_or(0)
}

/// Kills the command's process tree (its pid from `pid_file`, once the runtime wrote it), then
/// whatever runs the runtime.
async fn kill_tree(run: &Run, pid_file: &std::path::Path, child: &mut tokio::process::Child) {
    for _ in 0..80 {
        if pid_file.exists() || matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (node, id, pid_file) = (run.node.clone(), run.id.clone(), pid_file.to_path_buf());
    let killed = tokio::task::spawn_blocking(move || node.kill_exec(&id, &pid_file))
        .await
        .unwrap_or(0);
    tracing::debug!(instance = %run.id, processes = killed, "exec session killed");
    if tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

// ---- on a terminal -------------------------------------------------------------------------

struct Tty {
    master: Arc<AsyncFd<OwnedFd>>,
    shim: tokio::process::Child,
    /// The shim's registration as a child this session waits for (after `shim`: dropped once
    /// it was reaped).
    _waited: Option<gpuvisor_node::reap::Waited>,
    pid_file: PathBuf,
    /// The shim's stderr (runc's errors), once it closes.
    complaint: Option<tokio::task::JoinHandle<String>>,
}

/// Copies the client's input into the terminal and applies resizes until the input ends.
/// Returns a limit when the session went over its byte cap.
async fn tty_input(
    master: Arc<AsyncFd<OwnedFd>>,
    stdin: bool,
    mut input: mpsc::Receiver<SessionInput>,
    activity: Arc<Activity>,
    max_bytes: u64,
    started: Instant,
) -> Option<wire::ExecLimit> {
    while let Some(i) = input.recv().await {
        match i {
            // A session without input (`-t` alone) takes resizes only.
            SessionInput::Stdin(_) if !stdin => {}
            SessionInput::Stdin(data) => {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                activity.last_ms.fetch_max(ms, Ordering::Relaxed);
                let n = activity
                    .bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed)
                    + data.len() as u64;
                if n > max_bytes {
                    return Some(wire::ExecLimit::OutputLimit);
                }
                let mut at = 0;
                while at < data.len() {
                    let w = master
                        .async_io(Interest::WRITABLE, |fd| {
                            nix::unistd::write(fd, &data[at..]).map_err(std::io::Error::from)
                        })
                        .await;
                    match w {
                        Ok(n) => at += n,
                        Err(_) => return None,
                    }
                }
            }
            SessionInput::Resize(s) => {
                let _ = gpuvisor_node::console::set_window_size(
                    master.get_ref().as_fd(),
                    s.rows,
                    s.cols,
                );
            }
            SessionInput::Eof => {}
        }
    }
    None
}

impl Tty {
    async fn run(
        mut self,
        run: Run,
        stdin: bool,
        input: mpsc::Receiver<SessionInput>,
        tx: mpsc::Sender<SessionOutput>,
    ) {
        let mut input_task = tokio::spawn(tty_input(
            self.master.clone(),
            stdin,
            input,
            run.activity.clone(),
            run.bounds.max_bytes,
            run.started,
        ));
        let mut input_done = false;
        let mut pty_open = true;
        let mut buf = vec![0u8; CHUNK];
        let ended = loop {
            tokio::select! {
                r = self.master.async_io(Interest::READABLE, |fd| {
                    nix::unistd::read(fd, &mut buf).map_err(std::io::Error::from)
                }), if pty_open => {
                    match r {
                        Ok(n) if n > 0 => {
                            if !run.moved(n) {
                                break Ended::Limit(wire::ExecLimit::OutputLimit);
                            }
                            if let Some(e) = run.send(&tx, SessionOutput::Stdout(buf[..n].to_vec())).await {
                                break e;
                            }
                        }
                        // EIO: no process holds the terminal any more.
                        _ => pty_open = false,
                    }
                }
                r = &mut input_task, if !input_done => {
                    input_done = true;
                    if let Ok(Some(l)) = r {
                        break Ended::Limit(l);
                    }
                }
                _ = self.shim.wait() => break Ended::Exited,
                l = run.timed_out() => break Ended::Limit(l),
                _ = tx.closed() => break Ended::Cancelled,
            }
        };
        input_task.abort();
        let (ended, exit_code) = match ended {
            Ended::Exited => {
                // What the command wrote just before it ended is still in the terminal.
                self.drain(&run, &tx).await;
                match self.exit_code().await {
                    (_, Some(c)) => (Ended::Exited, c),
                    // Killed (out of memory, or by hand) before it could tell: the command may
                    // still run, unwatched and uncounted. It goes too.
                    (Some(sig), None) => {
                        let (node, id, pid_file) =
                            (run.node.clone(), run.id.clone(), self.pid_file.clone());
                        let killed = tokio::task::spawn_blocking(move || {
                            node.kill_orphaned_exec(&id, &pid_file)
                        })
                        .await
                        .unwrap_or(0);
                        let what = if killed > 0 {
                            "the command was killed"
                        } else {
                            "the command had ended"
                        };
                        (
                            Ended::Failed(format!(
                                "the exec shim was killed by signal {sig} (out of memory?): {what}, its status is unknown"
                            )),
                            128 + 9,
                        )
                    }
                    // No status: the runtime failed to start the command (status 255, as
                    // `runc exec` in the foreground gives).
                    (None, None) => {
                        kill_command(&run, &self.pid_file).await;
                        (Ended::Failed(self.complaint().await), 255)
                    }
                }
            }
            ended => {
                kill_tree(&run, &self.pid_file, &mut self.shim).await;
                (ended, self.exit_code().await.1.unwrap_or(128 + 9))
            }
        };
        let _ = std::fs::remove_file(&self.pid_file);
        run.finish(tx, ended, exit_code).await;
    }

    /// Reads what is left in the terminal without waiting for more.
    async fn drain(&self, run: &Run, tx: &mpsc::Sender<SessionOutput>) {
        let mut buf = vec![0u8; CHUNK];
        // Bounded: a background process still writing does not keep the session open.
        for _ in 0..64 {
            let r = self.master.try_io(Interest::READABLE, |fd| {
                nix::unistd::read(fd, &mut buf).map_err(std::io::Error::from)
            });
            match r {
                Ok(n) if n > 0 => {
                    if !run.moved(n) {
                        return;
                    }
                    if run
                        .send(tx, SessionOutput::Stdout(buf[..n].to_vec()))
                        .await
                        .is_some()
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// What the runtime said on its way out, as a message for the client.
    async fn complaint(&mut self) -> String {
        let said = match self.complaint.take() {
            Some(h) => tokio::time::timeout(Duration::from_secs(2), h)
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default(),
            None => String::new(),
        };
        // runc's log lines: `time=... level=error msg="exec failed: ..."`.
        let said = said
            .lines()
            .rev()
            .find_map(|l| l.split_once("msg=").map(|(_, m)| m.trim_matches('"')))
            .map(str::to_string)
            .unwrap_or_else(|| said.trim().to_string());
        format!(
            "the OCI runtime could not start the command: {}",
            said.replace("\\\"", "\"")
        )
    }

    /// The signal that killed the shim, if one did, and the command's exit status from the
    /// shim's `exit N` line (none when it printed none: the shim was killed or the runtime
    /// failed).
    async fn exit_code(&mut self) -> (Option<i32>, Option<i32>) {
        use std::os::unix::process::ExitStatusExt;
        let signal = self.shim.wait().await.ok().and_then(|s| s.signal());
        let mut out = String::new();
        if let Some(o) = self.shim.stdout.as_mut() {
            let _ = o.take(4096).read_to_string(&mut out).await;
        }
        let code = out
            .lines()
            .find_map(|l| l.strip_prefix(gpuvisor_node::console::SHIM_EXIT_PREFIX))
            .and_then(|c| c.trim().parse().ok());
        (signal, code)
    }
}

// ---- on pipes ------------------------------------------------------------------------------

struct Pipes {
    child: tokio::process::Child,
    pid_file: PathBuf,
}

/// Copies the client's input into the command's stdin until the input ends (then closes it).
async fn pipe_input(
    mut stdin: Option<tokio::process::ChildStdin>,
    mut input: mpsc::Receiver<SessionInput>,
    activity: Arc<Activity>,
    max_bytes: u64,
    started: Instant,
) -> Option<wire::ExecLimit> {
    while let Some(i) = input.recv().await {
        match i {
            SessionInput::Stdin(data) => {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                activity.last_ms.fetch_max(ms, Ordering::Relaxed);
                let n = activity
                    .bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed)
                    + data.len() as u64;
                if n > max_bytes {
                    return Some(wire::ExecLimit::OutputLimit);
                }
                if let Some(s) = stdin.as_mut() {
                    if s.write_all(&data).await.is_err() {
                        // The command closed its stdin: what follows is dropped.
                        stdin = None;
                    }
                }
            }
            SessionInput::Eof => stdin = None,
            SessionInput::Resize(_) => {}
        }
    }
    None
}

impl Pipes {
    async fn run(
        mut self,
        run: Run,
        stdin: bool,
        input: mpsc::Receiver<SessionInput>,
        tx: mpsc::Sender<SessionOutput>,
    ) {
        let child_stdin = self.child.stdin.take();
        let child_stdin = if stdin { child_stdin } else { None };
        let mut input_task = tokio::spawn(pipe_input(
            child_stdin,
            input,
            run.activity.clone(),
            run.bounds.max_bytes,
            run.started,
        ));
        let mut input_done = false;
        let mut out = self.child.stdout.take();
        let mut err = self.child.stderr.take();
        let (mut b_out, mut b_err) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let mut status = None;
        let ended = loop {
            if out.is_none() && err.is_none() && status.is_some() {
                break Ended::Exited;
            }
            tokio::select! {
                r = read_some(&mut out, &mut b_out) => match r {
                    Ok(n) if n > 0 => {
                        if !run.moved(n) {
                            break Ended::Limit(wire::ExecLimit::OutputLimit);
                        }
                        if let Some(e) = run.send(&tx, SessionOutput::Stdout(b_out[..n].to_vec())).await {
                            break e;
                        }
                    }
                    _ => out = None,
                },
                r = read_some(&mut err, &mut b_err) => match r {
                    Ok(n) if n > 0 => {
                        if !run.moved(n) {
                            break Ended::Limit(wire::ExecLimit::OutputLimit);
                        }
                        if let Some(e) = run.send(&tx, SessionOutput::Stderr(b_err[..n].to_vec())).await {
                            break e;
                        }
                    }
                    _ => err = None,
                },
                r = &mut input_task, if !input_done => {
                    input_done = true;
                    if let Ok(Some(l)) = r {
                        break Ended::Limit(l);
                    }
                }
                s = self.child.wait(), if status.is_none() => status = Some(s.ok()),
                l = run.timed_out() => break Ended::Limit(l),
                _ = tx.closed() => break Ended::Cancelled,
            }
        };
        input_task.abort();
        let status = match ended {
            Ended::Exited => status.flatten(),
            _ => {
                kill_tree(&run, &self.pid_file, &mut self.child).await;
                self.child.wait().await.ok()
            }
        };
        drop((out, err));
        let _ = std::fs::remove_file(&self.pid_file);
        let exit_code = status.map_or(128 + 9, |s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9))
        });
        run.finish(tx, ended, exit_code).await;
    }
}
