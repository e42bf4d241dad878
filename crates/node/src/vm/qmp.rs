//! QMP (the QEMU monitor) and the guest agent over their unix sockets, through the `qapi`
//! crate's typed commands (sync API): no QMP JSON is built by hand here.
//!
//! Every connection has a read and write timeout, so a wedged QEMU or a guest without an agent
//! never holds a reconciler thread for long.

use super::VmError;
use qapi::{qga, qmp, Qga, Qmp};
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

type Stream<'a> = qapi::Stream<BufReader<&'a UnixStream>, &'a UnixStream>;

fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, VmError> {
    let err = |source| VmError::Qmp {
        socket: socket.to_path_buf(),
        source,
    };
    let s = UnixStream::connect(socket).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    s.set_write_timeout(Some(timeout)).map_err(err)?;
    Ok(s)
}

fn command_error(command: &str, e: qapi::ExecuteError) -> VmError {
    VmError::QmpCommand {
        command: command.to_string(),
        message: e.to_string(),
    }
}

/// A QMP session (capabilities negotiated).
pub struct Monitor {
    socket: PathBuf,
    stream: UnixStream,
}

/// One vCPU as QEMU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vcpu {
    pub index: i64,
    /// The host thread running it.
    pub thread_id: i32,
}

impl Monitor {
    /// Connects and negotiates capabilities.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, VmError> {
        let stream = connect(socket, timeout)?;
        let mut m = Self {
            socket: socket.to_path_buf(),
            stream,
        };
        m.qmp()
            .handshake()
            .map_err(|e| command_error("qmp_capabilities", e))?;
        Ok(m)
    }

    fn qmp(&mut self) -> Qmp<Stream<'_>> {
        Qmp::from_stream(&self.stream)
    }

    fn execute<C: qapi::Command>(&mut self, name: &str, c: &C) -> Result<C::Ok, VmError> {
        let mut q = self.qmp();
        let r = q.execute(c);
        r.map_err(|e| command_error(name, e))
    }

    /// The vCPUs and their host threads (`query-cpus-fast`).
    pub fn vcpus(&mut self) -> Result<Vec<Vcpu>, VmError> {
        let cpus = self.execute("query-cpus-fast", &qmp::query_cpus_fast {})?;
        let mut out = Vec::with_capacity(cpus.len());
        for c in cpus {
            let base = match c {
                qmp::CpuInfoFast::x86_64(b) | qmp::CpuInfoFast::i386(b) => b,
                other => {
                    return Err(VmError::QmpCommand {
                        command: "query-cpus-fast".into(),
                        message: format!("unexpected target {:?}", other.target()),
                    })
                }
            };
            out.push(Vcpu {
                index: base.cpu_index,
                thread_id: i32::try_from(base.thread_id).map_err(|_| VmError::QmpCommand {
                    command: "query-cpus-fast".into(),
                    message: format!("thread id {} out of range", base.thread_id),
                })?,
            });
        }
        out.sort_by_key(|v| v.index);
        Ok(out)
    }

    /// Whether the guest runs (`query-status`), and QEMU's run state.
    pub fn status(&mut self) -> Result<(bool, String), VmError> {
        let s = self.execute("query-status", &qmp::query_status {})?;
        Ok((s.running, format!("{:?}", s.status)))
    }

    /// Presses the ACPI power button (`system_powerdown`).
    pub fn powerdown(&mut self) -> Result<(), VmError> {
        self.execute("system_powerdown", &qmp::system_powerdown {})?;
        Ok(())
    }

    /// Ends QEMU (`quit`). The socket closing before the answer counts as done.
    pub fn quit(&mut self) -> Result<(), VmError> {
        match self.execute("quit", &qmp::quit {}) {
            Ok(_) => Ok(()),
            Err(VmError::QmpCommand { message, .. })
                if message.contains("end of file") || message.contains("EOF") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// The guest agent (`qemu-ga` on the virtio-serial port `org.qemu.guest_agent.0`).
pub struct Agent {
    stream: UnixStream,
}

/// What `guest-exec-status` said about a finished command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentExit {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Agent {
    /// Connects and synchronises (`guest-sync` with a random id, so a stale answer left in the
    /// channel by an earlier client is skipped).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, VmError> {
        let stream = connect(socket, timeout)?;
        let mut a = Self { stream };
        let mut id = [0u8; 4];
        getrandom::fill(&mut id).map_err(|e| VmError::Qmp {
            socket: socket.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let id = i32::from_ne_bytes(id) & 0x7fff_ffff;
        Qga::from_stream(&a.stream)
            .guest_sync(id)
            .map_err(|e| command_error("guest-sync", e))?;
        let _ = &mut a;
        Ok(a)
    }

    fn execute<C: qapi::Command>(&mut self, name: &str, c: &C) -> Result<C::Ok, VmError> {
        let mut q = Qga::from_stream(&self.stream);
        let r = q.execute(c);
        r.map_err(|e| command_error(name, e))
    }

    /// Starts `path args` in the guest with its output captured; returns the guest pid.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[String],
        env: &[String],
        input: Option<&[u8]>,
    ) -> Result<i64, VmError> {
        let r = self.execute(
            "guest-exec",
            &qga::guest_exec {
                path: path.to_string(),
                arg: Some(args.to_vec()),
                env: (!env.is_empty()).then(|| env.to_vec()),
                input_data: input.map(<[u8]>::to_vec),
                capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
            },
        )?;
        Ok(r.pid)
    }

    /// `None` while the command runs; its exit status and output once it ended.
    pub fn exec_status(&mut self, pid: i64) -> Result<Option<AgentExit>, VmError> {
        let s = self.execute("guest-exec-status", &qga::guest_exec_status { pid })?;
        if !s.exited {
            return Ok(None);
        }
        let code = match (s.exitcode, s.signal) {
            (Some(c), _) => c as i32,
            (None, Some(sig)) => 128 + sig as i32,
            (None, None) => 255,
        };
        Ok(Some(AgentExit {
            code,
            stdout: s.out_data.unwrap_or_default(),
            stderr: s.err_data.unwrap_or_default(),
        }))
    }
}
