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

/// This binary's hidden `qga-exec` mode: the command `instance exec` runs for a VM. Runs `args`
/// in the guest through the agent on `socket` (stdin, when asked, read whole and passed as the
/// command's input), writes `<own pid> <guest pid>` to `pid_file` once it runs, polls its status,
/// then prints its stdout and stderr and returns its exit status. SIGTERM (what
/// [`kill_agent_exec`] sends) kills the guest process (`kill -9`, on the same agent connection:
/// the agent's channel serves one client at a time) and ends with 137.
pub fn agent_exec_main(
    socket: &Path,
    pid_file: &Path,
    args: &[String],
    env: &[String],
    stdin: bool,
) -> i32 {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    static TERM: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_term(_: libc::c_int) {
        TERM.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let fail = |what: &str| {
        eprintln!("gpuvisor: {what}");
        255
    };
    let Some((path, rest)) = args.split_first() else {
        return fail("no command");
    };
    let mut input = Vec::new();
    if stdin && std::io::stdin().read_to_end(&mut input).is_err() {
        return fail("cannot read stdin");
    }
    let mut agent = match Agent::connect(socket, Duration::from_secs(30)) {
        Ok(a) => a,
        Err(e) => {
            return fail(&format!(
                "the guest agent does not answer ({e}): is qemu-guest-agent running in the guest?"
            ))
        }
    };
    let pid = match agent.exec(path, rest, env, stdin.then_some(input.as_slice())) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    };
    let _ = std::fs::write(pid_file, format!("{} {pid}\n", std::process::id()));
    loop {
        if TERM.load(Ordering::SeqCst) {
            let _ = agent.exec(
                "/bin/sh",
                &["-c".to_string(), format!("kill -9 {pid}")],
                &[],
                None,
            );
            return 137;
        }
        match agent.exec_status(pid) {
            Ok(Some(done)) => {
                let _ = std::io::stdout().write_all(&done.stdout);
                let _ = std::io::stderr().write_all(&done.stderr);
                return done.code;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return fail(&e.to_string()),
        }
    }
}

/// Kills an agent exec: SIGTERM to its `qga-exec` process (the first pid of `pid_file`, only
/// while it is one), which kills the guest process. Returns how many were signalled.
pub fn kill_agent_exec(root: &crate::HostRoot, pid_file: &Path) -> usize {
    let text = std::fs::read_to_string(pid_file).unwrap_or_default();
    let _ = std::fs::remove_file(pid_file);
    let Some(host) = text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return 0;
    };
    let cmd = std::fs::read(root.path(format!("/proc/{host}/cmdline"))).unwrap_or_default();
    if !cmd.split(|b| *b == 0).any(|a| a == b"qga-exec") {
        return 0;
    }
    let sent = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host),
        nix::sys::signal::Signal::SIGTERM,
    );
    usize::from(sent.is_ok())
}
