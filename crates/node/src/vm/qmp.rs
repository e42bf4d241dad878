//! QMP (the QEMU monitor) and the guest agent over their unix sockets, through the `qapi`
//! crate's typed commands (sync API): no QMP JSON is built by hand here.
//!
//! Every connection has a read and write timeout, so a wedged QEMU or a guest without an agent
//! never holds a reconciler thread for long. QEMU itself is the tenant's too once a guest
//! escapes into it: each QMP command's answer (events before it included) is read within
//! [`QMP_CALL_DEADLINE`] and at most [`MAX_QMP_CALL_BYTES`] bytes, so it cannot grow the
//! daemon's memory or hold it with a trickle.
//!
//! The guest agent is the guest's: whatever it sends is untrusted input to a root process. Its
//! replies are read by hand here (the commands are still `qapi`'s types), line by line up to
//! [`MAX_AGENT_LINE`] bytes, each call within an overall deadline, and a command's output is cut
//! at [`MAX_AGENT_OUTPUT`]: a hostile agent can neither make the host allocate without bound nor
//! keep a call reading forever.

use super::VmError;
use qapi::{qga, qmp, Qmp};
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

type Stream<'a> = qapi::Stream<BufReader<Bounded<'a>>, &'a UnixStream>;

/// Most bytes QEMU may send for one QMP command (its answer and any events before it).
pub const MAX_QMP_CALL_BYTES: u64 = 1 << 20;
/// Longest one QMP command may take, answer included.
pub const QMP_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// QMP's read side for one command: a byte budget and a deadline over the whole answer (the
/// socket's own timeout bounds each read only).
struct Bounded<'a> {
    stream: &'a UnixStream,
    left: u64,
    deadline: Instant,
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(format!(
                "QEMU sent more than {MAX_QMP_CALL_BYTES} bytes for one QMP command"
            )));
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "QMP answer not complete within its deadline",
            ));
        }
        let cap = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        // Never past the command's deadline, and never longer than the connection's timeout.
        let per_read = self.stream.read_timeout()?.unwrap_or(QMP_CALL_DEADLINE);
        self.stream
            .set_read_timeout(Some((self.deadline - now).min(per_read)))?;
        let n = (&*self.stream).read(&mut buf[..cap]);
        self.stream.set_read_timeout(Some(per_read))?;
        let n = n?;
        self.left -= n as u64;
        Ok(n)
    }
}

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

/// One reading of a live migration (`query-migrate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// `setup`, `active`, `postcopy-active`, `device`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    pub error: Option<String>,
    /// The guest's pause at the switchover, once completed.
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    /// RAM bytes sent so far, and still to send.
    pub transferred: u64,
    pub remaining: u64,
    pub dirty_sync_count: u64,
    pub cpu_throttle_percent: u64,
}

/// A VM's memory as its balloon sees it (bytes). The statistics are what the guest's driver
/// reported (`None` until it has): a hostile guest can report anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestMemory {
    /// RAM the guest has (its size less what the balloon holds).
    pub actual: u64,
    pub total: Option<u64>,
    pub free: Option<u64>,
    pub available: Option<u64>,
    /// When the guest last reported (seconds since the epoch).
    pub updated_at: Option<i64>,
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

    /// A new connection in place of this one: after a command that timed out, its late
    /// reply must not be read as the next command's. The old one is shut first (QEMU's
    /// monitor socket serves one client at a time); where the new one fails, every later
    /// command on this monitor fails too.
    pub fn reconnect(&mut self) -> Result<(), VmError> {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        // A QEMU still busy with what timed out (a `stop` flushing disks) answers late: tried
        // for up to the deadline of one command.
        let deadline = Instant::now() + QMP_CALL_DEADLINE;
        loop {
            match Self::connect(&self.socket.clone(), Duration::from_secs(5)) {
                Ok(m) => {
                    *self = m;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Whether migration capability `name` is on (`query-migrate-capabilities`).
    pub fn migration_capability(&mut self, name: &str) -> Result<bool, VmError> {
        let caps = self.execute(
            "query-migrate-capabilities",
            &qmp::query_migrate_capabilities {},
        )?;
        Ok(caps
            .iter()
            .any(|c| qapi::Enum::name(&c.capability) == name && c.state))
    }

    /// QEMU's version, major and minor (`query-version`).
    pub fn qemu_version(&mut self) -> Result<(i64, i64), VmError> {
        let v = self.execute("query-version", &qmp::query_version {})?;
        Ok((v.qemu.major, v.qemu.minor))
    }

    /// The guest's boot RAM and the RAM plugged into it since (DIMMs, virtio-mem), bytes
    /// (`query-memory-size-summary`); an error where QEMU does not say what is plugged.
    pub fn memory_sizes(&mut self) -> Result<(u64, u64), VmError> {
        let m = self.execute(
            "query-memory-size-summary",
            &qmp::query_memory_size_summary {},
        )?;
        let plugged = m.plugged_memory.ok_or_else(|| VmError::QmpCommand {
            command: "query-memory-size-summary".into(),
            message: "no plugged-memory in the answer".into(),
        })?;
        Ok((m.base_memory, plugged))
    }

    /// Where RAM block `name` starts in QEMU's RAM address space (`x-query-ramblock`, a
    /// table meant for people: read by [`ramblock_offset`]); None where it has no such block.
    pub fn ram_block_offset(&mut self, name: &str) -> Result<Option<u64>, VmError> {
        let t = self.execute("x-query-ramblock", &qmp::x_query_ramblock {})?;
        Ok(ramblock_offset(&t.human_readable_text, name))
    }

    /// The versioned machine type the guest runs (`pc-q35-10.0`: QOM's `/machine` type
    /// without its `-machine` suffix); an error for one that is not a
    /// [`super::qemu::known_machine`].
    pub fn machine_type(&mut self) -> Result<String, VmError> {
        let t = self.execute(
            "qom-get",
            &qmp::qom_get {
                path: "/machine".into(),
                property: "type".into(),
            },
        )?;
        t.as_str()
            .and_then(|t| t.strip_suffix("-machine"))
            .filter(|m| super::qemu::known_machine(m))
            .map(str::to_string)
            .ok_or_else(|| VmError::QmpCommand {
                command: "qom-get /machine type".into(),
                message: format!("not a machine type: {t}"),
            })
    }

    /// A QMP client for one command: a fresh byte budget and deadline.
    fn qmp(&mut self) -> Qmp<Stream<'_>> {
        let read = Bounded {
            stream: &self.stream,
            left: MAX_QMP_CALL_BYTES,
            deadline: Instant::now() + QMP_CALL_DEADLINE,
        };
        Qmp::new(qapi::Stream::new(BufReader::new(read), &self.stream))
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

    /// Disk I/O limits on each of the guest's disks (the root disk and the volumes, not the
    /// read-only cloud-init seed): `block_set_io_throttle` on every drive `query-block` lists
    /// under those names. Unset limits are 0 (none) to QEMU.
    pub fn throttle_disks(&mut self, io: &gpuvisor_wire::DiskIo) -> Result<Vec<String>, VmError> {
        let drives: Vec<String> = self
            .execute("query-block", &qmp::query_block {})?
            .into_iter()
            .map(|b| b.device)
            .filter(|d| d == "root" || d.starts_with("vol"))
            .collect();
        let v = |x: Option<u64>| i64::try_from(x.unwrap_or(0)).unwrap_or(i64::MAX);
        for d in &drives {
            // `device`: the drive's name (`-drive id=`); our devices carry no qdev id, and
            // QEMU (7.2 and 10.0 both) still takes the drive name.
            #[allow(deprecated)]
            let t = qmp::BlockIOThrottle {
                device: Some(d.clone()),
                id: None,
                group: None,
                bps: 0,
                bps_rd: v(io.read_bps),
                bps_wr: v(io.write_bps),
                iops: 0,
                iops_rd: v(io.read_iops),
                iops_wr: v(io.write_iops),
                bps_max: None,
                bps_max_length: None,
                bps_rd_max: None,
                bps_rd_max_length: None,
                bps_wr_max: None,
                bps_wr_max_length: None,
                iops_max: None,
                iops_max_length: None,
                iops_rd_max: None,
                iops_rd_max_length: None,
                iops_size: None,
                iops_wr_max: None,
                iops_wr_max_length: None,
            };
            self.execute("block_set_io_throttle", &qmp::block_set_io_throttle(t))?;
        }
        Ok(drives)
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

    /// Runs `c` with descriptor `fd` passed alongside (`SCM_RIGHTS` on the command's first
    /// bytes), for `add-fd` and `getfd`. QEMU gets its own copy; ours stays open.
    fn execute_with_fd<C: qapi::Command>(
        &mut self,
        name: &str,
        c: &C,
        fd: RawFd,
    ) -> Result<C::Ok, VmError> {
        let read = Bounded {
            stream: &self.stream,
            left: MAX_QMP_CALL_BYTES,
            deadline: Instant::now() + QMP_CALL_DEADLINE,
        };
        let write = FdWriter {
            stream: &self.stream,
            fd: Some(fd),
        };
        let mut q = Qmp::new(qapi::Stream::new(BufReader::new(read), write));
        q.execute(c).map_err(|e| command_error(name, e))
    }

    /// Adds `fd` to QEMU's descriptor set `fdset` (`add-fd`): QEMU opens `/dev/fdset/<fdset>`
    /// from it, never a path of ours.
    pub fn add_fd(&mut self, fdset: i64, fd: RawFd) -> Result<(), VmError> {
        let c = qmp::add_fd {
            fdset_id: Some(fdset),
            opaque: None,
        };
        self.execute_with_fd("add-fd", &c, fd).map(drop)
    }

    /// Drops descriptor set `fdset` (`remove-fd`): QEMU closes its copies once unused.
    pub fn remove_fd(&mut self, fdset: i64) -> Result<(), VmError> {
        self.execute(
            "remove-fd",
            &qmp::remove_fd {
                fd: None,
                fdset_id: fdset,
            },
        )
        .map(drop)
    }

    /// Gives QEMU `fd` under `name` (`getfd`), for a migration URI `fd:<name>`.
    pub fn getfd(&mut self, name: &str, fd: RawFd) -> Result<(), VmError> {
        let c = qmp::getfd {
            fdname: name.to_string(),
        };
        self.execute_with_fd("getfd", &c, fd).map(drop)
    }

    /// Opens `/dev/fdset/<fdset>` as block node `node` ([`fdset_node`]).
    pub fn blockdev_add_fdset(
        &mut self,
        node: &str,
        qcow2: bool,
        fdset: i64,
    ) -> Result<(), VmError> {
        self.execute(
            "blockdev-add",
            &qmp::blockdev_add(fdset_node(node, qcow2, fdset)),
        )
        .map(drop)
    }

    /// Removes block node `node` (`blockdev-del`).
    pub fn blockdev_del(&mut self, node: &str) -> Result<(), VmError> {
        self.execute(
            "blockdev-del",
            &qmp::blockdev_del {
                node_name: node.to_string(),
            },
        )
        .map(drop)
    }

    /// Starts one backup job per `(drive, target node, whole)` in one transaction: every
    /// copy is of the same instant (copy-before-write from then on). `whole`: the whole disk
    /// (`full`), else what the drive's top image holds (`top`). Jobs are named after their
    /// target and stay listed until dismissed ([`Monitor::jobs`]).
    pub fn backup(&mut self, jobs: &[(String, String, bool)]) -> Result<(), VmError> {
        let actions = jobs
            .iter()
            .map(|(drive, target, whole)| {
                qmp::TransactionAction::blockdev_backup(qmp::BlockdevBackupWrapper {
                    data: qmp::BlockdevBackup {
                        base: qmp::BackupCommon {
                            auto_dismiss: Some(false),
                            auto_finalize: None,
                            bitmap: None,
                            bitmap_mode: None,
                            compress: None,
                            discard_source: None,
                            filter_node_name: None,
                            job_id: Some(target.clone()),
                            on_source_error: None,
                            on_target_error: None,
                            speed: None,
                            x_perf: None,
                            device: drive.clone(),
                            sync: if *whole {
                                qmp::MirrorSyncMode::full
                            } else {
                                qmp::MirrorSyncMode::top
                            },
                        },
                        target: target.clone(),
                    },
                })
            })
            .collect();
        self.execute(
            "transaction",
            &qmp::transaction {
                properties: None,
                actions,
            },
        )
        .map(drop)
    }

    /// The block jobs: (id, concluded, error).
    pub fn jobs(&mut self) -> Result<Vec<(String, bool, Option<String>)>, VmError> {
        Ok(self
            .execute("query-jobs", &qmp::query_jobs {})?
            .into_iter()
            .map(|j| {
                let done = matches!(j.status, qmp::JobStatus::concluded | qmp::JobStatus::null);
                (j.id, done, j.error)
            })
            .collect())
    }

    /// Removes a concluded job (`job-dismiss`).
    pub fn job_dismiss(&mut self, id: &str) -> Result<(), VmError> {
        self.execute("job-dismiss", &qmp::job_dismiss { id: id.to_string() })
            .map(drop)
    }

    /// Cancels a job (`job-cancel`).
    pub fn job_cancel(&mut self, id: &str) -> Result<(), VmError> {
        self.execute("job-cancel", &qmp::job_cancel { id: id.to_string() })
            .map(drop)
    }

    /// Starts a migration to `uri` (`migrate`); it runs on in QEMU ([`Monitor::migration`]).
    pub fn migrate(&mut self, uri: &str) -> Result<(), VmError> {
        self.execute(
            "migrate",
            &qmp::migrate {
                channels: None,
                detach: None,
                resume: None,
                uri: Some(uri.to_string()),
            },
        )
        .map(drop)
    }

    /// Starts an incoming migration from `uri` (`migrate-incoming`, QEMU started with
    /// `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), VmError> {
        self.execute(
            "migrate-incoming",
            &qmp::migrate_incoming {
                channels: None,
                exit_on_error: None,
                uri: Some(uri.to_string()),
            },
        )
        .map(drop)
    }

    /// The migration's state (`query-migrate`): status (`active`, `completed`, `failed`, ...),
    /// its error, and the guest's downtime in ms once completed.
    pub fn migration(&mut self) -> Result<(String, Option<String>, Option<i64>), VmError> {
        let m = self.execute("query-migrate", &qmp::query_migrate {})?;
        let status = m
            .status
            .map(|s| qapi::Enum::name(&s).to_string())
            .unwrap_or_else(|| "none".into());
        Ok((status, m.error_desc, m.downtime))
    }

    /// Turns migration capabilities on or off (`migrate-set-capabilities`), by QAPI name
    /// (`auto-converge`, `postcopy-ram`, ...).
    pub fn migration_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), VmError> {
        let mut capabilities = Vec::with_capacity(caps.len());
        for (name, state) in caps {
            let capability =
                name.parse::<qmp::MigrationCapability>()
                    .map_err(|()| VmError::QmpCommand {
                        command: "migrate-set-capabilities".into(),
                        message: format!("unknown capability {name}"),
                    })?;
            capabilities.push(qmp::MigrationCapabilityStatus {
                capability,
                state: *state,
            });
        }
        self.execute(
            "migrate-set-capabilities",
            &qmp::migrate_set_capabilities { capabilities },
        )
        .map(drop)
    }

    /// A live migration's limits (`migrate-set-parameters`): the longest pause at the
    /// switchover (ms) and the bandwidth (bytes/s).
    pub fn migration_limits(&mut self, downtime_ms: u64, bandwidth: u64) -> Result<(), VmError> {
        self.execute(
            "migrate-set-parameters",
            &qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                downtime_limit: Some(downtime_ms),
                max_bandwidth: Some(bandwidth),
                ..Default::default()
            }),
        )
        .map(drop)
    }

    /// The figures of the current (or last) migration (`query-migrate`).
    pub fn migration_stats(&mut self) -> Result<MigrationStats, VmError> {
        let m = self.execute("query-migrate", &qmp::query_migrate {})?;
        Ok(MigrationStats {
            status: m
                .status
                .map(|s| qapi::Enum::name(&s).to_string())
                .unwrap_or_else(|| "none".into()),
            error: m.error_desc,
            downtime_ms: m.downtime.and_then(|v| u64::try_from(v).ok()),
            total_ms: m.total_time.and_then(|v| u64::try_from(v).ok()),
            transferred: m
                .ram
                .as_ref()
                .and_then(|r| u64::try_from(r.transferred).ok())
                .unwrap_or(0),
            remaining: m
                .ram
                .as_ref()
                .and_then(|r| u64::try_from(r.remaining).ok())
                .unwrap_or(0),
            dirty_sync_count: m
                .ram
                .as_ref()
                .and_then(|r| u64::try_from(r.dirty_sync_count).ok())
                .unwrap_or(0),
            cpu_throttle_percent: m
                .cpu_throttle_percentage
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0),
        })
    }

    /// Switches a running migration to post-copy (`migrate-start-postcopy`).
    pub fn start_postcopy(&mut self) -> Result<(), VmError> {
        self.execute("migrate-start-postcopy", &qmp::migrate_start_postcopy {})
            .map(drop)
    }

    /// Cancels a migration (`migrate_cancel`).
    pub fn migrate_cancel(&mut self) -> Result<(), VmError> {
        self.execute("migrate_cancel", &qmp::migrate_cancel {})
            .map(drop)
    }

    /// Asks the guest's balloon driver for its memory statistics every `secs` seconds.
    pub fn balloon_stats_every(&mut self, secs: u32) -> Result<(), VmError> {
        self.execute(
            "qom-set",
            &qmp::qom_set {
                path: format!("/machine/peripheral/{}", super::qemu::BALLOON),
                property: "guest-stats-polling-interval".into(),
                value: serde_json::json!(secs),
            },
        )
        .map(drop)
    }

    /// The guest's memory: what the balloon leaves it (`query-balloon`) and what its driver
    /// last reported (`guest-stats`; the guest's word, informational only).
    pub fn guest_memory(&mut self) -> Result<GuestMemory, VmError> {
        let actual = self
            .execute("query-balloon", &qmp::query_balloon {})?
            .actual;
        let stats = self.execute(
            "qom-get",
            &qmp::qom_get {
                path: format!("/machine/peripheral/{}", super::qemu::BALLOON),
                property: "guest-stats".into(),
            },
        )?;
        let stat = |k: &str| {
            stats["stats"][k]
                .as_i64()
                .and_then(|v| u64::try_from(v).ok())
        };
        let updated = stats["last-update"].as_i64().unwrap_or(0);
        Ok(GuestMemory {
            actual: u64::try_from(actual).unwrap_or(0),
            total: stat("stat-total-memory").filter(|_| updated > 0),
            free: stat("stat-free-memory").filter(|_| updated > 0),
            available: stat("stat-available-memory").filter(|_| updated > 0),
            updated_at: (updated > 0).then_some(updated),
        })
    }

    /// Asks the guest to leave itself `bytes` of RAM (`balloon`): the balloon inflates or
    /// deflates towards it as the guest's driver complies.
    pub fn set_balloon(&mut self, bytes: u64) -> Result<(), VmError> {
        self.execute(
            "balloon",
            &qmp::balloon {
                value: i64::try_from(bytes).unwrap_or(i64::MAX),
            },
        )
        .map(drop)
    }

    /// Hot-plugs `n` vCPUs into free CPU slots (`query-hotpluggable-cpus`, `device_add`).
    pub fn add_vcpus(&mut self, n: u32) -> Result<(), VmError> {
        let mut free: Vec<qmp::HotpluggableCPU> = self
            .execute("query-hotpluggable-cpus", &qmp::query_hotpluggable_cpus {})?
            .into_iter()
            .filter(|c| c.qom_path.is_none())
            .collect();
        // Lowest slots first (QEMU lists them highest first).
        free.sort_by_key(|c| (c.props.socket_id, c.props.core_id, c.props.thread_id));
        if free.len() < n as usize {
            return Err(VmError::QmpCommand {
                command: "device_add".into(),
                message: format!("{n} vCPUs asked, {} free CPU slots", free.len()),
            });
        }
        for c in free.into_iter().take(n as usize) {
            let mut args = qapi::Dictionary::new();
            for (k, v) in [
                ("socket-id", c.props.socket_id),
                ("core-id", c.props.core_id),
                ("thread-id", c.props.thread_id),
                ("die-id", c.props.die_id),
            ] {
                if let Some(v) = v {
                    args.insert(k.into(), serde_json::json!(v));
                }
            }
            let id = format!(
                "gvcpu-{}-{}-{}",
                c.props.socket_id.unwrap_or(0),
                c.props.core_id.unwrap_or(0),
                c.props.thread_id.unwrap_or(0)
            );
            self.execute(
                "device_add",
                &qmp::device_add {
                    bus: None,
                    id: Some(id),
                    driver: c.type_,
                    arguments: args,
                },
            )?;
        }
        Ok(())
    }

    /// Asks the virtio-mem device for `bytes` of plugged memory (`requested-size`).
    pub fn set_virtio_mem(&mut self, bytes: u64) -> Result<(), VmError> {
        self.execute(
            "qom-set",
            &qmp::qom_set {
                path: format!("/machine/peripheral/{}", super::qemu::VIRTIO_MEM),
                property: "requested-size".into(),
                value: serde_json::json!(bytes),
            },
        )
        .map(drop)
    }

    /// What the virtio-mem device has plugged now (`size`).
    pub fn virtio_mem_size(&mut self) -> Result<u64, VmError> {
        let v = self.execute(
            "qom-get",
            &qmp::qom_get {
                path: format!("/machine/peripheral/{}", super::qemu::VIRTIO_MEM),
                property: "size".into(),
            },
        )?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Serves NBD on the unix socket `path` (`nbd-server-start`): a live migration's
    /// destination takes its disks' blocks there.
    pub fn nbd_serve(&mut self, path: &Path) -> Result<(), VmError> {
        let c = qmp::nbd_server_start {
            max_connections: None,
            tls_authz: None,
            tls_creds: None,
            addr: qmp::SocketAddressLegacy::unix(qmp::UnixSocketAddressWrapper {
                data: qmp::UnixSocketAddress {
                    abstract_: None,
                    tight: None,
                    path: path.to_string_lossy().into_owned(),
                },
            }),
        };
        self.execute("nbd-server-start", &c).map(drop)
    }

    /// Stops the NBD server and its exports (`nbd-server-stop`).
    pub fn nbd_stop(&mut self) -> Result<(), VmError> {
        self.execute("nbd-server-stop", &qmp::nbd_server_stop {})
            .map(drop)
    }

    /// Exports block node `node` writable over NBD as `name` (`block-export-add`).
    pub fn nbd_export(&mut self, node: &str, name: &str) -> Result<(), VmError> {
        let c = qmp::block_export_add(qmp::BlockExportOptions::nbd {
            base: qmp::BlockExportOptionsBase {
                fixed_iothread: None,
                iothread: None,
                writable: Some(true),
                writethrough: None,
                id: name.to_string(),
                node_name: node.to_string(),
            },
            nbd: qmp::BlockExportOptionsNbd {
                base: qmp::BlockExportOptionsNbdBase {
                    description: None,
                    name: Some(name.to_string()),
                },
                allocation_depth: None,
                bitmaps: None,
            },
        });
        self.execute("block-export-add", &c).map(drop)
    }

    /// Opens block node `node` on export `export` of the NBD server at the other end of
    /// descriptor `fdname` (given with [`Monitor::getfd`]).
    pub fn blockdev_add_nbd(
        &mut self,
        node: &str,
        fdname: &str,
        export: &str,
    ) -> Result<(), VmError> {
        let opts = qmp::BlockdevOptions::nbd {
            base: block_base(Some(node.to_string())),
            nbd: qmp::BlockdevOptionsNbd {
                export: Some(export.to_string()),
                open_timeout: None,
                reconnect_delay: None,
                tls_creds: None,
                tls_hostname: None,
                x_dirty_bitmap: None,
                server: qmp::SocketAddress::fd(qmp::FdSocketAddress {
                    str: fdname.to_string(),
                }),
            },
        };
        self.execute("blockdev-add", &qmp::blockdev_add(opts))
            .map(drop)
    }

    /// Mirrors drive `device` into block node `target` (`blockdev-mirror`, job `job`): the
    /// whole disk (`full`) or what its top image holds (`top`: the target has the same
    /// backing base). The job turns `ready` once both are the same and keeps them so.
    pub fn mirror(
        &mut self,
        job: &str,
        device: &str,
        target: &str,
        whole: bool,
    ) -> Result<(), VmError> {
        let c = qmp::blockdev_mirror {
            auto_dismiss: None,
            auto_finalize: None,
            buf_size: None,
            copy_mode: None,
            filter_node_name: None,
            granularity: None,
            job_id: Some(job.to_string()),
            on_source_error: None,
            on_target_error: None,
            replaces: None,
            speed: None,
            device: device.to_string(),
            sync: if whole {
                qmp::MirrorSyncMode::full
            } else {
                qmp::MirrorSyncMode::top
            },
            target: target.to_string(),
        };
        self.execute("blockdev-mirror", &c).map(drop)
    }

    /// The jobs by id: their status (`running`, `ready`, `concluded`, ...) and error.
    pub fn job_states(&mut self) -> Result<Vec<(String, String, Option<String>)>, VmError> {
        Ok(self
            .execute("query-jobs", &qmp::query_jobs {})?
            .into_iter()
            .map(|j| (j.id, qapi::Enum::name(&j.status).to_string(), j.error))
            .collect())
    }

    /// Ends block job `job` (`block-job-cancel`): a `ready` mirror leaves its target the same
    /// as its source and ends without switching the drive over to it.
    pub fn block_job_cancel(&mut self, job: &str, force: bool) -> Result<(), VmError> {
        self.execute(
            "block-job-cancel",
            &qmp::block_job_cancel {
                force: Some(force),
                device: job.to_string(),
            },
        )
        .map(drop)
    }

    /// Lets a migration held at `pre-switchover` go on (`migrate-continue`).
    pub fn migrate_continue(&mut self) -> Result<(), VmError> {
        self.execute(
            "migrate-continue",
            &qmp::migrate_continue {
                state: qmp::MigrationStatus::pre_switchover,
            },
        )
        .map(drop)
    }

    /// Pauses the guest's vCPUs (`stop`).
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.execute("stop", &qmp::stop {}).map(drop)
    }

    /// Resumes the guest (`cont`).
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.execute("cont", &qmp::cont {}).map(drop)
    }
}

/// Block node `node` on `/dev/fdset/<fdset>`, without image locking (see the drives in
/// `qemu`): qcow2 with its backing file left closed (a backup target only takes writes), or
/// raw.
fn fdset_node(node: &str, qcow2: bool, fdset: i64) -> qmp::BlockdevOptions {
    let file = qmp::BlockdevRef::definition(Box::new(qmp::BlockdevOptions::file {
        base: block_base(None),
        file: qmp::BlockdevOptionsFile {
            aio: None,
            aio_max_batch: None,
            drop_cache: None,
            locking: Some(qmp::OnOffAuto::off),
            pr_manager: None,
            x_check_cache_dropped: None,
            filename: format!("/dev/fdset/{fdset}"),
        },
    }));
    let base = block_base(Some(node.to_string()));
    let generic = qmp::BlockdevOptionsGenericFormat { file };
    if qcow2 {
        qmp::BlockdevOptions::qcow2 {
            base,
            qcow2: qmp::BlockdevOptionsQcow2::from(qmp::BlockdevOptionsGenericCOWFormat {
                base: generic,
                backing: Some(qmp::BlockdevRefOrNull::null(())),
            }),
        }
    } else {
        qmp::BlockdevOptions::raw {
            base,
            raw: qmp::BlockdevOptionsRaw {
                base: generic,
                offset: None,
                size: None,
            },
        }
    }
}

fn block_base(node_name: Option<String>) -> qmp::BlockdevOptionsBase {
    qmp::BlockdevOptionsBase {
        auto_read_only: None,
        cache: None,
        detect_zeroes: None,
        discard: None,
        force_share: None,
        node_name,
        read_only: None,
    }
}

/// QMP's write side for a command that passes a descriptor: its first write goes out by
/// `sendmsg` with the descriptor attached.
struct FdWriter<'a> {
    stream: &'a UnixStream,
    fd: Option<RawFd>,
}

impl Write for FdWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.fd.take() {
            Some(fd) => {
                use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
                let fds = [fd];
                let iov = [std::io::IoSlice::new(buf)];
                sendmsg::<()>(
                    self.stream.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            }
            None => (&*self.stream).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Longest line (one reply) the guest agent may send; a longer one is an error, read no further.
/// Large enough for `guest-exec-status` with about 12 MiB of output (base64).
pub const MAX_AGENT_LINE: usize = 16 << 20;

/// Most bytes of a command's output (stdout and stderr together) that `qga-exec` keeps and
/// prints; the rest is dropped (the engine's default `exec_max_output`).
pub const MAX_AGENT_OUTPUT: usize = 16 << 20;

/// Longest one agent call (a command and its reply, or the sync) may take.
pub const AGENT_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Most bytes skipped (stale replies, noise) while looking for the sync's answer.
const MAX_SYNC_SKIP: usize = MAX_AGENT_LINE;

/// One agent reply (`{"return": ...}` or `{"error": ...}`).
#[derive(serde::Deserialize)]
struct Reply<T> {
    #[serde(rename = "return")]
    ret: Option<T>,
    error: Option<qapi::Error>,
}

/// The guest agent (`qemu-ga` on the virtio-serial port `org.qemu.guest_agent.0`).
pub struct Agent {
    stream: UnixStream,
    /// Bytes read and not yet consumed (never over [`Agent::max_line`]).
    buf: Vec<u8>,
    max_line: usize,
    call_deadline: Duration,
    /// Set by a signal handler: a read interrupted (EINTR) while it is set fails at once.
    cancel: Option<&'static AtomicBool>,
}

/// What `guest-exec-status` said about a finished command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentExit {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output was dropped past the cap.
    pub truncated: bool,
}

fn agent_err(command: &str, message: impl std::fmt::Display) -> VmError {
    VmError::QmpCommand {
        command: command.to_string(),
        message: message.to_string(),
    }
}

impl Agent {
    /// Connects and synchronises (`guest-sync-delimited` with a random id: stale answers left
    /// in the channel by an earlier client are skipped, within bounds).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, VmError> {
        let stream = connect(socket, timeout)?;
        let mut a = Self::from_stream(stream, MAX_AGENT_LINE, timeout.min(AGENT_CALL_DEADLINE));
        a.sync()?;
        Ok(a)
    }

    /// An agent on a connected stream, not yet synchronised.
    fn from_stream(stream: UnixStream, max_line: usize, call_deadline: Duration) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            max_line,
            call_deadline,
            cancel: None,
        }
    }

    /// `guest-sync-delimited`: a 0xFF byte (the agent drops any partial request), the command,
    /// then everything up to the agent's 0xFF sentinel and every answer with another id is
    /// skipped — at most [`MAX_SYNC_SKIP`] bytes, within the call deadline.
    pub fn sync(&mut self) -> Result<(), VmError> {
        const NAME: &str = "guest-sync-delimited";
        let mut id = [0u8; 4];
        getrandom::fill(&mut id).map_err(|e| agent_err(NAME, e))?;
        let id = i64::from(i32::from_ne_bytes(id) & 0x7fff_ffff);
        let deadline = Instant::now() + self.call_deadline;
        let mut line = vec![0xff];
        line.extend(
            serde_json::to_vec(&qapi::Execute::<_, qapi::Never>::from(
                qga::guest_sync_delimited { id },
            ))
            .map_err(|e| agent_err(NAME, e))?,
        );
        line.push(b'\n');
        self.write_all(&line, deadline)
            .map_err(|e| agent_err(NAME, e))?;
        let mut skipped = 0usize;
        loop {
            // Up to and including the sentinel.
            loop {
                if let Some(i) = self.buf.iter().position(|b| *b == 0xff) {
                    skipped += i;
                    self.buf.drain(..=i);
                    break;
                }
                skipped += self.buf.len();
                self.buf.clear();
                if skipped > MAX_SYNC_SKIP {
                    return Err(agent_err(
                        NAME,
                        format!("no answer within {MAX_SYNC_SKIP} bytes"),
                    ));
                }
                self.fill(deadline).map_err(|e| agent_err(NAME, e))?;
            }
            let reply = self.read_line(deadline).map_err(|e| agent_err(NAME, e))?;
            skipped += reply.len();
            match serde_json::from_slice::<Reply<i64>>(&reply) {
                Ok(Reply { ret: Some(r), .. }) if r == id => return Ok(()),
                // A stale answer (another id, another command's reply): skip it.
                _ if skipped <= MAX_SYNC_SKIP => {}
                _ => {
                    return Err(agent_err(
                        NAME,
                        format!("no answer within {MAX_SYNC_SKIP} bytes"),
                    ))
                }
            }
        }
    }

    fn write_all(&mut self, mut data: &[u8], deadline: Instant) -> std::io::Result<()> {
        while !data.is_empty() {
            let left = remaining(deadline)?;
            self.stream.set_write_timeout(Some(left))?;
            match self.stream.write(data) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) => self.retry(e)?,
            }
        }
        Ok(())
    }

    /// An interrupted read or write is retried unless the cancel flag is set.
    fn retry(&self, e: std::io::Error) -> std::io::Result<()> {
        let cancelled = self.cancel.is_some_and(|c| c.load(Ordering::SeqCst));
        if e.kind() == std::io::ErrorKind::Interrupted && !cancelled {
            return Ok(());
        }
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the guest agent did not answer in time",
            ));
        }
        Err(e)
    }

    /// Reads once more into the buffer, which never grows past `max_line`.
    fn fill(&mut self, deadline: Instant) -> std::io::Result<()> {
        let room = self.max_line.saturating_sub(self.buf.len());
        if room == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the guest agent sent a line over {} bytes", self.max_line),
            ));
        }
        let mut chunk = [0u8; 64 << 10];
        let want = room.min(chunk.len());
        loop {
            let left = remaining(deadline)?;
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the guest agent closed the channel",
                    ))
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) => self.retry(e)?,
            }
        }
    }

    /// One line (without its newline), at most `max_line` bytes, by `deadline`.
    fn read_line(&mut self, deadline: Instant) -> std::io::Result<Vec<u8>> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=scanned + i).collect();
                line.pop();
                return Ok(line);
            }
            scanned = self.buf.len();
            self.fill(deadline)?;
        }
    }

    fn execute<C: qapi::Command>(&mut self, name: &str, c: &C) -> Result<C::Ok, VmError> {
        let deadline = Instant::now() + self.call_deadline;
        let mut line = serde_json::to_vec(&qapi::Execute::<&C, qapi::Never>::from(c))
            .map_err(|e| agent_err(name, e))?;
        line.push(b'\n');
        self.write_all(&line, deadline)
            .map_err(|e| agent_err(name, e))?;
        let reply = self.read_line(deadline).map_err(|e| agent_err(name, e))?;
        let reply: Reply<C::Ok> = serde_json::from_slice(&reply)
            .map_err(|e| agent_err(name, format!("bad reply: {e}")))?;
        match (reply.ret, reply.error) {
            (_, Some(e)) => Err(agent_err(name, e)),
            (Some(r), None) => Ok(r),
            (None, None) => Err(agent_err(name, "reply without a result")),
        }
    }

    /// Freezes the guest's filesystems (`guest-fsfreeze-freeze`); how many it froze.
    pub fn fsfreeze(&mut self) -> Result<i64, VmError> {
        self.execute("guest-fsfreeze-freeze", &qga::guest_fsfreeze_freeze {})
    }

    /// Whether the guest's filesystems are frozen (`guest-fsfreeze-status`).
    pub fn fsfreeze_status(&mut self) -> Result<bool, VmError> {
        let s = self.execute("guest-fsfreeze-status", &qga::guest_fsfreeze_status {})?;
        Ok(matches!(s, qga::GuestFsfreezeStatus::frozen))
    }

    /// Thaws them (`guest-fsfreeze-thaw`).
    pub fn fsthaw(&mut self) -> Result<i64, VmError> {
        self.execute("guest-fsfreeze-thaw", &qga::guest_fsfreeze_thaw {})
    }

    /// Onlines every offline vCPU (`guest-get-vcpus`, `guest-set-vcpus`): how many vCPUs the
    /// guest knows of, and whether every one is online now.
    pub fn online_vcpus(&mut self) -> Result<(usize, bool), VmError> {
        let all: Vec<qga::GuestLogicalProcessor> =
            self.execute("guest-get-vcpus", &qga::guest_get_vcpus {})?;
        let known = all.len();
        let offline: Vec<qga::GuestLogicalProcessor> = all
            .into_iter()
            .filter(|c| !c.online)
            .map(|c| qga::GuestLogicalProcessor {
                can_offline: None,
                logical_id: c.logical_id,
                online: true,
            })
            .collect();
        if offline.is_empty() {
            return Ok((known, true));
        }
        let asked = offline.len();
        let n = self.execute("guest-set-vcpus", &qga::guest_set_vcpus { vcpus: offline })?;
        Ok((known, usize::try_from(n).is_ok_and(|n| n >= asked)))
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

    /// `None` while the command runs; its exit status and output (at most `max_output` bytes,
    /// stdout first) once it ended.
    pub fn exec_status(
        &mut self,
        pid: i64,
        max_output: usize,
    ) -> Result<Option<AgentExit>, VmError> {
        let s = self.execute("guest-exec-status", &qga::guest_exec_status { pid })?;
        if !s.exited {
            return Ok(None);
        }
        let code = match (s.exitcode, s.signal) {
            (Some(c), _) => c as i32,
            (None, Some(sig)) => 128 + sig as i32,
            (None, None) => 255,
        };
        let mut stdout = s.out_data.unwrap_or_default();
        let mut stderr = s.err_data.unwrap_or_default();
        let truncated = stdout.len().saturating_add(stderr.len()) > max_output;
        stdout.truncate(max_output);
        stderr.truncate(max_output - stdout.len());
        Ok(Some(AgentExit {
            code,
            stdout,
            stderr,
            truncated,
        }))
    }
}

fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the guest agent did not answer in time",
        ));
    }
    Ok(left)
}

/// This process's start time, from `/proc/self/stat`.
fn own_start_time() -> Option<u64> {
    let pid = i32::try_from(std::process::id()).ok()?;
    crate::reap::start_time(&crate::HostRoot::real(), pid)
}

/// This binary's hidden `qga-exec` mode: the command `instance exec` runs for a VM. Runs `args`
/// in the guest through the agent on `socket` (stdin, when asked, read whole and passed as the
/// command's input), writes `<own pid> <guest pid> <own start time>` to `pid_file` once it runs,
/// polls its status, then prints its stdout and stderr (at most `max_output` bytes) and returns
/// its exit status. SIGTERM (what [`kill_agent_exec`] sends) interrupts any read and kills the
/// guest process (`kill -9`, on the same agent connection after a fresh sync: the agent's
/// channel serves one client at a time) and ends with 137.
pub fn agent_exec_main(
    socket: &Path,
    pid_file: &Path,
    args: &[String],
    env: &[String],
    stdin: bool,
    max_output: usize,
) -> i32 {
    static TERM: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_term(_: libc::c_int) {
        TERM.store(true, Ordering::SeqCst);
    }
    // Without SA_RESTART, so that a read blocked on the agent returns EINTR.
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_term),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let _ = nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGTERM, &action);
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
    let mut agent = match Agent::connect(socket, AGENT_CALL_DEADLINE) {
        Ok(a) => a,
        Err(e) => {
            return fail(&format!(
                "the guest agent does not answer ({e}): is qemu-guest-agent running in the guest?"
            ))
        }
    };
    agent.cancel = Some(&TERM);
    let pid = match agent.exec(path, rest, env, stdin.then_some(input.as_slice())) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    };
    let start = own_start_time().unwrap_or(0);
    let _ = std::fs::write(pid_file, format!("{} {pid} {start}\n", std::process::id()));
    loop {
        if TERM.load(Ordering::SeqCst) {
            // A reply may have been cut by the signal: resynchronise first.
            agent.cancel = None;
            if agent.sync().is_ok() {
                let _ = agent.exec(
                    "/bin/sh",
                    &["-c".to_string(), format!("kill -9 {pid}")],
                    &[],
                    None,
                );
            }
            return 137;
        }
        match agent.exec_status(pid, max_output) {
            Ok(Some(done)) => {
                let _ = std::io::stdout().write_all(&done.stdout);
                let _ = std::io::stderr().write_all(&done.stderr);
                if done.truncated {
                    eprintln!("gpuvisor: output cut at {max_output} bytes");
                }
                return done.code;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) if TERM.load(Ordering::SeqCst) => {}
            Err(e) => return fail(&e.to_string()),
        }
    }
}

/// Kills an agent exec: SIGTERM to its `qga-exec` process (the first pid of `pid_file`, only
/// while that pid is still the process that wrote the file: its start time, the third field,
/// matches, and its command line is a `qga-exec`), which kills the guest process. Returns how
/// many were signalled.
pub fn kill_agent_exec(root: &crate::HostRoot, pid_file: &Path) -> usize {
    let text = std::fs::read_to_string(pid_file).unwrap_or_default();
    let _ = std::fs::remove_file(pid_file);
    let mut fields = text.split_whitespace();
    let Some(host) = fields.next().and_then(|p| p.parse::<i32>().ok()) else {
        return 0;
    };
    let Some(start) = fields.nth(1).and_then(|s| s.parse::<u64>().ok()) else {
        return 0;
    };
    if crate::reap::start_time(root, host) != Some(start) {
        return 0;
    }
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

/// The offset of RAM block `name` in `x-query-ramblock`'s table (columns: block name, page
/// size with its unit, offset, used, total, host address, RO): the row whose first column is
/// the name, its offset in hex. None without such a row or with an offset it cannot read.
pub fn ramblock_offset(table: &str, name: &str) -> Option<u64> {
    table.lines().find_map(|l| {
        let mut cols = l.split_whitespace();
        (cols.next()? == name).then_some(())?;
        let offset = cols.nth(2)?.strip_prefix("0x")?;
        u64::from_str_radix(offset, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader as StdBufReader};

    /// `x-query-ramblock`'s table as QEMU 10.0 prints it: the named block's offset, none for
    /// a block it does not list or a row it cannot read.
    #[test]
    fn ramblock_offsets_are_read_from_the_table() {
        let t = "              Block Name    PSize              Offset               Used              Total                HVA  RO\n      0000:00:01.0/vmem0    4 KiB  0x0000000020000000 0x0000000040000000 0x0000000040000000 0x00007f6f0fc00000  rw\n                  pc.ram    4 KiB  0x0000000000000000 0x0000000020000000 0x0000000020000000 0x00007f6f4fe00000  rw\n   0000:00:02.0/vga.vram    4 KiB  0x0000000060080000 0x0000000000400000 0x0000000000400000 0x00007f6f0f600000  rw\n";
        assert_eq!(ramblock_offset(t, "pc.ram"), Some(0));
        assert_eq!(ramblock_offset(t, "0000:00:01.0/vmem0"), Some(0x2000_0000));
        assert_eq!(
            ramblock_offset(t, "0000:00:02.0/vga.vram"),
            Some(0x6008_0000)
        );
        assert_eq!(ramblock_offset(t, "vga.vram"), None);
        assert_eq!(ramblock_offset(t, "Block"), None);
        assert_eq!(ramblock_offset("pc.ram 4 KiB zzz", "pc.ram"), None);
        assert_eq!(ramblock_offset("", "pc.ram"), None);
    }

    /// A snapshot's backup targets reach QEMU as fd-set nodes: no backing file opened, no
    /// image lock.
    #[test]
    fn backup_targets_are_fd_set_nodes_without_backing_or_locks() {
        let v =
            serde_json::to_value(qmp::blockdev_add(fdset_node("gvsnap-root", true, 200))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"driver": "qcow2", "node-name": "gvsnap-root", "backing": null,
                "file": {"driver": "file", "filename": "/dev/fdset/200", "locking": "off"}})
        );
        let v =
            serde_json::to_value(qmp::blockdev_add(fdset_node("gvsnap-vol0", false, 201))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"driver": "raw", "node-name": "gvsnap-vol0",
                "file": {"driver": "file", "filename": "/dev/fdset/201", "locking": "off"}})
        );
    }

    /// A QEMU that floods its QMP greeting (no line end) is cut off at the byte budget: the
    /// handshake fails, having read no more than the budget.
    #[test]
    fn a_flooding_monitor_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let chunk = vec![b'a'; 64 << 10];
            let mut sent = 0u64;
            let _ = c.write_all(b"{\"QMP\": \"");
            while c.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
                if sent > 64 * MAX_QMP_CALL_BYTES {
                    break;
                }
            }
            sent
        });
        let err = Monitor::connect(&sock, Duration::from_secs(5))
            .err()
            .expect("the handshake must fail");
        assert!(
            err.to_string().contains("bytes for one QMP command"),
            "{err}"
        );
        let sent = t.join().unwrap();
        // The writer stopped when we closed: it got at most the budget and the socket buffers
        // through, nowhere near the 64 MiB it would have sent.
        assert!(sent < 8 * MAX_QMP_CALL_BYTES, "{sent} bytes taken");
    }

    /// An agent over a socketpair whose other end `fake` plays the guest agent.
    fn agent_with(
        max_line: usize,
        deadline: Duration,
        fake: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (Agent, std::thread::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || fake(theirs));
        (Agent::from_stream(ours, max_line, deadline), t)
    }

    /// Reads one request line (after an optional 0xFF) and returns it as JSON.
    fn request(r: &mut StdBufReader<&UnixStream>) -> serde_json::Value {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        let line: Vec<u8> = line.into_iter().filter(|b| *b != 0xff).collect();
        serde_json::from_slice(&line).unwrap()
    }

    fn sentinel(line: &str) -> Vec<u8> {
        let mut v = vec![0xff];
        v.extend_from_slice(line.as_bytes());
        v
    }

    #[test]
    fn sync_skips_stale_answers_and_sentinels() {
        let (mut a, t) = agent_with(1 << 20, Duration::from_secs(5), |s| {
            let mut r = StdBufReader::new(&s);
            let req = request(&mut r);
            assert_eq!(req["execute"], "guest-sync-delimited");
            let id = req["arguments"]["id"].as_i64().unwrap();
            let mut w = &s;
            // An earlier client's unread answers: a plain one, a half line, a stale sync.
            w.write_all(b"{\"return\": {\"pid\": 7}}\n{\"retu").unwrap();
            w.write_all(&sentinel(&format!("{{\"return\": {}}}\n", id + 1)))
                .unwrap();
            w.write_all(&sentinel(&format!("{{\"return\": {id}}}\n")))
                .unwrap();
            let req = request(&mut r);
            assert_eq!(req["execute"], "guest-exec");
            w.write_all(b"{\"return\": {\"pid\": 42}}\n").unwrap();
        });
        a.sync().unwrap();
        assert_eq!(a.exec("/bin/true", &[], &[], None).unwrap(), 42);
        t.join().unwrap();
    }

    #[test]
    fn sync_gives_up_on_an_agent_that_never_answers_its_id() {
        let (mut a, t) = agent_with(1 << 20, Duration::from_millis(500), |s| {
            let mut r = StdBufReader::new(&s);
            let id = request(&mut r)["arguments"]["id"].as_i64().unwrap();
            let mut w = &s;
            for _ in 0..1000 {
                let line = sentinel(&format!("{{\"return\": {}}}\n", id + 1));
                if w.write_all(&line).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let started = Instant::now();
        assert!(a.sync().is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn a_line_over_the_cap_is_an_error_not_a_buffer() {
        let (mut a, t) = agent_with(1 << 20, Duration::from_secs(10), |s| {
            let mut r = StdBufReader::new(&s);
            request(&mut r);
            let mut w = &s;
            // No newline, ever: 8 MiB, eight times the cap.
            let chunk = vec![b' '; 64 << 10];
            for _ in 0..128 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let e = a.exec_status(1, MAX_AGENT_OUTPUT).unwrap_err().to_string();
        assert!(e.contains("over 1048576 bytes"), "{e}");
        assert!(a.buf.capacity() <= 2 << 20, "{}", a.buf.capacity());
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn a_trickling_agent_hits_the_call_deadline() {
        let (mut a, t) = agent_with(1 << 20, Duration::from_millis(300), |s| {
            let mut r = StdBufReader::new(&s);
            request(&mut r);
            let mut w = &s;
            // A byte every 20 ms: each read succeeds, the line never ends.
            for _ in 0..500 {
                if w.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let started = Instant::now();
        let e = a.exec_status(1, MAX_AGENT_OUTPUT).unwrap_err().to_string();
        assert!(e.contains("in time"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn output_is_cut_at_the_cap() {
        let (mut a, t) = agent_with(1 << 20, Duration::from_secs(5), |s| {
            let mut r = StdBufReader::new(&s);
            request(&mut r);
            // "hello world" twice.
            (&s).write_all(
                b"{\"return\": {\"exited\": true, \"exitcode\": 3, \"out-data\": \"aGVsbG8gd29ybGQ=\", \"err-data\": \"aGVsbG8gd29ybGQ=\"}}\n",
            )
            .unwrap();
            request(&mut r);
            (&s).write_all(
                b"{\"return\": {\"exited\": true, \"exitcode\": 0, \"out-data\": \"aGVsbG8gd29ybGQ=\"}}\n",
            )
            .unwrap();
        });
        let done = a.exec_status(1, 15).unwrap().unwrap();
        assert_eq!(done.code, 3);
        assert_eq!(done.stdout, b"hello world");
        assert_eq!(done.stderr, b"hell");
        assert!(done.truncated);
        let done = a.exec_status(1, 15).unwrap().unwrap();
        assert_eq!(done.stdout, b"hello world");
        assert!(!done.truncated);
        t.join().unwrap();
    }

    #[test]
    fn kill_agent_exec_checks_the_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::HostRoot::real();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; :", "qga-exec"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = crate::reap::start_time(&root, pid).unwrap();
        // `spawn` returns once the child's execve let go of the parent's memory, which can be
        // before the new program's arguments are readable in /proc (an empty cmdline, seen
        // under load): wait for them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .any(|a| a == b"qga-exec")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "sh never showed its arguments"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let file = dir.path().join("exec.pid");
        // Another process that once had this pid (another start time), and a file without one.
        for text in [format!("{pid} 9 {}\n", start + 1), format!("{pid} 9\n")] {
            std::fs::write(&file, text).unwrap();
            assert_eq!(kill_agent_exec(&root, &file), 0);
            assert!(child.try_wait().unwrap().is_none());
        }
        std::fs::write(&file, format!("{pid} 9 {start}\n")).unwrap();
        assert_eq!(kill_agent_exec(&root, &file), 1);
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}
