//! Instance output, capped and rotated. A container's stdout and stderr go into a pipe whose
//! other end a *log relay* reads: the `gpuvisor` binary in its hidden `log-relay` mode, started
//! by [`start_relay`] in its own session (it outlives daemon restarts, like the container), with
//! the instance id and our logs directory on its command line (so [`relay_processes`] finds it
//! for the orphan sweep and teardown). The relay writes segments
//! `<logs>/<id>/<start>.log`, named by the offset of their first byte in everything the instance
//! ever wrote; each holds at most half the cap, and only the current segment and the one before
//! it are kept, so an instance never has more than `max_bytes` of log on disk. While the
//! filesystem holding the logs has less than `reserve` bytes free the relay drops output (and
//! says how much once space is back): logs cannot fill the disk the store lives on.
//!
//! Readers ([`read`]) address bytes by that logical offset, so `instance logs -f` follows across
//! rotations; an offset that was rotated away answers from the oldest byte still kept.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The hidden subcommand of the `gpuvisor` binary that runs a relay.
pub const RELAY_SUBCOMMAND: &str = "log-relay";

/// Bytes read from the pipe at a time.
const CHUNK: usize = 64 * 1024;

/// Log limits of the node.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLimits {
    /// Most bytes of log kept on disk per instance (current segment + the previous one).
    pub max_bytes: u64,
    /// Output is dropped while the logs' filesystem has less than this free.
    pub reserve: u64,
    /// The binary whose `log-relay` subcommand relays output (the daemon's own). `None`: the
    /// container writes straight into one segment, uncapped (libraries and tests without the
    /// binary).
    pub relay: Option<PathBuf>,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            reserve: 1 << 30,
            relay: None,
        }
    }
}

impl LogLimits {
    fn segment_max(&self) -> u64 {
        (self.max_bytes / 2).max(1)
    }
}

/// The directory of an instance's log segments.
pub fn instance_dir(logs: &Path, id: &str) -> PathBuf {
    logs.join(id)
}

fn segment_name(start: u64) -> String {
    format!("{start:020}.log")
}

/// (start offset, path, length) of every segment, oldest first.
pub fn segments(dir: &Path) -> Vec<(u64, PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf, u64)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let start = name.to_str()?.strip_suffix(".log")?.parse().ok()?;
            let len = e.metadata().ok()?.len();
            Some((start, e.path(), len))
        })
        .collect();
    out.sort_by_key(|s| s.0);
    out
}

/// Bytes of all segments of an instance on disk.
pub fn bytes_on_disk(dir: &Path) -> u64 {
    segments(dir).iter().map(|s| s.2).sum()
}

/// Up to `max` bytes of the log from logical `offset`: (offset of the first byte returned,
/// bytes). An offset older than the oldest kept byte starts there; one past the end answers
/// nothing.
pub fn read(dir: &Path, offset: u64, max: usize) -> std::io::Result<(u64, Vec<u8>)> {
    use std::io::{Seek, SeekFrom};
    // The relay may delete the segment we picked between listing and opening: look again.
    for _ in 0..3 {
        let segs = segments(dir);
        let Some(first) = segs.first() else {
            return Ok((offset, Vec::new()));
        };
        let from = offset.max(first.0);
        let Some((start, path, _)) = segs
            .iter()
            .rev()
            .find(|(start, _, len)| *start <= from && from < start + len)
        else {
            return Ok((from, Vec::new()));
        };
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(from - start))?;
        let mut data = Vec::new();
        f.take(max as u64).read_to_end(&mut data)?;
        return Ok((from, data));
    }
    Ok((offset, Vec::new()))
}

/// Opens the segment the next byte goes to, creating the directory and a first segment as
/// needed: (its start, its file, its length).
fn open_current(dir: &Path) -> std::io::Result<(u64, std::fs::File, u64)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let (start, len) = segments(dir)
        .last()
        .map(|(s, _, l)| (*s, *l))
        .unwrap_or((0, 0));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(segment_name(start)))?;
    Ok((start, f, len))
}

/// The writer side: appends to the current segment, rotates at half the cap, keeps two.
pub struct LogWriter {
    dir: PathBuf,
    limits: LogLimits,
    start: u64,
    file: std::fs::File,
    len: u64,
    /// Bytes dropped for want of disk space, not yet reported in the log.
    dropped: u64,
}

impl LogWriter {
    /// Continues the instance's log where it ends (a restarted instance keeps its offsets).
    pub fn open(dir: &Path, limits: LogLimits) -> std::io::Result<Self> {
        let (start, file, len) = open_current(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            limits,
            start,
            file,
            len,
            dropped: 0,
        })
    }

    fn disk_low(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.dir).is_ok_and(|s| {
            s.blocks_available().saturating_mul(s.fragment_size()) < self.limits.reserve
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let next = self.start + self.len;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.dir.join(segment_name(next)))?;
        self.file = file;
        self.start = next;
        self.len = 0;
        // Keep the segment just closed and the new one.
        let segs = segments(&self.dir);
        let keep_from = segs.len().saturating_sub(2);
        for (_, path, _) in &segs[..keep_from] {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        let seg_max = self.limits.segment_max();
        while !data.is_empty() {
            if self.len >= seg_max {
                self.rotate()?;
            }
            let room = (seg_max - self.len).min(data.len() as u64) as usize;
            self.file.write_all(&data[..room])?;
            self.len += room as u64;
            data = &data[room..];
        }
        Ok(())
    }

    /// Writes one chunk of output (or drops it while the disk is nearly full).
    pub fn write_chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.disk_low() {
            self.dropped += data.len() as u64;
            return Ok(());
        }
        if self.dropped > 0 {
            let note = format!(
                "\n[gpuvisor: {} bytes of output dropped: the disk holding the logs was nearly full]\n",
                self.dropped
            );
            self.dropped = 0;
            self.append(note.as_bytes())?;
        }
        self.append(data)
    }
}

/// The relay loop: copies `input` into the instance's segments until end of file (every
/// process holding the pipe's write end has exited). Write errors drop the chunk and go on:
/// the pipe is always drained, so the container never blocks (or dies of SIGPIPE) because of
/// its log.
pub fn relay(mut input: impl Read, dir: &Path, limits: LogLimits) -> std::io::Result<()> {
    let mut w = LogWriter::open(dir, limits)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = w.write_chunk(&buf[..n]) {
            // Disk full or the directory removed under us: keep draining.
            w.dropped += n as u64;
            let _ = e;
        }
    }
}

/// Relays this process started and has not reaped yet, by (logs dir, instance id): their pid
/// and start time (`/proc/<pid>/stat` field 22, so a pid reused after someone else reaped it
/// is never mistaken for them).
static RELAYS: std::sync::Mutex<std::collections::BTreeMap<(PathBuf, String), (i32, u64)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// (start time, state) of process `pid`, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow its last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall; the state is field 3.
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((start, state))
}

/// Reaps the relay of `id` that this process started, once it has ended (or waits up to a
/// second for a killed one to end). Without this an ended relay stays a zombie of the daemon,
/// which is the child subreaper of what it starts, until the daemon's periodic sweep.
fn reap_relay(logs: &Path, id: &str) {
    let key = (logs.to_path_buf(), id.to_string());
    let Some((pid, start)) = RELAYS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key)
    else {
        return;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match proc_stat(pid) {
            // Gone (reaped elsewhere), or the pid is another process's now: not ours to reap.
            None => return,
            Some((s, _)) if s != start => return,
            Some((_, 'Z')) => {
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                return;
            }
            Some(_) if std::time::Instant::now() >= deadline => {
                // Still running (it should not be): keep it for the next stop.
                RELAYS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, (pid, start));
                return;
            }
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Starts the relay of instance `id` and returns the write end of its pipe, for the
/// container's stdout and stderr. The relay is detached: its own session, reparented to the
/// nearest child subreaper, which is the daemon (`reap::become_subreaper`; else init). The
/// intermediate process exits at once and is reaped here; it passes the relay's pid back
/// through a pipe, so [`stop_relay`] can reap the relay as soon as it ends.
pub fn start_relay(
    relay_bin: &Path,
    logs: &Path,
    id: &str,
    limits: &LogLimits,
) -> std::io::Result<OwnedFd> {
    use std::os::unix::process::CommandExt;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    // The relay's pid, from the intermediate process (close-on-exec: the relay does not keep it).
    let (pid_r, pid_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let pid_w_fd = {
        use std::os::fd::AsRawFd;
        pid_w.as_raw_fd()
    };
    let mut cmd = Command::new(relay_bin);
    cmd.arg(RELAY_SUBCOMMAND)
        .arg("--dir")
        .arg(logs)
        .arg("--max-bytes")
        .arg(limits.max_bytes.to_string())
        .arg("--reserve")
        .arg(limits.reserve.to_string())
        .arg(id)
        .stdin(Stdio::from(r))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: runs in the forked child before exec, where only async-signal-safe calls are
    // allowed: setsid(2), fork(2), write(2) and _exit(2) are. The parent half writes the
    // child's pid (a plain i32 on its stack) to the pipe and exits at once; the child goes on
    // to exec the relay.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Ok(()),
                pid => {
                    let b = pid.to_ne_bytes();
                    libc::write(pid_w_fd, b.as_ptr().cast(), b.len());
                    libc::_exit(0)
                }
            }
        });
    }
    let mut child = cmd.spawn()?;
    drop(pid_w);
    child.wait()?;
    let mut b = [0u8; 4];
    if std::io::Read::read_exact(&mut std::fs::File::from(pid_r), &mut b).is_ok() {
        let pid = i32::from_ne_bytes(b);
        if let Some((start, _)) = proc_stat(pid) {
            RELAYS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((logs.to_path_buf(), id.to_string()), (pid, start));
        }
    }
    Ok(w)
}

/// The log file an instance writes directly when no relay binary is configured.
pub fn direct_output(logs: &Path, id: &str) -> std::io::Result<OwnedFd> {
    let (_, f, _) = open_current(&instance_dir(logs, id))?;
    Ok(OwnedFd::from(f))
}

/// (pid, instance id) of the relays writing into `logs` (read from `/proc/*/cmdline`).
pub fn relay_processes(root: &crate::HostRoot, logs: &Path) -> Vec<(i32, String)> {
    let Ok(rd) = std::fs::read_dir(root.path("/proc")) else {
        return Vec::new();
    };
    let logs = logs.to_string_lossy();
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.get(1).copied() != Some(RELAY_SUBCOMMAND.as_bytes()) {
                return None;
            }
            let dir_at = args.iter().position(|a| *a == b"--dir")?;
            if args.get(dir_at + 1).copied() != Some(logs.as_bytes()) {
                return None;
            }
            // The id is the last non-empty argument.
            let id = args.iter().rev().find(|a| !a.is_empty())?;
            Some((pid, String::from_utf8_lossy(id).into_owned()))
        })
        .collect()
}

/// Ends the relay of `id`: it normally exits by itself once the container is gone (end of
/// file); this waits up to `grace` for that, so the last output is kept, then kills it, and
/// reaps it if this process started it (an ended relay is a zombie, whose `cmdline` is empty:
/// it is no longer among [`relay_processes`]).
pub fn stop_relay(root: &crate::HostRoot, logs: &Path, id: &str, grace: std::time::Duration) {
    use nix::sys::signal::{kill, Signal};
    let deadline = std::time::Instant::now() + grace;
    loop {
        let mine: Vec<i32> = relay_processes(root, logs)
            .into_iter()
            .filter(|(_, i)| i == id)
            .map(|(p, _)| p)
            .collect();
        if mine.is_empty() {
            reap_relay(logs, id);
            return;
        }
        if std::time::Instant::now() >= deadline {
            for p in mine {
                let _ = kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
            }
            reap_relay(logs, id);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u64) -> LogLimits {
        LogLimits {
            max_bytes: max,
            reserve: 0,
            relay: None,
        }
    }

    /// A relay that ended is a zombie of its subreaper (the daemon; here the test process):
    /// `stop_relay` reaps it at once instead of leaving it to the daemon's periodic sweep.
    #[test]
    fn stop_relay_reaps_an_ended_relay() {
        crate::reap::become_subreaper().unwrap();
        let d = tempfile::tempdir().unwrap();
        // `true` ends at once, as a relay does at the end of its input.
        let w = start_relay(Path::new("/bin/true"), d.path(), "relayreap01", &limits(0)).unwrap();
        drop(w);
        let key = (d.path().to_path_buf(), "relayreap01".to_string());
        let (pid, _) = *RELAYS.lock().unwrap().get(&key).expect("the relay's pid");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while proc_stat(pid).map(|(_, st)| st) != Some('Z') {
            assert!(
                std::time::Instant::now() < deadline,
                "relay {pid} never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        stop_relay(
            &crate::HostRoot::real(),
            d.path(),
            "relayreap01",
            std::time::Duration::ZERO,
        );
        assert_eq!(
            proc_stat(pid),
            None,
            "the ended relay {pid} is still a zombie"
        );
    }

    #[test]
    fn rotation_keeps_the_cap_and_the_newest_bytes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("abc");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        relay(&data[..], &dir, limits(1000)).unwrap();
        assert!(bytes_on_disk(&dir) <= 1000, "{}", bytes_on_disk(&dir));
        assert!(segments(&dir).len() <= 2);
        // The newest bytes are there, at their logical offsets.
        let (start, got) = read(&dir, 9_900, 1000).unwrap();
        assert_eq!(start, 9_900);
        assert_eq!(got, data[9_900..]);
        // A rotated-away offset answers from the oldest byte kept.
        let (start, got) = read(&dir, 0, 100).unwrap();
        assert!(start >= 9_000, "{start}");
        assert_eq!(got, data[start as usize..start as usize + got.len()]);
        // Following the log from there reaches the end, contiguous.
        let mut off = start;
        let mut all = Vec::new();
        loop {
            let (s, chunk) = read(&dir, off, 128).unwrap();
            assert_eq!(s, off);
            if chunk.is_empty() {
                break;
            }
            off += chunk.len() as u64;
            all.extend(chunk);
        }
        assert_eq!(all, data[start as usize..]);
        assert_eq!(off, 10_000);
    }

    #[test]
    fn a_restarted_relay_continues_the_offsets() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("abc");
        relay(&b"hello "[..], &dir, limits(1 << 20)).unwrap();
        relay(&b"world"[..], &dir, limits(1 << 20)).unwrap();
        assert_eq!(read(&dir, 0, 100).unwrap(), (0, b"hello world".to_vec()));
        assert_eq!(read(&dir, 6, 100).unwrap(), (6, b"world".to_vec()));
        assert_eq!(read(&dir, 11, 100).unwrap(), (11, Vec::new()));
    }

    #[test]
    fn a_nearly_full_disk_drops_output_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("abc");
        let mut w = LogWriter::open(
            &dir,
            LogLimits {
                max_bytes: 1 << 20,
                reserve: u64::MAX,
                relay: None,
            },
        )
        .unwrap();
        w.write_chunk(b"lost").unwrap();
        assert_eq!(bytes_on_disk(&dir), 0);
        w.limits.reserve = 0;
        w.write_chunk(b"kept").unwrap();
        let (_, got) = read(&dir, 0, 1000).unwrap();
        let text = String::from_utf8(got).unwrap();
        assert!(text.contains("4 bytes of output dropped"), "{text}");
        assert!(text.ends_with("kept"));
    }
}
