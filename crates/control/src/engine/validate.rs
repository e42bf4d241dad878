//! Validation of user input, in one place for every front end. Each rule returns a message that
//! says what is wrong and what to do.

use crate::error::{invalid, Result};
use gpuvisor_wire::{format_size, CreateInstance, VolumeMount};
use std::collections::HashSet;
use std::path::{Component, Path};

/// Ports an instance may declare, and TCP ones among them (each maps a host port).
pub const MAX_PORTS: usize = 32;
pub const MAX_TCP_PORTS: usize = 16;

/// The longest idle timeout.
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 365 * 86_400;

pub const MIN_MEMORY: u64 = 16 << 20;
/// The least a VM may be given: what a small cloud image's kernel, initrd and cloud-init boot in.
pub const MIN_VM_MEMORY: u64 = 128 << 20;
pub const MIN_DISK: u64 = 64 << 20;
pub const MAX_DISK: u64 = 16 << 40;
pub const MIN_VOLUME: u64 = 16 << 20;
pub const MAX_VOLUME: u64 = 64 << 40;
pub const MAX_GPUS: u32 = 64;
/// SSH keys a VM may be given, and the longest key line (an RSA-16384 key is under 3 KiB).
pub const MAX_SSH_KEYS: usize = 32;
pub const MAX_SSH_KEY_LEN: usize = 8 << 10;
/// The largest startup script (cloud-init user-data stays small).
pub const MAX_STARTUP_SCRIPT: usize = 64 << 10;
/// Most packages one VM asks cloud-init for.
pub const MAX_PACKAGES: usize = 64;

/// Names of instances, volumes, images and tenants: DNS-label-like.
pub fn name(kind: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && s.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{kind} name {s:?} is invalid: use 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

pub fn env(kv: &str) -> Result<()> {
    let Some((k, _)) = kv.split_once('=') else {
        return Err(invalid(format!(
            "environment entry {kv:?} is not KEY=VALUE"
        )));
    };
    let ok = !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(invalid(format!(
            "environment variable name {k:?} is invalid: use letters, digits and '_', not starting with a digit"
        )));
    }
    if gpuvisor_wire::platform_env(k) {
        return Err(invalid(format!(
            "environment variable {k} is set by the platform and cannot be given (it selects the instance's GPUs or configures its GPU limiter)"
        )));
    }
    if kv.contains('\0') {
        return Err(invalid(format!(
            "environment entry {k:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// A mount path inside the instance: absolute, normalised, not over the kernel filesystems.
pub fn mount_path(p: &str) -> Result<()> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(invalid(format!(
            "volume path {p:?} must be absolute (e.g. /workspace)"
        )));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(invalid(format!(
            "volume path {p:?} must not contain '.' or '..'"
        )));
    }
    if path == Path::new("/") {
        return Err(invalid("a volume cannot be mounted over /"));
    }
    for forbidden in ["/proc", "/sys", "/dev"] {
        if path.starts_with(forbidden) {
            return Err(invalid(format!(
                "volume path {p:?} is under {forbidden}, which the runtime owns; choose another path"
            )));
        }
    }
    Ok(())
}

pub fn volume_size(size: u64) -> Result<()> {
    if !(MIN_VOLUME..=MAX_VOLUME).contains(&size) {
        return Err(invalid(format!(
            "volume size {} is out of range: use {} to {}",
            format_size(size),
            format_size(MIN_VOLUME),
            format_size(MAX_VOLUME)
        )));
    }
    Ok(())
}

/// Host limits the request is checked against before placement.
pub struct HostLimits {
    pub gpus: u32,
    pub cpus: u32,
    pub cpu_ratio: u32,
    pub memory: u64,
}

impl HostLimits {
    /// The largest host there could be: only the request's own rules apply.
    pub const ANY: HostLimits = HostLimits {
        gpus: MAX_GPUS,
        cpus: u32::MAX,
        cpu_ratio: 1,
        memory: u64::MAX,
    };
}

/// The vCPU and memory rules of an instance's size, at creation and at `instance scale`.
pub fn size(
    vcpus: u32,
    memory: u64,
    runtime: gpuvisor_wire::RuntimeKind,
    host: &HostLimits,
) -> Result<()> {
    if vcpus == 0 {
        return Err(invalid("--vcpus must be at least 1"));
    }
    if vcpus > host.cpus {
        return Err(crate::error::EngineError::InsufficientResources(format!(
            "{} vCPUs requested but this host has {} CPUs",
            vcpus, host.cpus
        )));
    }
    if runtime == gpuvisor_wire::RuntimeKind::Vm && memory < MIN_VM_MEMORY {
        return Err(invalid(format!(
            "--memory {} is too small for a VM: at least {} (its kernel, initrd and cloud-init must boot in it)",
            format_size(memory),
            format_size(MIN_VM_MEMORY)
        )));
    }
    if memory < MIN_MEMORY {
        return Err(invalid(format!(
            "--memory {} is too small: at least {}",
            format_size(memory),
            format_size(MIN_MEMORY)
        )));
    }
    if memory > host.memory {
        return Err(crate::error::EngineError::InsufficientResources(format!(
            "--memory {} is more than this host has ({})",
            format_size(memory),
            format_size(host.memory)
        )));
    }
    Ok(())
}

/// Disk I/O limits: none below what keeps a disk usable (a limit of 1 operation a second
/// would hang the guest's or container's file system), none past what a u64 of the kernel's
/// and QEMU's interfaces holds sensibly. 0 (take it away) passes here; create stores none.
pub fn disk_io(io: &gpuvisor_wire::DiskIo) -> Result<()> {
    const MIN_IOPS: u64 = 10;
    const MIN_BPS: u64 = 64 << 10;
    const MAX: u64 = 1 << 50;
    let check = |what: &str, v: Option<u64>, min: u64| match v {
        Some(v) if v != 0 && !(min..=MAX).contains(&v) => Err(invalid(format!(
            "{what} {v} is outside {min}..={MAX} (0 takes the limit away)"
        ))),
        _ => Ok(()),
    };
    check("disk read IOPS", io.read_iops, MIN_IOPS)?;
    check("disk write IOPS", io.write_iops, MIN_IOPS)?;
    check("disk read bytes/s", io.read_bps, MIN_BPS)?;
    check("disk write bytes/s", io.write_bps, MIN_BPS)
}

pub fn create(req: &CreateInstance, host: &HostLimits) -> Result<()> {
    if req.image.is_empty() {
        return Err(invalid("an image is required (see `gpuvisor image list`)"));
    }
    if let Some(n) = &req.name {
        name("instance", n)?;
    }
    match (req.gpus, req.gpu_fraction) {
        (Some(_), Some(_)) => return Err(invalid("give either --gpus or --gpu-fraction, not both")),
        (Some(0), _) => return Err(invalid("--gpus must be at least 1 (leave it out for no GPU)")),
        (Some(n), _) if n > MAX_GPUS => return Err(invalid(format!("--gpus {n} is absurd: at most {MAX_GPUS}"))),
        (Some(n), _) if n > host.gpus => {
            return Err(crate::error::EngineError::InsufficientResources(format!(
                "{n} GPUs requested but this host has {}",
                host.gpus
            )))
        }
        // Fractions are held in thousandths: one that rounds to a whole GPU (0.9995 and up)
        // would be a whole GPU counted as a fraction, past the tenant's GPU quotas.
        (_, Some(f)) if !(f.is_finite() && (0.001..0.9995).contains(&f)) => {
            return Err(invalid(format!(
                "--gpu-fraction {f} is out of range: use a fraction from 0.001 to 0.999; for whole GPUs use --gpus"
            )))
        }
        (_, Some(_)) if host.gpus == 0 => {
            return Err(crate::error::EngineError::InsufficientResources(
                "a GPU fraction was requested but this host has no GPUs".into(),
            ))
        }
        _ => {}
    }
    if req.runtime() == gpuvisor_wire::RuntimeKind::Container
        && (!req.ssh_keys.is_empty() || !req.packages.is_empty())
    {
        return Err(invalid(
            "--ssh-key and --package are for VMs (--runtime vm): a container runs its image; use `instance exec` for a shell",
        ));
    }
    if req.packages.len() > MAX_PACKAGES {
        return Err(invalid(format!(
            "{} packages given: at most {MAX_PACKAGES}",
            req.packages.len()
        )));
    }
    if let Some(p) = req
        .packages
        .iter()
        .find(|p| !gpuvisor_node::vm::seed::package_ok(p))
    {
        return Err(invalid(format!(
            "package {:?} is not a Debian package name (lowercase letters, digits, + - ., optionally =VERSION)",
            p.chars().take(64).collect::<String>()
        )));
    }
    if req.ssh_keys.len() > MAX_SSH_KEYS {
        return Err(invalid(format!(
            "{} SSH keys given: at most {MAX_SSH_KEYS}",
            req.ssh_keys.len()
        )));
    }
    for k in &req.ssh_keys {
        let mut words = k.split_whitespace();
        let (kind, body) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let known =
            kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
        if k.len() > MAX_SSH_KEY_LEN || !known || body.is_empty() || k.contains(['\n', '\r']) {
            return Err(invalid(format!(
                "SSH key {:?} is not one public key line (`ssh-ed25519 AAAA... comment`, at most {MAX_SSH_KEY_LEN} bytes)",
                k.chars().take(40).collect::<String>()
            )));
        }
    }
    if req
        .startup_script
        .as_ref()
        .is_some_and(|s| s.len() > MAX_STARTUP_SCRIPT)
    {
        return Err(invalid(format!(
            "--startup-script is over {} KiB",
            MAX_STARTUP_SCRIPT >> 10
        )));
    }
    if req.runtime() == gpuvisor_wire::RuntimeKind::Vm && req.gpu_fraction.is_some() {
        return Err(invalid(
            "a VM takes whole GPUs by passthrough: a fraction of a GPU cannot be given to a VM (use --gpus N, or a container for --gpu-fraction)",
        ));
    }
    if req.vram.is_some() && req.gpu_fraction.is_none() {
        return Err(invalid("--vram applies to --gpu-fraction only"));
    }
    if req.vram == Some(0) {
        return Err(invalid("--vram must be more than 0"));
    }
    size(req.vcpus, req.memory, req.runtime(), host)?;
    if !(MIN_DISK..=MAX_DISK).contains(&req.container_disk) {
        return Err(invalid(format!(
            "--container-disk {} is out of range: use {} to {}",
            format_size(req.container_disk),
            format_size(MIN_DISK),
            format_size(MAX_DISK)
        )));
    }
    let mut names = HashSet::new();
    let mut paths = HashSet::new();
    for VolumeMount {
        name: n,
        path,
        size,
    } in &req.volumes
    {
        name("volume", n)?;
        mount_path(path)?;
        if let Some(s) = size {
            volume_size(*s)?;
        }
        if !names.insert(n.as_str()) {
            return Err(invalid(format!("volume {n:?} is mounted twice")));
        }
        if !paths.insert(path.trim_end_matches('/')) {
            return Err(invalid(format!("two volumes are mounted at {path:?}")));
        }
    }
    for e in &req.env {
        env(e)?;
    }
    let tcp = req.ports.iter().filter(|p| !p.is_http()).count();
    if req.ports.len() > MAX_PORTS || tcp > MAX_TCP_PORTS {
        return Err(invalid(format!(
            "at most {MAX_PORTS} ports, {MAX_TCP_PORTS} of them TCP (each takes a host port)"
        )));
    }
    let mut seen_ports = std::collections::BTreeSet::new();
    for p in &req.ports {
        if p.port == 0 {
            return Err(invalid("port 0 is not a port"));
        }
        if !seen_ports.insert(p.port) {
            return Err(invalid(format!("port {} is given twice", p.port)));
        }
        if p.public && !p.is_http() {
            return Err(invalid(format!(
                "port {p}: only HTTP ports are public or private (the proxy serves them); a \
                 {} port is reached at its host port",
                p.protocol
            )));
        }
        if !matches!(p.protocol.as_str(), "http" | "https" | "tcp" | "udp") {
            return Err(invalid(format!(
                "port protocol {:?} is unknown: use http, https, tcp or udp",
                p.protocol
            )));
        }
    }
    disk_io(&req.disk_io)?;
    if req
        .idle_timeout_secs
        .is_some_and(|t| t == 0 || t > MAX_IDLE_TIMEOUT_SECS)
    {
        return Err(invalid(format!(
            "the idle timeout runs from 1 s to {} days",
            MAX_IDLE_TIMEOUT_SECS / 86_400
        )));
    }
    if req.command.iter().any(|a| a.contains('\0')) {
        return Err(invalid("the command contains a NUL byte"));
    }
    if req.runtime() == gpuvisor_wire::RuntimeKind::Vm {
        vm(req)?;
    }
    Ok(())
}

/// What only a VM refuses, with the rules its provisioning applies (`vm::seed`), so that a
/// request it would fail is refused here, before anything is placed or made.
fn vm(req: &CreateInstance) -> Result<()> {
    use gpuvisor_node::vm::seed;
    if let Some(n) = &req.name {
        if !seed::hostname_ok(n) {
            return Err(invalid(format!(
                "instance name {n:?} cannot be a VM's host name: use letters, digits and '-' \
                 (no '_'), in labels of at most 63 separated by single dots, none starting or \
                 ending with '-'"
            )));
        }
    }
    for v in &req.volumes {
        if !seed::serial_ok(&v.name) {
            return Err(invalid(format!(
                "volume name {:?} is too long for a VM: a VM sees a volume as a disk whose \
                 serial is the volume's name, and a serial holds at most {} bytes; use a \
                 shorter name",
                v.name,
                seed::MAX_SERIAL
            )));
        }
    }
    if !req.env.is_empty() {
        return Err(invalid(
            "--env is for containers: a VM's processes get their environment from its own init, \
             not from gpuvisor; set variables in --startup-script, or in the command \
             (-- env KEY=VALUE CMD...)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvisor_wire::PortSpec;

    fn ok_req() -> CreateInstance {
        CreateInstance {
            image: "busybox".into(),
            vcpus: 1,
            memory: 256 << 20,
            container_disk: 1 << 30,
            ..Default::default()
        }
    }
    const HOST: HostLimits = HostLimits {
        gpus: 2,
        cpus: 4,
        cpu_ratio: 1,
        memory: 8 << 30,
    };

    #[test]
    fn accepts_a_sane_request() {
        create(&ok_req(), &HOST).unwrap();
    }

    #[test]
    fn rejects_bad_input_with_the_right_code() {
        type Mutate = Box<dyn Fn(&mut CreateInstance)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|r| r.vcpus = 0), "invalid_argument"),
            (Box::new(|r| r.vcpus = 99), "insufficient_resources"),
            (Box::new(|r| r.memory = 0), "invalid_argument"),
            (Box::new(|r| r.memory = 1 << 40), "insufficient_resources"),
            (Box::new(|r| r.container_disk = 1), "invalid_argument"),
            (Box::new(|r| r.gpus = Some(3)), "insufficient_resources"),
            (Box::new(|r| r.gpus = Some(0)), "invalid_argument"),
            (Box::new(|r| r.gpu_fraction = Some(1.5)), "invalid_argument"),
            (
                Box::new(|r| r.gpu_fraction = Some(0.9999)),
                "invalid_argument",
            ),
            (
                Box::new(|r| r.gpu_fraction = Some(-0.5)),
                "invalid_argument",
            ),
            (
                Box::new(|r| {
                    r.gpus = Some(1);
                    r.gpu_fraction = Some(0.5)
                }),
                "invalid_argument",
            ),
            (
                Box::new(|r| r.env = vec!["NOEQUALS".into()]),
                "invalid_argument",
            ),
            (
                Box::new(|r| r.env = vec!["1X=y".into()]),
                "invalid_argument",
            ),
            (
                Box::new(|r| r.name = Some("Bad Name".into())),
                "invalid_argument",
            ),
            (
                Box::new(|r| {
                    r.volumes = vec![VolumeMount {
                        name: "v".into(),
                        path: "rel".into(),
                        size: None,
                    }]
                }),
                "invalid_argument",
            ),
            (
                Box::new(|r| {
                    r.volumes = vec![VolumeMount {
                        name: "v".into(),
                        path: "/a/../etc".into(),
                        size: None,
                    }]
                }),
                "invalid_argument",
            ),
            (
                Box::new(|r| {
                    r.volumes = vec![VolumeMount {
                        name: "v".into(),
                        path: "/proc/x".into(),
                        size: None,
                    }]
                }),
                "invalid_argument",
            ),
            (
                Box::new(|r| {
                    r.volumes = vec![VolumeMount {
                        name: "v".into(),
                        path: "/dev".into(),
                        size: None,
                    }]
                }),
                "invalid_argument",
            ),
            (
                Box::new(|r| {
                    r.ports = vec![PortSpec {
                        port: 80,
                        protocol: "gopher".into(),
                        public: false,
                        host_port: None,
                    }]
                }),
                "invalid_argument",
            ),
        ];
        for (i, (mutate, code)) in cases.into_iter().enumerate() {
            let mut r = ok_req();
            mutate(&mut r);
            let e = create(&r, &HOST).expect_err(&format!("case {i} must fail"));
            assert_eq!(e.code(), code, "case {i}: {e}");
        }
    }
}
