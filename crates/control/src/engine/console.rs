//! `instance console`: a VM's serial console, attached interactively over the same session
//! channels as an interactive exec ([`ExecSession`]), so the API pumps it with the same
//! WebSocket code and the CLI drives it with the same client.
//!
//! The console is QEMU's serial port on a unix socket (one client at a time); what the guest
//! writes there also goes to the instance log whether anyone is attached or not. One attach
//! per instance at a time (a second is refused, not queued behind the first); an attach takes
//! a place in the exec gate like an exec (per tenant and in total) and is bounded by the
//! session deadline (`exec_session_max_time`). Detaching is the client closing its session:
//! the guest does not notice. The session ends by itself when the socket closes (the VM
//! stopped).

use super::authz::Op;
use super::limits::ExecPermit;
use super::session::{ExecSession, SessionInput, SessionOutput};
use super::{Engine, Principal};
use crate::error::{EngineError, Result};
use gpuvisor_wire as wire;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// How long the console socket has to accept us.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one piece of input may wait for the guest to take it before the session ends
/// (a guest that never reads its serial port must not hold the session's input forever).
const INPUT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of one output message.
const CHUNK: usize = 32 * 1024;

/// Instances with a console attached now.
static ATTACHED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// An instance's place in [`ATTACHED`], released on drop.
struct Attached(String);

impl Attached {
    fn take(id: &str) -> Result<Self> {
        let mut set = ATTACHED.lock().unwrap_or_else(PoisonError::into_inner);
        if !set.insert(id.to_string()) {
            return Err(EngineError::InUse(format!(
                "the console of instance {id} is attached in another session: detach it there first"
            )));
        }
        Ok(Self(id.to_string()))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        ATTACHED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// A console attach that passed every check (tenancy, running, the runtime has a console,
/// nobody else attached, a place in the exec gate), not connected yet.
pub struct ConsoleTicket {
    id: String,
    socket: PathBuf,
    total: Duration,
    permit: ExecPermit,
    attached: Attached,
}

impl Engine {
    /// Checks and admits an attach to the console of instance `id` (the caller's, running, a
    /// runtime with a console): see the module doc.
    pub async fn console_session(&self, who: &Principal, id: &str) -> Result<ConsoleTicket> {
        who.allow(Op::Console)?;
        let row = self.running_target(who, id).await?;
        let socket = self.node.console(&row.id)?;
        let attached = Attached::take(&row.id)?;
        let l = self.limits().exec;
        let permit = self.exec_permit(who, &l, &row.id)?;
        Ok(ConsoleTicket {
            id: row.id,
            socket,
            total: l.session_max_time,
            permit,
            attached,
        })
    }
}

impl ConsoleTicket {
    /// Connects to the console; on an error nothing is left attached.
    pub async fn start(self) -> Result<ExecSession> {
        let stream = connect(&self.id, &self.socket, "console").await?;
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let end = pump(stream, in_rx, &out_tx, self.total).await;
            if let Some(end) = end {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    out_tx.send(SessionOutput::End(end)),
                )
                .await;
            }
            tracing::debug!(instance = %self.id, "console detached");
            drop((self.permit, self.attached));
        });
        Ok(ExecSession {
            input: in_tx,
            output: out_rx,
        })
    }
}

/// A graphical console attach that passed every check (tenancy, running, a VM, a place in
/// the exec gate): see [`Engine::display_session`].
pub struct DisplayTicket {
    id: String,
    socket: PathBuf,
    /// How long the viewer may stay (the exec session deadline).
    pub total: Duration,
    permit: ExecPermit,
}

/// A connected graphical console: the raw RFB stream of the VM's VNC server, and the place in
/// the exec gate it holds until dropped.
pub struct Display {
    pub stream: tokio::net::UnixStream,
    _permit: ExecPermit,
}

impl Engine {
    /// Checks and admits a viewer of the graphical console (VNC) of VM `id`. Unlike the serial
    /// console, viewers share the screen (QEMU's VNC server takes several clients), each one
    /// a place in the exec gate and bounded by the session deadline.
    pub async fn display_session(&self, who: &Principal, id: &str) -> Result<DisplayTicket> {
        who.allow(Op::Display)?;
        let row = self.running_target(who, id).await?;
        let socket = self.node.display(&row.id)?;
        let l = self.limits().exec;
        let permit = self.exec_permit(who, &l, &row.id)?;
        Ok(DisplayTicket {
            id: row.id,
            socket,
            total: l.session_max_time,
            permit,
        })
    }
}

impl DisplayTicket {
    /// Connects to the VM's VNC server.
    pub async fn connect(self) -> Result<Display> {
        let stream = connect(&self.id, &self.socket, "graphical console").await?;
        Ok(Display {
            stream,
            _permit: self.permit,
        })
    }
}

/// Connects to one of a VM's console sockets, within [`CONNECT_TIMEOUT`].
async fn connect(id: &str, socket: &std::path::Path, what: &str) -> Result<tokio::net::UnixStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(socket))
        .await
        .map_err(|_| {
            EngineError::DeadlineExceeded(format!(
                "the {what} of instance {id} did not answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            EngineError::InvalidState(format!(
                "the {what} of instance {id} cannot be reached ({e}): has its VM stopped?"
            ))
        })
}

fn ended(message: String, limit: Option<wire::ExecLimit>) -> Option<wire::ExecEnd> {
    Some(wire::ExecEnd {
        exit_code: 0,
        limit,
        message: Some(message),
    })
}

/// Moves bytes between the console socket and the session until either side ends or the
/// deadline; the last message to send, none when the client went away.
async fn pump(
    stream: tokio::net::UnixStream,
    mut input: mpsc::Receiver<SessionInput>,
    output: &mpsc::Sender<SessionOutput>,
    total: Duration,
) -> Option<wire::ExecEnd> {
    let (mut rd, mut wr) = stream.into_split();
    let deadline = tokio::time::sleep(total);
    tokio::pin!(deadline);
    let mut buf = vec![0u8; CHUNK];
    let closed = || ended("the console closed: the VM stopped".into(), None);
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => return closed(),
                Ok(n) => {
                    // A client that does not read slows the console down, and with it the
                    // guest's serial port and the log (QEMU logs what its socket took), until
                    // the API layer cuts the client off (its liveness period).
                    tokio::select! {
                        s = output.send(SessionOutput::Stdout(buf[..n].to_vec())) => {
                            if s.is_err() {
                                return None;
                            }
                        }
                        () = &mut deadline => return over(total),
                    }
                }
            },
            i = input.recv() => match i {
                None => return None,
                Some(SessionInput::Stdin(d)) => {
                    match tokio::time::timeout(INPUT_TIMEOUT, wr.write_all(&d)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return closed(),
                        Err(_) => {
                            return ended(
                                format!(
                                    "the guest took no console input for {} s: detached",
                                    INPUT_TIMEOUT.as_secs()
                                ),
                                None,
                            )
                        }
                    }
                }
                // A serial port has no window size, and the console stays after the client's
                // input ends (its output is still wanted).
                Some(SessionInput::Eof | SessionInput::Resize(_)) => {}
            },
            () = &mut deadline => return over(total),
        }
    }
}

fn over(total: Duration) -> Option<wire::ExecEnd> {
    ended(
        format!(
            "the console session reached its limit of {} s (exec_session_max_time): detached",
            total.as_secs()
        ),
        Some(wire::ExecLimit::Deadline),
    )
}
