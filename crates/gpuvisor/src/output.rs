//! Everything the CLI prints on stdout: one generic printer for JSON and YAML (the wire types
//! serialized as they are, so scripts see exactly what the API answers) and the human tables.
//!
//! Tables follow kubectl: no borders, upper-case headers, columns separated by spaces, sizes in
//! binary units through [`gpuvisor_wire::format_size`], times as ages. The table functions are
//! pure (`now` is passed in) so that tests can pin their output.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::{presets, Table};
use gpuvisor_wire::{
    format_size, ApiKey, CreatedKey, Event, GpuBinding, Health, Image, Instance, Tenant, Volume,
};
use serde::Serialize;

/// `-o table|json|yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
    /// Comma-separated values (`usage` only).
    Csv,
}

/// Renders `value` as pretty JSON or YAML; `None` for the table format, which each caller
/// renders itself.
pub fn structured<T: Serialize + ?Sized>(format: Format, value: &T) -> io::Result<Option<String>> {
    match format {
        Format::Table => Ok(None),
        Format::Json => serde_json::to_string_pretty(value)
            .map(Some)
            .map_err(io::Error::other),
        Format::Yaml => serde_yaml::to_string(value)
            .map(Some)
            .map_err(io::Error::other),
        Format::Csv => Err(io::Error::other(
            "-o csv is for `gpuvisor usage`; use table, json or yaml here",
        )),
    }
}

/// Prints `value` in `format`: JSON/YAML generically, the table through `table`.
pub fn print<T: Serialize + ?Sized>(
    format: Format,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> io::Result<()> {
    let text = match structured(format, value)? {
        Some(text) => text,
        None => table(value),
    };
    print_text(&text)
}

/// Writes `text` to stdout with exactly one trailing newline.
pub fn print_text(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.trim_end_matches('\n').as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Writes bytes to stdout as they are (logs, exec output).
pub fn print_raw(data: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(data)?;
    out.flush()
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for column in t.column_iter_mut() {
        column.set_padding((0, 3));
    }
    t.trim_fmt()
}

/// kubectl-style age: `42s`, `5m`, `3h`, `2d`.
pub fn format_age(then_ms: i64, now_ms: i64) -> String {
    let secs = now_ms.saturating_sub(then_ms).max(0) / 1000;
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// RFC 3339 time of a Unix-milliseconds timestamp.
pub fn format_time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => ms.to_string(),
    }
}

/// A GPU amount in thousandths as a number of GPUs: `1`, `2`, `0.25`, `0.125`.
pub fn format_gpus(milli: u32) -> String {
    let (whole, thousandths) = (milli / 1000, milli % 1000);
    if thousandths == 0 {
        return whole.to_string();
    }
    let s = format!("{:.3}", f64::from(milli) / 1000.0);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// CPU list in the kernel's cpuset syntax: `0-3,8,10-11`.
pub fn format_cpus(cpus: &[u32]) -> String {
    gpuvisor_wire::format_cpu_list(cpus)
}

/// Disk I/O limits per disk, e.g. `read 100 IOPS, 50MiB/s; write 20MiB/s (each disk)`, or `-`.
pub fn format_disk_io(io: &gpuvisor_wire::DiskIo) -> String {
    if io.is_unlimited() {
        "-".into()
    } else {
        format!("{io} (each disk)")
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

fn instance_gpus(gpus: &[GpuBinding]) -> String {
    if gpus.is_empty() {
        return "-".to_string();
    }
    format_gpus(gpus.iter().map(|g| g.milli).sum())
}

pub fn instances_table(instances: &[Instance], now_ms: i64) -> String {
    table(
        &[
            "ID", "NAME", "STATE", "IMAGE", "GPUS", "VCPUS", "MEMORY", "IP", "AGE",
        ],
        instances.iter().map(|i| {
            vec![
                i.id.clone(),
                i.name.clone(),
                i.state.to_string(),
                i.image.clone(),
                instance_gpus(&i.gpus),
                i.vcpus.to_string(),
                format_size(i.memory),
                or_dash(i.ip.as_deref().unwrap_or("")),
                format_age(i.created_at, now_ms),
            ]
        }),
    )
}

/// `instance get` in table mode: `key: value` lines, lists indented below their key.
pub fn instance_detail(i: &Instance, now_ms: i64) -> String {
    let mut lines: Vec<(String, String)> = vec![
        ("ID".into(), i.id.clone()),
        ("Name".into(), i.name.clone()),
        ("Tenant".into(), i.tenant.clone()),
        ("Node".into(), or_dash(&i.node)),
        ("State".into(), i.state.to_string()),
        ("Desired".into(), i.desired.to_string()),
        ("Reason".into(), or_dash(i.reason.as_deref().unwrap_or(""))),
        ("Image".into(), i.image.clone()),
        (
            "Runtime".into(),
            match &i.accel {
                Some(a) => format!("{} ({a})", i.runtime),
                None => i.runtime.to_string(),
            },
        ),
        ("VCPUs".into(), i.vcpus.to_string()),
        ("CPUs".into(), or_dash(&format_cpus(&i.cpus))),
        ("Memory".into(), format_size(i.memory)),
        ("Container disk".into(), format_size(i.container_disk)),
        ("Disk I/O limits".into(), format_disk_io(&i.disk_io)),
        ("IP".into(), or_dash(i.ip.as_deref().unwrap_or(""))),
        (
            "Ports".into(),
            or_dash(
                &i.ports
                    .iter()
                    .map(|p| match p.host_port {
                        Some(h) => format!("{p} (host port {h})"),
                        None => p.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ),
        ("URLs".into(), or_dash(&i.urls.join(", "))),
        (
            "Idle timeout".into(),
            i.idle_timeout_secs.map_or("-".into(), |t| {
                humantime::format_duration(std::time::Duration::from_secs(t)).to_string()
            }),
        ),
        (
            "Last activity".into(),
            i.last_activity_at
                .map_or("-".into(), |t| format!("{} ago", format_age(t, now_ms))),
        ),
        ("Command".into(), or_dash(&i.command.join(" "))),
        (
            "Restart".into(),
            format!("{} ({} restarts)", i.restart, i.restart_count),
        ),
        (
            "Exit code".into(),
            i.exit_code
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
        ),
        (
            "Priority".into(),
            format!(
                "{}{}",
                i.priority.as_str(),
                if i.interruptible {
                    " (interruptible)"
                } else {
                    ""
                }
            ),
        ),
        (
            "Bid".into(),
            i.bid_per_gpu_hour
                .map_or_else(|| "-".to_string(), |b| format!("{b} /GPU-hour")),
        ),
        (
            "Cost".into(),
            i.cost.as_ref().map_or_else(
                || "-".to_string(),
                |c| {
                    format!(
                        "{} {cur}/hour now, {} {cur} so far",
                        money(c.per_hour),
                        money(c.total),
                        cur = c.currency
                    )
                },
            ),
        ),
        (
            "Created".into(),
            format!(
                "{} ({} ago)",
                format_time(i.created_at),
                format_age(i.created_at, now_ms)
            ),
        ),
        ("Updated".into(), format_time(i.updated_at)),
    ];
    let width = lines
        .iter()
        .map(|(k, _)| k.len())
        .chain(["GPUs", "Volumes", "Env"].iter().map(|k| k.len()))
        .max()
        .unwrap_or(0)
        + 2;
    let mut out = String::new();
    let mut push = |key: &str, value: &str| {
        out.push_str(&format!("{:<width$}{value}\n", format!("{key}:")));
    };
    for (k, v) in lines.drain(..) {
        push(&k, &v);
    }
    let mut list = |key: &str, items: Vec<String>| {
        if items.is_empty() {
            out.push_str(&format!("{:<width$}-\n", format!("{key}:")));
        } else {
            out.push_str(&format!("{key}:\n"));
            for item in items {
                out.push_str(&format!("  - {item}\n"));
            }
        }
    };
    list(
        "GPUs",
        i.gpus
            .iter()
            .map(|g| {
                let mut line = format!(
                    "{} {} ({}) milli={} vram={}",
                    g.index,
                    g.uuid,
                    g.model,
                    g.milli,
                    format_size(g.vram)
                );
                if let Some(u) = i.gpu_usage.iter().find(|u| u.uuid == g.uuid) {
                    line.push_str(&format!(
                        " | limiter: vram {} / {}, share {}%, util {}%, launches {}",
                        format_size(u.vram_used),
                        format_size(u.vram_quota),
                        u.share_milli / 10,
                        u.util_milli / 10,
                        u.launches
                    ));
                }
                line
            })
            .collect(),
    );
    list(
        "Volumes",
        i.volumes
            .iter()
            .map(|v| match v.size {
                Some(size) => format!("{}:{} ({})", v.name, v.path, format_size(size)),
                None => format!("{}:{}", v.name, v.path),
            })
            .collect(),
    );
    list("Env", i.env.clone());
    if let Some(m) = &i.guest_memory {
        let mut line = format!("{} (balloon)", format_size(m.actual));
        if let (Some(used), Some(total)) = (m.used, m.total) {
            line.push_str(&format!(
                ", guest reports {} used of {}",
                format_size(used),
                format_size(total)
            ));
        }
        out.push_str(&format!("{:<width$}{line}\n", "Guest memory:"));
    }
    if let Some(f) = &i.gpu_fraction {
        out.push_str(&format!("{:<width$}{}\n", "Fraction:", f.summary));
    }
    out
}

pub fn gpus_table(gpus: &[gpuvisor_wire::Gpu]) -> String {
    table(
        &[
            "INDEX",
            "MODEL",
            "UUID",
            "VRAM",
            "ALLOCATED",
            "INSTANCES",
            "BACKEND",
            "STATUS",
        ],
        gpus.iter().map(|g| {
            let allocated = if g.allocated_milli == 0 && g.allocated_vram == 0 {
                "-".to_string()
            } else {
                format!(
                    "{} GPU / {}",
                    format_gpus(g.allocated_milli),
                    format_size(g.allocated_vram)
                )
            };
            let mut status = Vec::new();
            if g.passthrough_ready {
                status.push("vfio-pci".to_string());
            }
            if g.mig_enabled {
                status.push("MIG mode (use its slices)".to_string());
            }
            if let Some(c) = &g.cordoned {
                status.push(format!("cordoned: {c}"));
            }
            vec![
                // A MIG slice: <parent index>/<GPU instance>.
                match &g.mig {
                    Some(m) => format!("{}/{}", g.index, m.gi),
                    None => g.index.to_string(),
                },
                g.model.clone(),
                g.uuid.clone(),
                format_size(g.vram),
                allocated,
                g.instances.len().to_string(),
                g.backend.clone(),
                if status.is_empty() {
                    "-".to_string()
                } else {
                    status.join("; ")
                },
            ]
        }),
    )
}

/// `sha256:0123456789ab…` → `0123456789ab`.
fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(12).collect()
}

pub fn images_table(images: &[Image], now_ms: i64) -> String {
    table(
        &["NAME", "DIGEST", "SIZE", "LAYERS", "VISIBLE TO", "AGE"],
        images.iter().map(|i| {
            vec![
                i.name.clone(),
                short_digest(&i.digest),
                format_size(i.size),
                i.layers.len().to_string(),
                i.tenant.clone().unwrap_or_else(|| "everyone".into()),
                format_age(i.created_at, now_ms),
            ]
        }),
    )
}

pub fn registries_table(list: &[gpuvisor_wire::RegistryCredential], now_ms: i64) -> String {
    table(
        &["HOST", "USERNAME", "AGE"],
        list.iter().map(|c| {
            vec![
                c.host.clone(),
                c.username.clone(),
                format_age(c.created_at, now_ms),
            ]
        }),
    )
}

/// The progress of an image pull on stderr: one redrawn line on a terminal, otherwise a line
/// per layer as it finishes.
pub struct PullProgress {
    tty: bool,
    reported: Vec<String>,
    drawn: bool,
}

impl PullProgress {
    pub fn new(tty: bool) -> Self {
        Self {
            tty,
            reported: Vec::new(),
            drawn: false,
        }
    }

    /// `layers 2/3  12.0 MiB / 40.0 MiB`.
    pub fn summary(job: &gpuvisor_wire::ImagePull) -> String {
        let total: u64 = job.layers.iter().map(|l| l.size).sum();
        let done: u64 = job.layers.iter().map(|l| l.done.min(l.size)).sum();
        let finished = job
            .layers
            .iter()
            .filter(|l| l.state == "done" || l.state == "present")
            .count();
        let what = if job.unpacking {
            "unpacking"
        } else {
            "pulling"
        };
        format!(
            "{what} {}: layers {finished}/{}  {} / {}",
            job.reference,
            job.layers.len(),
            format_size(done),
            format_size(total)
        )
    }

    pub fn show(&mut self, job: &gpuvisor_wire::ImagePull) {
        use std::io::Write as _;
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{}", Self::summary(job));
            self.drawn = true;
        } else {
            for l in &job.layers {
                if (l.state == "done" || l.state == "present") && !self.reported.contains(&l.digest)
                {
                    self.reported.push(l.digest.clone());
                    let how = if l.state == "present" {
                        "already here"
                    } else {
                        "downloaded"
                    };
                    let _ = writeln!(
                        err,
                        "layer {} {how} ({})",
                        short_digest(&l.digest),
                        format_size(l.size)
                    );
                }
            }
        }
        let _ = err.flush();
    }

    pub fn finish(&mut self, job: &gpuvisor_wire::ImagePull) {
        use std::io::Write as _;
        let mut err = std::io::stderr().lock();
        if self.tty && self.drawn {
            let _ = writeln!(err);
        }
        if job.state == "done" && !job.id.is_empty() {
            let _ = writeln!(
                err,
                "pulled {} ({})",
                job.reference,
                job.digest.as_deref().unwrap_or("")
            );
        }
    }
}

pub fn volumes_table(volumes: &[Volume], now_ms: i64) -> String {
    table(
        &["NAME", "TENANT", "SIZE", "STATE", "IN USE BY", "AGE"],
        volumes.iter().map(|v| {
            vec![
                v.name.clone(),
                v.tenant.clone(),
                format_size(v.size),
                v.state.to_string(),
                or_dash(v.in_use_by.as_deref().unwrap_or("")),
                format_age(v.created_at, now_ms),
            ]
        }),
    )
}

pub fn snapshots_table(snaps: &[gpuvisor_wire::Snapshot], now_ms: i64) -> String {
    table(
        &[
            "NAME", "ID", "TENANT", "INSTANCE", "RUNTIME", "STATE", "SIZE", "DISK", "VOLUMES",
            "MEMORY", "AGE",
        ],
        snaps.iter().map(|s| {
            vec![
                s.name.clone(),
                s.id.clone(),
                s.tenant.clone(),
                s.instance_name
                    .clone()
                    .unwrap_or_else(|| s.instance_id.clone()),
                s.runtime.to_string(),
                s.state.to_string(),
                format_size(s.bytes),
                format_size(s.disk_size),
                or_dash(&s.volumes.join(",")),
                if s.memory { "saved" } else { "-" }.to_string(),
                format_age(s.created_at, now_ms),
            ]
        }),
    )
}

pub fn snapshot_detail(s: &gpuvisor_wire::Snapshot, now_ms: i64) -> String {
    let lines: Vec<(&str, String)> = vec![
        ("ID", s.id.clone()),
        ("Name", s.name.clone()),
        ("Tenant", s.tenant.clone()),
        (
            "Instance",
            match &s.instance_name {
                Some(n) => format!("{n} ({})", s.instance_id),
                None => s.instance_id.clone(),
            },
        ),
        ("Runtime", s.runtime.to_string()),
        ("Image", s.image.clone()),
        ("State", s.state.to_string()),
        ("Consistency", or_dash(&s.consistency)),
        ("Size on disk", format_size(s.bytes)),
        ("Disk", format_size(s.disk_size)),
        ("Volumes", or_dash(&s.volumes.join(", "))),
        (
            "Running state",
            if s.memory {
                format!(
                    "saved ({} vCPUs, {} of memory)",
                    s.vcpus,
                    format_size(s.memory_bytes)
                )
            } else {
                "-".into()
            },
        ),
        (
            "Created",
            format!(
                "{} ({} ago)",
                format_time(s.created_at),
                format_age(s.created_at, now_ms)
            ),
        ),
    ];
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    lines
        .iter()
        .map(|(k, v)| format!("{:<width$}{v}\n", format!("{k}:")))
        .collect()
}

pub fn templates_table(ts: &[gpuvisor_wire::Template], now_ms: i64) -> String {
    table(
        &[
            "NAME", "OWNER", "IMAGE", "RUNTIME", "GPUS", "VCPUS", "MEMORY", "DISK", "AGE",
        ],
        ts.iter().map(|t| {
            let s = &t.spec;
            vec![
                t.name.clone(),
                t.tenant.clone().unwrap_or_else(|| "public".into()),
                s.image.clone(),
                s.runtime.map_or("-".into(), |r| r.to_string()),
                template_gpus(s),
                s.vcpus.map_or("-".into(), |v| v.to_string()),
                s.memory.map_or("-".into(), format_size),
                s.container_disk.map_or("-".into(), format_size),
                format_age(t.created_at, now_ms),
            ]
        }),
    )
}

fn template_gpus(s: &gpuvisor_wire::TemplateSpec) -> String {
    let n = match (s.gpus, s.gpu_fraction) {
        (Some(n), _) => n.to_string(),
        (_, Some(f)) => f.to_string(),
        _ => return "-".into(),
    };
    match &s.gpu_model {
        Some(m) => format!("{n} x {m}"),
        None => n,
    }
}

/// `template get` in table mode.
pub fn template_detail(t: &gpuvisor_wire::Template) -> String {
    let s = &t.spec;
    let join = |v: Vec<String>| or_dash(&v.join(", "));
    let rows = [
        ("Name", t.name.clone()),
        ("Owner", t.tenant.clone().unwrap_or_else(|| "public".into())),
        (
            "Description",
            or_dash(s.description.as_deref().unwrap_or("")),
        ),
        ("Image", s.image.clone()),
        ("Runtime", s.runtime.map_or("-".into(), |r| r.to_string())),
        ("GPUs", template_gpus(s)),
        ("VCPUs", s.vcpus.map_or("-".into(), |v| v.to_string())),
        ("Memory", s.memory.map_or("-".into(), format_size)),
        (
            "Container disk",
            s.container_disk.map_or("-".into(), format_size),
        ),
        (
            "Volumes",
            join(
                s.volumes
                    .iter()
                    .map(|v| {
                        let size = v
                            .size
                            .map_or(String::new(), |z| format!(" ({})", format_size(z)));
                        format!("{}:{}{size}", v.name, v.path)
                    })
                    .collect(),
            ),
        ),
        ("Env", join(s.env.clone())),
        (
            "Ports",
            join(s.ports.iter().map(ToString::to_string).collect()),
        ),
        ("Command", or_dash(&s.command.join(" "))),
        (
            "Startup script",
            s.startup_script
                .as_ref()
                .map_or("-".into(), |x| format!("{} lines", x.lines().count())),
        ),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<16}{v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn endpoints_table(es: &[gpuvisor_wire::Endpoint], now_ms: i64) -> String {
    table(
        &[
            "ID", "NAME", "TEMPLATE", "WORKERS", "SCALER", "QUEUED", "RUNNING", "AGE",
        ],
        es.iter().map(|e| {
            let w = &e.health.workers;
            vec![
                e.id.clone(),
                e.name.clone(),
                e.spec.template.clone(),
                format!(
                    "{}/{}..{}",
                    w.idle + w.running + w.initializing,
                    e.spec.workers_min,
                    e.spec.workers_max
                ),
                e.spec.scaler.to_string(),
                e.health.jobs.in_queue.to_string(),
                e.health.jobs.in_progress.to_string(),
                format_age(e.created_at, now_ms),
            ]
        }),
    )
}

/// `endpoint get` in table mode.
pub fn endpoint_detail(e: &gpuvisor_wire::Endpoint) -> String {
    let s = &e.spec;
    let (j, w) = (&e.health.jobs, &e.health.workers);
    let gpus = match (s.gpus, s.gpu_fraction) {
        (Some(n), _) => n.to_string(),
        (_, Some(f)) => f.to_string(),
        _ => "the template's".into(),
    };
    let rows = [
        ("Id", e.id.clone()),
        ("Name", e.name.clone()),
        ("Tenant", e.tenant.clone()),
        ("Queue", format!("{} (RunPod's API)", e.path)),
        ("Template", s.template.clone()),
        ("GPUs", gpus),
        ("Workers", format!("{} to {}", s.workers_min, s.workers_max)),
        ("Scaler", s.scaler.to_string()),
        ("Idle timeout", format!("{}s", s.idle_timeout_secs)),
        (
            "Exec timeout",
            format!("{}s", s.execution_timeout_ms / 1000),
        ),
        ("Flashboot", s.flashboot.to_string()),
        (
            "Jobs",
            format!(
                "{} queued, {} running, {} completed, {} failed, {} retried",
                j.in_queue, j.in_progress, j.completed, j.failed, j.retried
            ),
        ),
        (
            "Worker states",
            format!(
                "{} idle, {} running, {} initializing, {} parked, {} unhealthy",
                w.idle, w.running, w.initializing, w.parked, w.unhealthy
            ),
        ),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<16}{v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn tenants_table(tenants: &[Tenant], now_ms: i64) -> String {
    table(
        &["ID", "NAME", "AGE"],
        tenants.iter().map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                format_age(t.created_at, now_ms),
            ]
        }),
    )
}

/// `tenant get`: each quota as `used / limit`, then the priority rights.
pub fn tenant_detail(t: &Tenant) -> String {
    // The quotas that apply: the admin's, or the tenant admin's own where stricter.
    fn stricter<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        }
    }
    let (a, l) = (&t.policy, &t.limits);
    let p = &gpuvisor_wire::TenantPolicy {
        max_instances: stricter(a.max_instances, l.max_instances),
        max_gpus: stricter(a.max_gpus, l.max_gpus),
        max_gpu_milli: stricter(a.max_gpu_milli, l.max_gpu_milli),
        max_vcpus: stricter(a.max_vcpus, l.max_vcpus),
        max_memory: stricter(a.max_memory, l.max_memory),
        max_disk: stricter(a.max_disk, l.max_disk),
        max_volumes: stricter(a.max_volumes, l.max_volumes),
        ..a.clone()
    };
    let u = t.usage.clone().unwrap_or_default();
    let n = |used: u32, max: Option<u32>| {
        format!(
            "{used} / {}",
            max.map_or("unlimited".to_string(), |m| m.to_string())
        )
    };
    let sz = |used: u64, max: Option<u64>| {
        format!(
            "{} / {}",
            format_size(used),
            max.map_or("unlimited".to_string(), format_size)
        )
    };
    let frac = |v: u32| format!("{:.3}", f64::from(v) / 1000.0);
    let rows = [
        ("ID", t.id.clone()),
        ("Name", t.name.clone()),
        ("Instances", n(u.instances, p.max_instances)),
        ("GPUs", n(u.gpus, p.max_gpus)),
        (
            "GPU fractions",
            format!(
                "{} / {}",
                frac(u.gpu_milli),
                p.max_gpu_milli.map_or("unlimited".to_string(), frac)
            ),
        ),
        ("VCPUs", n(u.vcpus, p.max_vcpus)),
        ("Memory", sz(u.memory, p.max_memory)),
        ("Disk", sz(u.disk, p.max_disk)),
        ("Volumes", n(u.volumes, p.max_volumes)),
        ("Max priority", p.max_priority.as_str().to_string()),
        (
            "Preempts other tenants",
            if p.preempt_other_tenants { "yes" } else { "no" }.to_string(),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    rows.iter()
        .map(|(k, v)| {
            format!(
                "{:<width$}{v}
",
                format!("{k}:")
            )
        })
        .collect()
}

pub fn keys_table(keys: &[ApiKey], now_ms: i64) -> String {
    table(
        &["ID", "TENANT", "ROLE", "REVOKED", "AGE"],
        keys.iter().map(|k| {
            vec![
                k.id.clone(),
                k.tenant.clone(),
                k.role.as_str().to_string(),
                k.revoked.to_string(),
                format_age(k.created_at, now_ms),
            ]
        }),
    )
}

pub fn audit_table(rows: &[gpuvisor_wire::AuditEntry]) -> String {
    table(
        &[
            "SEQ", "TIME", "TENANT", "KEY", "ROLE", "OP", "TARGET", "RESULT", "SOURCE",
        ],
        rows.iter().map(|r| {
            vec![
                r.seq.to_string(),
                format_time(r.at),
                r.tenant.clone(),
                r.key_id.clone(),
                r.role.clone(),
                r.op.clone(),
                r.target.clone(),
                r.result.clone(),
                r.source.clone(),
            ]
        }),
    )
}

/// A money amount: cents for sums of a cent or more, else four significant digits.
pub fn money(v: f64) -> String {
    if v == 0.0 || v.abs() >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.6}")
    }
}

pub fn gpu_types_table(types: &[gpuvisor_wire::GpuType]) -> String {
    table(
        &[
            "MODEL",
            "VRAM",
            "FREE",
            "TOTAL",
            "ON-DEMAND/H",
            "INTERRUPTIBLE/H",
            "FLOOR/H",
        ],
        types.iter().map(|t| {
            vec![
                t.model.clone(),
                format_size(t.vram),
                t.free.to_string(),
                t.total.to_string(),
                format!("{} {}", money(t.on_demand_price), t.currency),
                format!("{} {}", money(t.interruptible_price), t.currency),
                format!("{} {}", money(t.interruptible_floor), t.currency),
            ]
        }),
    )
}

/// The GPU column of a usage line: `A100-80GB` or `A100-80GB x0.25`, `(spot)` when
/// interruptible.
fn usage_what(l: &gpuvisor_wire::UsageLine) -> String {
    let mut s = l.model.clone().unwrap_or_default();
    if let Some(m) = l.milli.filter(|m| *m != 1000) {
        s.push_str(&format!(" x{}", f64::from(m) / 1000.0));
    }
    if l.interruptible {
        s.push_str(" (spot)");
    }
    s
}

const USAGE_COLUMNS: [&str; 11] = [
    "TENANT",
    "SUBJECT",
    "ID",
    "NAME",
    "RESOURCE",
    "GPU",
    "SECONDS",
    "UNIT_SECONDS",
    "UNIT_PRICE",
    "COST",
    "CURRENCY",
];

fn usage_row(l: &gpuvisor_wire::UsageLine, currency: &str) -> Vec<String> {
    vec![
        l.tenant.clone(),
        l.subject.clone(),
        l.id.clone(),
        l.name.clone(),
        l.resource.clone(),
        usage_what(l),
        format!("{:.3}", l.seconds),
        format!("{:.3}", l.unit_seconds),
        l.unit_price.to_string(),
        format!("{:.6}", l.cost),
        currency.to_string(),
    ]
}

pub fn usage_table(r: &gpuvisor_wire::UsageReport) -> String {
    let mut out = format!("usage {} .. {}\n", format_time(r.from), format_time(r.to));
    out.push_str(&table(
        &USAGE_COLUMNS,
        r.lines.iter().map(|l| usage_row(l, &r.currency)),
    ));
    out.push_str(&format!("\ntotal: {} {}", money(r.total_cost), r.currency));
    out
}

/// RFC 4180 CSV: a header, one row per line (fields with commas, quotes or newlines quoted).
pub fn usage_csv(r: &gpuvisor_wire::UsageReport) -> String {
    let field = |f: &str| {
        if f.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", f.replace('"', "\"\""))
        } else {
            f.to_string()
        }
    };
    let line = |fields: Vec<String>| {
        fields
            .iter()
            .map(|f| field(f))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = line(USAGE_COLUMNS.iter().map(|c| c.to_lowercase()).collect());
    for l in &r.lines {
        out.push_str("\r\n");
        out.push_str(&line(usage_row(l, &r.currency)));
    }
    out
}

pub fn audit_verification_text(v: &gpuvisor_wire::AuditVerification) -> String {
    match (&v.problem, v.last_seq) {
        (Some(p), _) => format!("audit log BROKEN after {} good rows: {p}", v.rows),
        (None, None) => "audit log empty".to_string(),
        (None, Some(last)) => format!(
            "audit log intact: {} rows ({}..{last}), head hash {}\n(keep the head hash outside the store: a later verify shows whether newer rows were cut off)",
            v.rows,
            v.first_seq.unwrap_or(last),
            v.head_hash.as_deref().unwrap_or("-")
        ),
    }
}

/// The one time a key's secret is shown: on a line of its own, easy to copy.
pub fn created_key_text(created: &CreatedKey) -> String {
    format!(
        "created {} key {} for tenant {}\n\n    {}\n\nthis secret is shown only once: store it now (e.g. export GPUVISOR_API_KEY=...)",
        created.key.role.as_str(),
        created.key.id,
        created.key.tenant,
        created.secret
    )
}

pub fn events_table(events: &[Event]) -> String {
    table(
        &["TIME", "KIND", "MESSAGE"],
        events
            .iter()
            .map(|e| vec![format_time(e.at), e.kind.clone(), e.message.clone()]),
    )
}

pub fn gpu_events_table(events: &[gpuvisor_wire::GpuEvent]) -> String {
    table(
        &["TIME", "GPU", "KIND", "MESSAGE"],
        events.iter().map(|e| {
            vec![
                format_time(e.at),
                e.index.to_string(),
                e.kind.clone(),
                e.message.clone(),
            ]
        }),
    )
}

pub fn health_table(h: &Health) -> String {
    table(
        &["STATUS", "VERSION", "NODE"],
        [vec![h.status.clone(), h.version.clone(), h.node.clone()]],
    )
}

/// A metric value in its unit (the metric name ends with it).
fn metric_value(metric: &str, v: f64) -> String {
    if metric.ends_with("_bytes") {
        format_size(v.max(0.0) as u64)
    } else if metric.ends_with("_bytes_per_s") {
        format!("{}/s", format_size(v.max(0.0) as u64))
    } else if metric.ends_with("_percent") {
        format!("{v:.1}%")
    } else {
        format!("{v:.1}")
    }
}

/// One row per metric: newest value, mean and maximum over the window, and the point count.
pub fn metrics_table(h: &gpuvisor_wire::MetricsHistory) -> String {
    let body = table(
        &["METRIC", "LAST", "AVG", "MAX", "POINTS"],
        h.series.iter().map(|s| {
            let m = s.metric.as_str();
            let last = s
                .points
                .last()
                .map_or("-".into(), |p| metric_value(m, p.avg));
            let (avg, max) = if s.points.is_empty() {
                ("-".into(), "-".into())
            } else {
                let avg = s.points.iter().map(|p| p.avg).sum::<f64>() / s.points.len() as f64;
                let max = s.points.iter().map(|p| p.max).fold(f64::MIN, f64::max);
                (metric_value(m, avg), metric_value(m, max))
            };
            vec![m.to_string(), last, avg, max, s.points.len().to_string()]
        }),
    );
    format!("{} {} (step {}s)\n{body}", h.kind, h.id, h.step_s)
}

/// The `gpu top` view.
pub fn gpu_top_table(gpus: &[gpuvisor_wire::GpuStats]) -> String {
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.0}{unit}"));
    table(
        &[
            "GPU",
            "MODEL",
            "UTIL",
            "MEMORY",
            "TEMP",
            "POWER",
            "SM MHZ",
            "PCIE TX/RX",
            "INST",
            "XID",
            "STATUS",
        ],
        gpus.iter().map(|g| {
            let mem = match g.memory_used {
                Some(u) => format!("{}/{}", format_size(u), format_size(g.memory_total)),
                None => format!("-/{}", format_size(g.memory_total)),
            };
            let pcie = match (g.pcie_tx_kbs, g.pcie_rx_kbs) {
                (Some(t), Some(r)) => format!("{}/{} MB/s", t / 1000, r / 1000),
                _ => "-".into(),
            };
            let mut status: Vec<String> = g.alarms.clone();
            if let Some(c) = &g.cordoned {
                status.push(format!("cordoned: {c}"));
            }
            if g.simulated {
                status.push("simulated".into());
            }
            vec![
                g.index.to_string(),
                g.model.clone(),
                opt(g.util_percent, "%"),
                mem,
                opt(g.temperature_c, "C"),
                opt(g.power_w, "W"),
                g.sm_clock_mhz.map_or("-".into(), |v| v.to_string()),
                pcie,
                g.instances.to_string(),
                g.last_xid
                    .map_or("-".into(), |x| format!("{x} ({})", g.xid_errors)),
                if status.is_empty() {
                    "ok".into()
                } else {
                    status.join(", ")
                },
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvisor_wire::{InstanceState, PortSpec, VolumeMount};

    const NOW: i64 = 1_700_000_000_000;

    fn sample() -> Instance {
        Instance {
            id: "i-0a1b2c".into(),
            node: "host".into(),
            name: "train".into(),
            tenant: "acme".into(),
            image: "pytorch".into(),
            state: InstanceState::Running,
            reason: None,
            desired: InstanceState::Running,
            vcpus: 4,
            cpus: vec![3, 0, 1, 2, 8],
            memory: 16 << 30,
            container_disk: 10 << 30,
            gpus: vec![GpuBinding {
                uuid: "GPU-1234".into(),
                index: 0,
                model: "A100-80GB".into(),
                milli: 250,
                vram: 20 << 30,
            }],
            volumes: vec![VolumeMount {
                name: "data".into(),
                path: "/workspace".into(),
                size: Some(50 << 30),
            }],
            env: vec!["A=1".into()],
            ports: vec![PortSpec {
                port: 8888,
                protocol: "http".into(),
                public: false,
                host_port: None,
            }],
            command: vec!["python".into(), "train.py".into()],
            ip: Some("10.77.0.2".into()),
            urls: Vec::new(),
            idle_timeout_secs: None,
            disk_io: Default::default(),
            last_activity_at: None,
            gpu_usage: vec![],
            guest_memory: None,
            gpu_fraction: None,
            priority: Default::default(),
            interruptible: false,
            bid_per_gpu_hour: None,
            cost: None,
            restart: gpuvisor_wire::RestartPolicy::OnFailure { max: Some(3) },
            runtime: gpuvisor_wire::RuntimeKind::Container,
            restart_count: 2,
            exit_code: Some(3),
            accel: None,
            created_at: NOW - 5 * 60 * 1000,
            updated_at: NOW,
        }
    }

    #[test]
    fn instance_table() {
        let text = instances_table(&[sample()], NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            ["ID", "NAME", "STATE", "IMAGE", "GPUS", "VCPUS", "MEMORY", "IP", "AGE"]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "i-0a1b2c",
                "train",
                "running",
                "pytorch",
                "0.25",
                "4",
                "16GiB",
                "10.77.0.2",
                "5m"
            ]
        );
        // No borders, no leading padding, columns aligned.
        assert!(lines[0].starts_with("ID "));
        assert_eq!(lines[0].find("NAME"), lines[1].find("train"));
    }

    #[test]
    fn instance_detail_lines() {
        let text = instance_detail(&sample(), NOW);
        assert!(text.contains("CPUs:"), "{text}");
        assert!(text
            .lines()
            .any(|l| l.starts_with("CPUs:") && l.ends_with("0-3,8")));
        assert!(text.contains("  - 0 GPU-1234 (A100-80GB) milli=250 vram=20GiB"));
        assert!(text.contains("  - data:/workspace (50GiB)"));
        assert!(text
            .lines()
            .any(|l| l.starts_with("Reason:") && l.ends_with('-')));
        assert!(text
            .lines()
            .any(|l| l.starts_with("Restart:") && l.ends_with("on-failure:3 (2 restarts)")));
        assert!(text
            .lines()
            .any(|l| l.starts_with("Exit code:") && l.ends_with(" 3")));
    }

    #[test]
    fn volume_table_shows_the_state() {
        let v = Volume {
            name: "data".into(),
            tenant: "acme".into(),
            size: 32 << 20,
            state: gpuvisor_wire::VolumeState::Pending,
            in_use_by: None,
            created_at: NOW,
            vm_only: false,
        };
        let text = volumes_table(&[v], NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].find("STATE"), lines[1].find("pending"), "{text}");
    }

    #[test]
    fn empty_table_keeps_header() {
        assert_eq!(
            tenants_table(&[], NOW)
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["ID", "NAME", "AGE"]
        );
    }

    #[test]
    fn formats() {
        assert_eq!(format_gpus(250), "0.25");
        assert_eq!(format_gpus(2000), "2");
        assert_eq!(format_gpus(125), "0.125");
        assert_eq!(format_gpus(1500), "1.5");
        assert_eq!(format_cpus(&[0, 1, 2, 3]), "0-3");
        assert_eq!(format_cpus(&[5, 1, 2, 9, 10]), "1-2,5,9-10");
        assert_eq!(format_cpus(&[]), "");
        assert_eq!(format_age(NOW - 42_000, NOW), "42s");
        assert_eq!(format_age(NOW - 3 * 3600 * 1000, NOW), "3h");
        assert_eq!(format_age(NOW + 1000, NOW), "0s");
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
    }

    #[test]
    fn gpu_allocation_column() {
        let gpu = gpuvisor_wire::Gpu {
            uuid: "GPU-1".into(),
            index: 0,
            model: "H100".into(),
            vram: 80 << 30,
            pci_address: "0000:01:00.0".into(),
            numa_node: Some(0),
            backend: "simulated".into(),
            allocated_milli: 250,
            allocated_vram: 20 << 30,
            instances: vec!["i-1".into()],
            driver: Some("nvidia".into()),
            passthrough_ready: false,
            mig_enabled: false,
            mig: None,
            cordoned: Some("XID 79".into()),
        };
        let slice = gpuvisor_wire::Gpu {
            uuid: "MIG-1".into(),
            model: "H100-1g.10gb".into(),
            mig: Some(gpuvisor_wire::mig::MigSlice {
                parent_uuid: "GPU-1".into(),
                gi: 3,
                ci: 0,
                profile: "1g.10gb".into(),
                slices: 1,
            }),
            cordoned: None,
            ..gpu.clone()
        };
        let text = gpus_table(&[gpu, slice]);
        assert!(text.contains("0.25 GPU / 20GiB"), "{text}");
        assert!(text.contains("cordoned: XID 79"), "{text}");
        assert!(text.contains("0/3 "), "{text}");
    }

    #[test]
    fn structured_output() {
        let i = sample();
        let json = structured(Format::Json, &i).unwrap().unwrap();
        let back: Instance = serde_json::from_str(&json).unwrap();
        assert_eq!(back, i);
        let yaml = structured(Format::Yaml, &i).unwrap().unwrap();
        assert!(yaml.contains("state: running"));
        assert!(structured(Format::Table, &i).unwrap().is_none());
    }
}
