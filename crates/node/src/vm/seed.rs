//! The cloud-init NoCloud seed of a VM: an ISO9660 image with volume id `cidata` holding
//! `meta-data` (instance-id, local-hostname), `user-data` (`#cloud-config`: the user with sudo
//! and its SSH keys, packages, the volumes' mounts, the startup script, the run-once command)
//! and `network-config` (version 2: the static address, gateway and name servers from our plan,
//! matched by MAC).
//!
//! Every value in the documents is tenant input (hostname, keys, commands, script, paths), so
//! no YAML is written by hand: the documents are JSON (a subset of YAML 1.1/1.2, which is what
//! cloud-init's PyYAML reads) from serde_json, with every character outside printable ASCII
//! escaped (`\uXXXX`, `\UXXXXXXXX` beyond the BMP) so that no raw control, line-break or
//! non-printable character reaches the YAML reader. A value can therefore never end its string
//! or add a key. The ISO is made by `genisoimage` (Joliet + Rock Ridge) in a directory beside
//! the target and renamed into place.

use super::template::TemplateError;
use crate::cmd;
use serde_json::{json, Value};
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the startup script is written in the guest (run by `runcmd`, before the command).
pub const STARTUP_SCRIPT_PATH: &str = "/var/lib/gpuvisor/startup-script";
/// The interface name the network config gives the NIC (matched by MAC).
pub const GUEST_IFACE: &str = "eth0";

/// What goes into one VM's seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    pub instance_id: String,
    pub hostname: String,
    /// The guest user cloud-init creates (sudo, the ssh keys); `gpuvisor` unless the CORE says.
    pub user: String,
    pub ssh_keys: Vec<String>,
    /// `-- CMD` of `instance create`: run once (cloud-init `runcmd`), output to the console.
    /// The argv of one command, run without a shell (a cloud-init `runcmd` list entry); empty
    /// for none.
    pub runcmd: Vec<String>,
    /// Written to [`STARTUP_SCRIPT_PATH`] (mode 0755) and run once before `runcmd`.
    pub startup_script: Option<String>,
    pub packages: Vec<String>,
    /// (virtio-blk serial of the volume disk, mount path): the volume disks are attached by CORE
    /// with `serial=<serial>` so the guest sees /dev/disk/by-id/virtio-<serial>.
    pub mounts: Vec<(String, PathBuf)>,
    pub net: SeedNet,
}

/// The guest's network, from our address plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedNet {
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<IpAddr>,
}

/// The three documents of a seed, before they become an ISO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedDocs {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// Writes the NoCloud seed (ISO9660, volume id `cidata`: meta-data, user-data, network-config
/// v2) to `path` atomically.
pub fn write_seed(spec: &SeedSpec, path: &Path) -> Result<(), TemplateError> {
    let docs = render(spec)?;
    let name = path
        .file_name()
        .ok_or_else(|| TemplateError::Invalid(format!("seed path {path:?} has no name")))?
        .to_string_lossy()
        .into_owned();
    let suffix = super::template::random_hex()?;
    let work = path.with_file_name(format!(".{name}.tmp-{suffix}.d"));
    let iso = path.with_file_name(format!(".{name}.tmp-{suffix}"));
    let res = (|| {
        // The documents carry the tenant's keys, script and commands: readable by root only
        // (the work directory 0700, its files and the ISO 0600).
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .map_err(io_at(&work))?;
        for (file, text) in [
            ("meta-data", &docs.meta_data),
            ("user-data", &docs.user_data),
            ("network-config", &docs.network_config),
        ] {
            let p = work.join(file);
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(io_at(&p))?;
        }
        // genisoimage truncates and keeps an existing file's mode: the ISO is never 0644.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&iso)
            .map_err(io_at(&iso))?;
        cmd::run(
            "genisoimage",
            [
                std::ffi::OsStr::new("-quiet"),
                "-output".as_ref(),
                iso.as_os_str(),
                "-volid".as_ref(),
                "cidata".as_ref(),
                "-joliet".as_ref(),
                "-rock".as_ref(),
                work.join("meta-data").as_os_str(),
                work.join("user-data").as_os_str(),
                work.join("network-config").as_os_str(),
            ],
        )?;
        fs::set_permissions(&iso, fs::Permissions::from_mode(0o600)).map_err(io_at(&iso))?;
        fs::File::open(&iso)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&iso))?;
        fs::rename(&iso, path).map_err(io_at(path))
    })();
    let _ = fs::remove_dir_all(&work);
    if res.is_err() {
        let _ = fs::remove_file(&iso);
    }
    res
}

/// An RFC 1123 host name: what /etc/hosts, DHCP and a kernel `ip=` argument can all carry.
/// (The engine checks a VM's name with it at create.)
pub fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Longest virtio-blk serial the guest sees whole (a volume's disk serial is its name).
pub const MAX_SERIAL: usize = 20;

/// A volume disk serial: 1-[`MAX_SERIAL`] letters, digits, '-', '_' or '.'. (The engine checks a
/// VM's volume names with it at create.)
pub fn serial_ok(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= MAX_SERIAL
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `^[a-z0-9][a-z0-9+.-]*([:=~][A-Za-z0-9.+:~_-]+)?$`, at most 128 bytes: never an apt option
/// (`-o...`), never a second word.
pub fn package_ok(p: &str) -> bool {
    if p.is_empty() || p.len() > 128 {
        return false;
    }
    let (name, rest) = match p.find([':', '=', '~']) {
        Some(i) => (&p[..i], Some(&p[i + 1..])),
        None => (p, None),
    };
    let name_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'.' | b'-')
        });
    let rest_ok = rest.is_none_or(|r| {
        !r.is_empty()
            && r.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b':' | b'~' | b'_' | b'-')
            })
    });
    name_ok && rest_ok
}

/// The seed's documents for `spec`, after checking what cannot be expressed safely.
pub fn render(spec: &SeedSpec) -> Result<SeedDocs, TemplateError> {
    check(spec)?;
    let meta = json!({
        "instance-id": spec.instance_id,
        "local-hostname": spec.hostname,
    });

    let mut user = json!({
        "name": spec.user,
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": true,
    });
    // cloud-init's schema wants at least one key in the list (an empty one makes the whole
    // user-data "invalid cloud-config" in its log and `cloud-init schema`): none, no list.
    if !spec.ssh_keys.is_empty() {
        user["ssh_authorized_keys"] = json!(spec.ssh_keys);
    }
    let mut cfg = serde_json::Map::new();
    cfg.insert("hostname".into(), json!(spec.hostname));
    cfg.insert("preserve_hostname".into(), json!(false));
    // The hostname resolves (sudo asks), from /etc/hosts.
    cfg.insert("manage_etc_hosts".into(), json!(true));
    cfg.insert("users".into(), json!([user]));
    if !spec.packages.is_empty() {
        cfg.insert("packages".into(), json!(spec.packages));
    }
    if !spec.mounts.is_empty() {
        let mounts: Vec<Value> = spec
            .mounts
            .iter()
            .map(|(serial, path)| {
                json!([
                    format!("/dev/disk/by-id/virtio-{serial}"),
                    path.to_string_lossy(),
                    "auto",
                    "defaults,nofail",
                    "0",
                    "2"
                ])
            })
            .collect();
        cfg.insert("mounts".into(), Value::Array(mounts));
    }
    let mut runcmd = Vec::new();
    if let Some(script) = &spec.startup_script {
        cfg.insert(
            "write_files".into(),
            json!([{
                "path": STARTUP_SCRIPT_PATH,
                "owner": "root:root",
                "permissions": "0755",
                "content": script,
            }]),
        );
        runcmd.push(json!([STARTUP_SCRIPT_PATH]));
    }
    if !spec.runcmd.is_empty() {
        runcmd.push(json!(spec.runcmd));
    }
    if !runcmd.is_empty() {
        cfg.insert("runcmd".into(), Value::Array(runcmd));
    }

    let net = &spec.net;
    let network = json!({
        "version": 2,
        "ethernets": {
            GUEST_IFACE: {
                "match": { "macaddress": net.mac.to_ascii_lowercase() },
                "set-name": GUEST_IFACE,
                "dhcp4": false,
                "dhcp6": false,
                "addresses": [format!("{}/{}", net.address, net.prefix_len)],
                // gateway4, not a 0.0.0.0/0 route: every cloud-init renderer turns it into the
                // distribution's own default-gateway setting (Debian's ifupdown `gateway`),
                // where a route needs extra tools (ifupdown's post-up `route`, net-tools).
                "gateway4": net.gateway.to_string(),
                "nameservers": {
                    "addresses": net.dns.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                },
            }
        }
    });

    Ok(SeedDocs {
        meta_data: yaml_safe_json(&meta)?,
        user_data: format!("#cloud-config\n{}", yaml_safe_json(&Value::Object(cfg))?),
        network_config: yaml_safe_json(&network)?,
    })
}

/// JSON text with everything outside printable ASCII escaped, which YAML reads as the same
/// values (YAML's double-quoted strings take JSON's escapes, and `\U` beyond the BMP).
fn yaml_safe_json(v: &Value) -> Result<String, TemplateError> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| TemplateError::Invalid(format!("cannot encode the seed: {e}")))?;
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        let code = c as u32;
        match code {
            // Structure, indentation and line ends of the pretty printer: outside strings only
            // (serde_json escapes control characters inside strings already).
            0x0a | 0x20..=0x7e => out.push(c),
            0..=0xffff => out.push_str(&format!("\\u{code:04x}")),
            _ => out.push_str(&format!("\\U{code:08x}")),
        }
    }
    out.push('\n');
    Ok(out)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(msg: String) -> TemplateError {
    TemplateError::Invalid(msg)
}

/// What the documents cannot carry: NUL bytes anywhere (no file or argv holds one), line breaks
/// where cloud-init writes lines (keys, fstab), fstab-breaking mount paths, odd user names.
fn check(spec: &SeedSpec) -> Result<(), TemplateError> {
    let no_nul = |what: &str, s: &str| {
        if s.contains('\0') {
            Err(invalid(format!("{what} contains a NUL byte")))
        } else {
            Ok(())
        }
    };
    let one_line = |what: &str, s: &str| {
        if s.is_empty() || s.chars().any(|c| c.is_control()) {
            Err(invalid(format!(
                "{what} {s:?} must be one non-empty line without control characters"
            )))
        } else {
            Ok(())
        }
    };
    one_line("instance id", &spec.instance_id)?;
    one_line("hostname", &spec.hostname)?;
    if !hostname_ok(&spec.hostname) {
        return Err(invalid(format!(
            "hostname {:?} is invalid: use an RFC 1123 name (dot-separated labels of 1-63 \
             letters, digits or '-', not starting or ending with '-'; 253 characters at most)",
            spec.hostname
        )));
    }
    let user_ok = !spec.user.is_empty()
        && spec.user.len() <= 32
        && spec
            .user
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && spec
            .user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !user_ok {
        return Err(invalid(format!(
            "guest user {:?} is invalid: use 1-32 lowercase letters, digits, '_' or '-', starting with a letter or '_'",
            spec.user
        )));
    }
    for k in &spec.ssh_keys {
        one_line("ssh key", k)?;
    }
    for a in &spec.runcmd {
        no_nul("a command argument", a)?;
    }
    if let Some(s) = &spec.startup_script {
        no_nul("the startup script", s)?;
    }
    for p in &spec.packages {
        if !package_ok(p) {
            return Err(invalid(format!(
                "package name {p:?} is invalid: a Debian package name (lowercase letters, \
                 digits, '+', '.', '-', starting with a letter or digit), optionally followed \
                 by ':ARCH', '=VERSION' or '~...'"
            )));
        }
    }
    for (serial, path) in &spec.mounts {
        if !serial_ok(serial) {
            return Err(invalid(format!(
                "volume disk serial {serial:?} is invalid: 1-20 letters, digits, '-', '_' or '.' \
                 (virtio-blk shows the guest at most 20 bytes, so a longer one would be cut and \
                 could name another disk)"
            )));
        }
        let p = path
            .to_str()
            .ok_or_else(|| invalid(format!("volume path {} is not UTF-8", path.display())))?;
        if !p.starts_with('/')
            || p.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        {
            return Err(invalid(format!(
                "volume path {p:?} cannot be mounted in a VM: it must be absolute, without spaces, control characters or '\\' (fstab fields)"
            )));
        }
    }
    let mac_ok = spec.net.mac.len() == 17
        && spec.net.mac.split(':').count() == 6
        && spec
            .net
            .mac
            .split(':')
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !mac_ok {
        return Err(invalid(format!(
            "MAC address {:?} is invalid",
            spec.net.mac
        )));
    }
    if spec.net.prefix_len == 0 || spec.net.prefix_len > 32 {
        return Err(invalid(format!(
            "prefix length /{} is invalid",
            spec.net.prefix_len
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
