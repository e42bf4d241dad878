//! The cloud-init NoCloud seed (CORE's interim implementation of TEMPLATE's API: replaced by
//! TEMPLATE's `vm/seed.rs` at the merge). An ISO9660 image with volume id `cidata`
//! (`genisoimage`): meta-data, user-data, network-config v2.

use super::template::TemplateError;
use std::path::{Path, PathBuf};

pub struct SeedSpec {
    pub instance_id: String,
    pub hostname: String,
    pub user: String,
    pub ssh_keys: Vec<String>,
    pub runcmd: Vec<String>,
    pub startup_script: Option<String>,
    pub packages: Vec<String>,
    pub mounts: Vec<(String, PathBuf)>,
    pub net: SeedNet,
}

pub struct SeedNet {
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub dns: Vec<std::net::IpAddr>,
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Writes the NoCloud seed to `path` atomically.
pub fn write_seed(spec: &SeedSpec, path: &Path) -> Result<(), TemplateError> {
    let dir = path.with_extension("d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| TemplateError::Io {
        path: dir.clone(),
        source,
    })?;
    let meta = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&spec.instance_id),
        q(&spec.hostname)
    );
    let mut user = format!(
        "#cloud-config\nhostname: {}\nusers:\n  - name: {}\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/sh\n    ssh_authorized_keys: [{}]\n",
        q(&spec.hostname),
        q(&spec.user),
        spec.ssh_keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ")
    );
    if !spec.packages.is_empty() {
        user.push_str(&format!(
            "packages: [{}]\n",
            spec.packages
                .iter()
                .map(|k| q(k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !spec.mounts.is_empty() {
        user.push_str("mounts:\n");
        for (serial, p) in &spec.mounts {
            user.push_str(&format!(
                "  - [{}, {}]\n",
                q(&format!("/dev/disk/by-id/virtio-{serial}")),
                q(&p.display().to_string())
            ));
        }
    }
    let mut runcmd: Vec<String> = Vec::new();
    if !spec.runcmd.is_empty() {
        runcmd.push(format!(
            "[{}]",
            spec.runcmd
                .iter()
                .map(|a| q(a))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(s) = &spec.startup_script {
        user.push_str(&format!(
            "write_files:\n  - path: /var/lib/gpuvisor/startup-script\n    permissions: '0755'\n    content: {}\n",
            q(s)
        ));
        runcmd.push("[\"/var/lib/gpuvisor/startup-script\"]".into());
    }
    if !runcmd.is_empty() {
        user.push_str("runcmd:\n");
        for r in runcmd {
            user.push_str(&format!("  - {r}\n"));
        }
    }
    let n = &spec.net;
    let net = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: {}\n    set-name: eth0\n    addresses: [{}]\n    gateway4: {}\n    nameservers:\n      addresses: [{}]\n",
        q(&n.mac),
        q(&format!("{}/{}", n.address, n.prefix_len)),
        q(&n.gateway.to_string()),
        n.dns.iter().map(|d| q(&d.to_string())).collect::<Vec<_>>().join(", ")
    );
    for (name, text) in [
        ("meta-data", meta),
        ("user-data", user),
        ("network-config", net),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|source| TemplateError::Io { path: p, source })?;
    }
    let tmp = path.with_extension("tmp");
    let r = crate::cmd::run(
        "genisoimage",
        [
            std::ffi::OsStr::new("-quiet"),
            "-output".as_ref(),
            tmp.as_os_str(),
            "-volid".as_ref(),
            "cidata".as_ref(),
            "-joliet".as_ref(),
            "-rock".as_ref(),
            dir.join("meta-data").as_os_str(),
            dir.join("user-data").as_os_str(),
            dir.join("network-config").as_os_str(),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    std::fs::rename(&tmp, path).map_err(|source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    })
}
