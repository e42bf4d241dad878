//! What one tenant can make the daemon do, bounded: `exec` (output streamed as it comes, a byte
//! cap, a deadline, concurrency per tenant and in total; the command runs as an async child, so
//! a hanging one holds no thread) and retention (events and terminated instances pruned by a
//! periodic task).

use super::authz::Op;
use super::{now_ms, Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use gpuvisor_node::Node;
use gpuvisor_wire::{self as wire, exec as frame, InstanceState};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Bounds of `exec`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecLimits {
    /// Most bytes of output (stdout + stderr) streamed; the command is killed past it.
    pub max_output: u64,
    /// Deadline when the request gives none.
    pub default_timeout: Duration,
    /// Longest deadline a request may ask for.
    pub max_timeout: Duration,
    /// Execs one tenant may run at once.
    pub per_tenant: usize,
    /// Execs the daemon runs at once, all tenants together.
    pub total: usize,
    /// An interactive session ([`Engine::exec_session`]) with no input and no output for this
    /// long is ended (its command killed).
    pub session_idle_timeout: Duration,
    /// Longest an interactive session may last (and its default deadline).
    pub session_max_time: Duration,
    /// Most bytes (input and output together) one interactive session moves.
    pub session_max_bytes: u64,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self {
            max_output: 16 << 20,
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(3600),
            per_tenant: 8,
            total: 64,
            session_idle_timeout: Duration::from_secs(3600),
            session_max_time: Duration::from_secs(24 * 3600),
            session_max_bytes: 1 << 30,
        }
    }
}

/// How long history is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// Events older than this go.
    pub events_max_age: Duration,
    /// Events kept per instance (the newest).
    pub events_per_instance: u64,
    /// Terminated instances (rows and events) go this long after they ended.
    pub terminated_max_age: Duration,
    /// Audit log rows go this long after they were written.
    pub audit_max_age: Duration,
    /// How often the pruning runs.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            events_max_age: Duration::from_secs(30 * 86_400),
            events_per_instance: 1000,
            terminated_max_age: Duration::from_secs(7 * 86_400),
            audit_max_age: Duration::from_secs(365 * 86_400),
            every: Duration::from_secs(3600),
        }
    }
}

/// The engine's limits (set once at start with [`Engine::set_limits`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub exec: ExecLimits,
    pub retention: Retention,
}

/// Limits in force, and the execs and live metrics streams running, per tenant.
#[derive(Default)]
pub(crate) struct LimitState {
    limits: Mutex<Limits>,
    gate: Arc<Gate>,
    streams: Arc<Gate>,
}

/// Live metrics streams one tenant may hold open at once.
pub const STREAMS_PER_TENANT: usize = 32;
/// Live metrics streams the daemon holds open at once, all tenants together.
pub const STREAMS_TOTAL: usize = 512;

/// Places per tenant and in total for one kind of long-running work (execs, metrics streams).
#[derive(Default)]
struct Gate {
    /// (places held per tenant id, total).
    running: Mutex<(HashMap<String, usize>, usize)>,
}

/// One place in a [`Gate`]; given back on drop. For an exec its instance counts as in use
/// meanwhile (idle timeouts).
pub struct GatePermit {
    gate: Arc<Gate>,
    tenant: String,
    _in_use: Option<super::ingress::InUse>,
}

/// A running exec's or console session's place.
pub(super) type ExecPermit = GatePermit;

impl Drop for GatePermit {
    fn drop(&mut self) {
        let mut r = self.gate.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = r.0.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                r.0.remove(&self.tenant);
            }
        }
        r.1 = r.1.saturating_sub(1);
    }
}

/// What a gate holds and its bounds, each with how its refusal names it.
struct GateKind {
    /// `exec(s)`, ...
    what: &'static str,
    per_tenant: (usize, String),
    total: (usize, String),
}

impl Gate {
    fn acquire(self: &Arc<Self>, who: &Principal, k: &GateKind) -> Result<GatePermit> {
        let mut r = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mine = r.0.get(&who.tenant_id).copied().unwrap_or(0);
        if mine >= k.per_tenant.0 {
            return Err(EngineError::ResourceExhausted(format!(
                "tenant {} already runs {mine} {}, its limit ({}): wait for one to end",
                who.tenant, k.what, k.per_tenant.1
            )));
        }
        if r.1 >= k.total.0 {
            return Err(EngineError::ResourceExhausted(format!(
                "the daemon already runs {} {}, its limit ({}): retry later",
                r.1, k.what, k.total.1
            )));
        }
        *r.0.entry(who.tenant_id.clone()).or_default() += 1;
        r.1 += 1;
        Ok(GatePermit {
            gate: self.clone(),
            tenant: who.tenant_id.clone(),
            _in_use: None,
        })
    }
}

/// A running exec: encoded frames ([`wire::exec`]) as the command writes, ending with `END`.
/// Dropping it (the client went away) kills the command.
pub struct ExecStream {
    pub frames: mpsc::Receiver<Vec<u8>>,
}

impl Engine {
    /// Sets the exec bounds and retention policy (at start, before serving).
    pub fn set_limits(&self, l: Limits) {
        *self.limits.limits.lock().unwrap_or_else(|p| p.into_inner()) = l;
    }

    pub fn limits(&self) -> Limits {
        self.limits
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts `req.command` in a running instance and streams its output. Refused with
    /// `resource_exhausted` when the tenant (or the daemon) already runs as many execs as
    /// allowed. The command is killed, and the stream ends saying why, when its output passes
    /// `max_output` or its deadline passes; it is killed too when the stream is dropped.
    pub async fn exec(
        &self,
        who: &Principal,
        id: &str,
        req: &wire::ExecRequest,
    ) -> Result<ExecStream> {
        who.allow(Op::Exec)?;
        let row = self.exec_target(who, id, &req.command, &req.env).await?;
        let l = self.limits().exec;
        let timeout = match req.timeout_ms {
            None => l.default_timeout.min(l.max_timeout),
            Some(0) => return Err(invalid("exec timeout must be positive")),
            Some(ms) if Duration::from_millis(ms) > l.max_timeout => {
                return Err(invalid(format!(
                    "exec timeout {ms} ms is over the daemon's maximum of {} ms (exec_max_timeout)",
                    l.max_timeout.as_millis()
                )))
            }
            Some(ms) => Duration::from_millis(ms),
        };
        let permit = self.exec_permit(who, &l, &row.id)?;
        let (cmd, pid_file) = self
            .node
            .exec_command(&row.id, &req.command, &req.env, false)?;
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| EngineError::Internal(format!("cannot start the OCI runtime: {e}")))?;
        let (tx, rx) = mpsc::channel(16);
        let run = ExecRun {
            node: self.node.clone(),
            id: row.id.clone(),
            pid_file,
            max_output: l.max_output,
            timeout,
        };
        // Waited for below, maybe long after it ended: not the zombie sweep's to reap.
        let waited = gpuvisor_node::reap::Waited::new(child.id());
        tokio::spawn(async move {
            run.run(child, tx).await;
            drop((permit, waited));
        });
        Ok(ExecStream { frames: rx })
    }

    /// A place in the exec gate (one-shot execs and sessions alike) for instance `id`, given
    /// back on drop; the instance is in use until then.
    pub(super) fn exec_permit(
        &self,
        who: &Principal,
        l: &ExecLimits,
        id: &str,
    ) -> Result<ExecPermit> {
        let kind = GateKind {
            what: "exec(s)",
            per_tenant: (l.per_tenant, format!("exec_per_tenant = {}", l.per_tenant)),
            total: (l.total, format!("exec_total = {}", l.total)),
        };
        let mut permit = self.limits.gate.acquire(who, &kind)?;
        permit._in_use = Some(self.in_use(id));
        Ok(permit)
    }

    /// A place for a live metrics stream, given back on drop.
    pub(super) fn stream_permit(&self, who: &Principal) -> Result<GatePermit> {
        let kind = GateKind {
            what: "live metrics stream(s)",
            per_tenant: (
                STREAMS_PER_TENANT,
                format!("{STREAMS_PER_TENANT} per tenant"),
            ),
            total: (STREAMS_TOTAL, format!("{STREAMS_TOTAL} in all")),
        };
        self.limits.streams.acquire(who, &kind)
    }

    /// The running instance an exec may start in: the caller's, running, on this host; the
    /// command non-empty and its environment allowed (platform-owned names are refused).
    pub(super) async fn exec_target(
        &self,
        who: &Principal,
        id: &str,
        command: &[String],
        env: &[String],
    ) -> Result<crate::store::InstanceRow> {
        let row = self.running_target(who, id).await?;
        if command.is_empty() {
            return Err(invalid("exec needs a command"));
        }
        for e in env {
            super::validate::env(e)?;
        }
        Ok(row)
    }

    /// The caller's instance `id`, running on this host (not on a simulated node): what an exec
    /// or a console attaches to.
    pub(super) async fn running_target(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<crate::store::InstanceRow> {
        let row = self.find(who, id).await?;
        if row.state != InstanceState::Running {
            return Err(EngineError::InvalidState(format!(
                "instance {} is {}, not running",
                row.id, row.state
            )));
        }
        if self.is_simulated(&row) {
            return Err(EngineError::InvalidState(format!(
                "instance {} is on simulated node {}: nothing runs there",
                row.id, row.node_id
            )));
        }
        Ok(row)
    }

    /// Prunes events and terminated instances by the retention policy, now and then every
    /// `retention.every`. Runs until the process ends.
    pub async fn run_retention(self: Arc<Self>) {
        loop {
            let r = self.limits().retention;
            if let Err(e) = self.prune_history(now_ms()).await {
                tracing::warn!("retention: {e}");
            }
            tokio::time::sleep(r.every.max(Duration::from_secs(1))).await;
        }
    }

    /// One retention pass as of `now` (ms): (events deleted, terminated instances deleted).
    pub async fn prune_history(&self, now: i64) -> Result<(u64, u64)> {
        let r = self.limits().retention;
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .store
            .prune_terminated(now.saturating_sub(ms(r.terminated_max_age)))
            .await?;
        let events = self
            .store
            .prune_events(
                now.saturating_sub(ms(r.events_max_age)),
                r.events_per_instance,
            )
            .await?;
        let audit = self
            .store
            .audit_prune(now.saturating_sub(ms(r.audit_max_age)))
            .await?;
        if rows > 0 || events > 0 || audit > 0 {
            tracing::info!(events, instances = rows, audit, "retention: pruned history");
        }
        Ok((events, rows))
    }
}

/// One exec in flight.
struct ExecRun {
    node: Arc<Node>,
    id: String,
    pid_file: PathBuf,
    max_output: u64,
    timeout: Duration,
}

/// How a read loop ended.
enum Ended {
    /// Both outputs closed.
    Eof,
    Limit(wire::ExecLimit),
    /// The client went away.
    Cancelled,
}

/// Reads from `r` while it is open; never ready once it is closed (`None`), so a `select!` arm
/// on a closed pipe stays quiet.
pub(crate) async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    r: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

impl ExecRun {
    async fn run(self, mut child: tokio::process::Child, tx: mpsc::Sender<Vec<u8>>) {
        let deadline = Instant::now() + self.timeout;
        // The pipes stay open until the command is dead: a command cut at the cap is killed
        // by us (137), not by SIGPIPE from a pipe closed under it.
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let ended = self.pump(&mut out, &mut err, &tx, deadline).await;
        let (status, ended) = match ended {
            Ended::Eof => {
                // Outputs closed; the command may still run (it closed them itself).
                tokio::select! {
                    s = child.wait() => (s.ok(), Ended::Eof),
                    _ = tokio::time::sleep_until(deadline) => {
                        (self.kill(&mut child).await, Ended::Limit(wire::ExecLimit::Deadline))
                    }
                    _ = tx.closed() => (self.kill(&mut child).await, Ended::Cancelled),
                }
            }
            other => (self.kill(&mut child).await, other),
        };
        drop((out, err));
        let _ = std::fs::remove_file(&self.pid_file);
        let exit_code = status.map_or(128 + 9, |s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9))
        });
        let (limit, message) = match ended {
            Ended::Cancelled => {
                tracing::debug!(instance = %self.id, "exec client went away: command killed");
                return;
            }
            Ended::Eof => (None, None),
            Ended::Limit(l @ wire::ExecLimit::OutputLimit) => (
                Some(l),
                Some(format!(
                    "output reached the limit of {} bytes (exec_max_output): the command was killed",
                    self.max_output
                )),
            ),
            Ended::Limit(l @ (wire::ExecLimit::Deadline | wire::ExecLimit::Idle)) => (
                Some(l),
                Some(format!(
                    "the command ran past its deadline of {}: it was killed",
                    humanish(self.timeout)
                )),
            ),
        };
        let end = wire::ExecEnd {
            exit_code,
            limit,
            message,
        };
        let body = serde_json::to_vec(&end).unwrap_or_default();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tx.send(frame::frame(frame::END, &body)),
        )
        .await;
    }

    /// Streams both outputs until they close, the cap or the deadline is hit, or the client
    /// goes away.
    async fn pump(
        &self,
        out: &mut Option<tokio::process::ChildStdout>,
        err: &mut Option<tokio::process::ChildStderr>,
        tx: &mpsc::Sender<Vec<u8>>,
        deadline: Instant,
    ) -> Ended {
        let mut b_out = vec![0u8; 32 * 1024];
        let mut b_err = vec![0u8; 32 * 1024];
        let mut sent = 0u64;
        while out.is_some() || err.is_some() {
            let (kind, n) = tokio::select! {
                r = read_some(out, &mut b_out) => (frame::STDOUT, r),
                r = read_some(err, &mut b_err) => (frame::STDERR, r),
                _ = tokio::time::sleep_until(deadline) => {
                    return Ended::Limit(wire::ExecLimit::Deadline)
                }
                _ = tx.closed() => return Ended::Cancelled,
            };
            let n = match n {
                Ok(n) if n > 0 => n,
                _ => {
                    if kind == frame::STDOUT {
                        *out = None;
                    } else {
                        *err = None;
                    }
                    continue;
                }
            };
            let data = if kind == frame::STDOUT {
                &b_out[..n]
            } else {
                &b_err[..n]
            };
            let room = self.max_output.saturating_sub(sent);
            let take = (n as u64).min(room) as usize;
            if take > 0 {
                match tokio::time::timeout_at(deadline, tx.send(frame::frame(kind, &data[..take])))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Ended::Cancelled,
                    Err(_) => return Ended::Limit(wire::ExecLimit::Deadline),
                }
                sent += take as u64;
            }
            if take < n {
                return Ended::Limit(wire::ExecLimit::OutputLimit);
            }
        }
        Ended::Eof
    }

    /// Kills the command's process tree in the instance, then the runtime's process; returns
    /// the runtime's exit status.
    async fn kill(&self, child: &mut tokio::process::Child) -> Option<std::process::ExitStatus> {
        // The runtime writes the pid file once the command runs: give it a moment.
        for _ in 0..40 {
            if self.pid_file.exists() || matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let (node, id, pid_file) = (self.node.clone(), self.id.clone(), self.pid_file.clone());
        let killed = tokio::task::spawn_blocking(move || node.kill_exec(&id, &pid_file))
            .await
            .unwrap_or(0);
        tracing::debug!(instance = %self.id, processes = killed, "exec killed");
        // runc exits once its command is dead. Now and then (a command killed right after it
        // started) runc 1.1 misses the exit and waits for ever: its command is gone by then,
        // so kill runc too after a short wait.
        match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                let _ = child.start_kill();
                child.wait().await.ok()
            }
        }
    }
}

fn humanish(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
