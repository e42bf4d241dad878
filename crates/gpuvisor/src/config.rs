//! Daemon configuration: embedded defaults, then a TOML file, then flags and environment. One
//! struct, so every setting has one name in all three places.

use anyhow::Context;
use clap::Args;
use gpuvisor_node::ipam::AddressPlan;
use gpuvisor_node::net::NetRule;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod pricing;
pub mod proxy;

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; default: SQLite in the data dir.
    pub database: Option<String>,
    pub runtime: String,
    pub simulate_gpus: Option<String>,
    /// openb node list CSV of simulated nodes to register (placement-only, like KWOK nodes).
    pub simulate_nodes: Option<PathBuf>,
    pub cpu_oversubscription: u32,
    /// The instance address pool and each tenant's subnet in it (`net_pool`,
    /// `net_tenant_prefix`).
    pub net_plan: AddressPlan,
    pub nat: bool,
    pub stop_grace: Duration,
    /// How often the reconciler sweeps the host (orphans, stale zombies). Hidden: 30 s,
    /// shorter only in tests.
    pub sweep_every: Duration,
    pub pids_limit: i64,
    pub admin_key_file: Option<PathBuf>,
    /// `libgpuvisor_limiter.so` for fractional GPUs (default: beside the binary, then
    /// /usr/local/lib/gpuvisor, /usr/lib/gpuvisor).
    pub limiter_lib: Option<PathBuf>,
    /// Kernel (and initrd) for VM images without their own `/boot` (also what the KVM probe
    /// boots).
    pub vm_kernel: Option<PathBuf>,
    pub vm_initrd: Option<PathBuf>,
    /// The QEMU VMs run in (default: `qemu-system-x86_64` on `PATH`).
    pub vm_qemu: Option<PathBuf>,
    /// Host CPUs no instance is pinned to (VMs' QEMU threads other than the vCPUs run there);
    /// none by default.
    pub reserved_cpus: Vec<u32>,
    /// The daemon runs KSM (`/sys/kernel/mm/ksm`) while VMs run and stops it when none do
    /// (default true; false leaves KSM to the operator).
    pub manage_ksm: bool,
    /// Bytes the limiter charges each process for its CUDA context (measure per GPU model).
    pub limiter_context_bytes: u64,
    /// What to do with an instance the driver shows over its VRAM quota: kill (default) or event.
    pub limiter_over_quota: gpuvisor_node::limiter::OverQuotaAction,
    /// Which GPUs an instance gets and whom preemption evicts (gpuvisor_scheduler policies).
    pub placement_policy: gpuvisor_scheduler::Policy,
    /// A GPU at or above this temperature (°C) raises a thermal alarm.
    pub thermal_ceiling_c: f64,
    /// Read-only bearer token Prometheus may scrape `/metrics` with (admin keys always work).
    pub metrics_token: Option<String>,
    /// What one tenant can make the daemon do (`[limits]`).
    pub limits: Limits,
    /// `[network]`: object prefix, allow- and deny-lists of instance traffic.
    pub network: NetworkConfig,
    /// `[registry]`: who may pull, plain-HTTP registries, extra CA.
    pub registry: RegistrySection,
    /// `[tls]`: the API's certificate, TLS versions, plain HTTP.
    pub tls: TlsSection,
    /// `[proxy]`: the HTTPS proxy to instance ports and the TCP port maps.
    pub proxy: proxy::ProxySection,
    /// `[pricing]`: prices per GPU model and per vCPU, GiB of memory and of disk, per hour.
    pub pricing: gpuvisor_control::engine::pricing::Pricing,
    /// Print the first admin key on stdout as well as writing it to its file.
    pub print_admin_key: bool,
    /// `[[peer]]`: other gpuvisor daemons a VM may live-migrate to.
    pub peers: Vec<PeerConfig>,
    /// The parent of the instance cgroups: `gpuvisor`, or `gpuvisor-<name>` for a second
    /// daemon of one host (two daemons must not share an instance's cgroup: a VM migrating
    /// between them keeps its id).
    pub cgroup_parent: String,
}

/// One `[[peer]]`: another daemon, reached over its HTTPS API with an admin key of it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id (`instance migrate ID --to NODE`).
    pub node: String,
    /// Its API, e.g. `https://10.0.0.2:7070`.
    pub endpoint: String,
    /// The CA its certificate is checked against (its `<data>/ca.pem`); `system`: the public
    /// web's roots.
    pub ca: Option<PathBuf>,
    /// A file holding an admin key of the peer.
    pub key_file: PathBuf,
}

/// The `[tls]` section: how the API is served.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSection {
    /// The operator's certificate chain and key (PEM); default: made by the daemon, signed by
    /// its private CA (`<data>/ca.pem`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Lowest TLS version accepted [default: 1.3].
    pub min_version: crate::tls::MinVersion,
    /// More names (DNS or IP) for the generated certificate.
    pub names: Vec<String>,
    /// Serve plain HTTP instead (loopback only unless `insecure_http_public`).
    pub insecure_http: bool,
    pub insecure_http_public: bool,
    /// Names to get a certificate for from an ACME server (none: no ACME).
    pub acme_domains: Vec<String>,
    /// The ACME directory URL [default: Let's Encrypt].
    pub acme_directory: String,
    pub acme_email: Option<String>,
    /// A PEM root for the ACME server's own HTTPS (test CAs).
    pub acme_ca: Option<PathBuf>,
    /// How often the certificate files are looked at for a change (hidden flag; SIGHUP
    /// reloads at once anyway).
    pub poll_every: Duration,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            min_version: Default::default(),
            names: Vec::new(),
            insecure_http: false,
            insecure_http_public: false,
            acme_domains: Vec::new(),
            acme_directory: crate::tls::acme::LETS_ENCRYPT.to_string(),
            acme_email: None,
            acme_ca: None,
            poll_every: Duration::from_secs(2),
        }
    }
}

/// `[tls]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    min_version: Option<String>,
    names: Option<Vec<String>>,
    insecure_http: Option<bool>,
    insecure_http_public: Option<bool>,
    acme_domains: Option<Vec<String>>,
    acme_directory: Option<String>,
    acme_email: Option<String>,
    acme_ca: Option<PathBuf>,
}

/// Flags for `[tls]`.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsOverrides {
    /// The API's certificate chain (PEM); with --tls-key [tls.cert].
    #[arg(long = "tls-cert", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM) [tls.key].
    #[arg(long = "tls-key", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Lowest TLS version accepted: 1.3 or 1.2 [tls.min_version, default 1.3].
    #[arg(long = "tls-min-version", value_name = "1.3|1.2")]
    pub tls_min_version: Option<String>,
    /// Another name (DNS or IP) for the generated certificate; repeatable [tls.names].
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_name: Vec<String>,
    /// Serve plain HTTP, no TLS (loopback addresses only) [tls.insecure_http].
    #[arg(long = "insecure-http")]
    pub insecure_http: bool,
    /// Allow --insecure-http on a non-loopback address [tls.insecure_http_public].
    #[arg(long = "insecure-http-public", requires = "insecure_http")]
    pub insecure_http_public: bool,
    /// A name to get a certificate for from an ACME server (TLS-ALPN-01 on the API's own
    /// port, which the ACME server must reach: 443 for public CAs); repeatable
    /// [tls.acme_domains].
    #[arg(long = "acme-domain", value_name = "NAME")]
    pub acme_domain: Vec<String>,
    /// The ACME directory URL [tls.acme_directory, default: Let's Encrypt].
    #[arg(long = "acme-directory", value_name = "URL")]
    pub acme_directory: Option<String>,
    /// Contact e-mail for the ACME account [tls.acme_email].
    #[arg(long = "acme-email", value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// A PEM root the ACME server's HTTPS chains to (a test CA) [tls.acme_ca].
    #[arg(long = "acme-ca", value_name = "PEM")]
    pub acme_ca: Option<PathBuf>,
    /// How often the certificate files are checked for a change, e.g. 2s (tests).
    #[arg(long = "tls-poll-every", hide = true, value_name = "DURATION")]
    pub tls_poll_every: Option<String>,
}

impl TlsSection {
    fn apply_file(&mut self, f: TlsFile) -> anyhow::Result<()> {
        if f.cert.is_some() {
            self.cert = f.cert;
        }
        if f.key.is_some() {
            self.key = f.key;
        }
        if let Some(v) = &f.min_version {
            self.min_version = v.parse()?;
        }
        if let Some(v) = f.names {
            self.names = v;
        }
        if let Some(v) = f.insecure_http {
            self.insecure_http = v;
        }
        if let Some(v) = f.insecure_http_public {
            self.insecure_http_public = v;
        }
        if let Some(v) = f.acme_domains {
            self.acme_domains = v;
        }
        if let Some(v) = f.acme_directory {
            self.acme_directory = v;
        }
        if f.acme_email.is_some() {
            self.acme_email = f.acme_email;
        }
        if f.acme_ca.is_some() {
            self.acme_ca = f.acme_ca;
        }
        Ok(())
    }

    fn apply_flags(&mut self, o: &TlsOverrides) -> anyhow::Result<()> {
        if o.tls_cert.is_some() {
            self.cert = o.tls_cert.clone();
        }
        if o.tls_key.is_some() {
            self.key = o.tls_key.clone();
        }
        if let Some(v) = &o.tls_min_version {
            self.min_version = v.parse()?;
        }
        if !o.tls_name.is_empty() {
            self.names = o.tls_name.clone();
        }
        self.insecure_http |= o.insecure_http;
        self.insecure_http_public |= o.insecure_http_public;
        if !o.acme_domain.is_empty() {
            self.acme_domains = o.acme_domain.clone();
        }
        if let Some(v) = &o.acme_directory {
            self.acme_directory = v.clone();
        }
        if o.acme_email.is_some() {
            self.acme_email = o.acme_email.clone();
        }
        if o.acme_ca.is_some() {
            self.acme_ca = o.acme_ca.clone();
        }
        if let Some(v) = &o.tls_poll_every {
            self.poll_every = humantime::parse_duration(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--tls-poll-every {v:?} is not a duration like 2s"))?;
        }
        Ok(())
    }

    /// The rules between the settings and the listen address.
    fn check(&self, listen: SocketAddr) -> anyhow::Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            anyhow::bail!("tls: give both a certificate and its key (--tls-cert and --tls-key)");
        }
        if self.insecure_http && !listen.ip().is_loopback() && !self.insecure_http_public {
            anyhow::bail!(
                "plain HTTP on {listen} would send API keys in the clear: listen on a loopback \
                 address, drop --insecure-http, or add --insecure-http-public"
            );
        }
        if self.insecure_http && self.cert.is_some() {
            anyhow::bail!("tls: a certificate was given together with --insecure-http");
        }
        if !self.acme_domains.is_empty() {
            if self.cert.is_some() || self.insecure_http {
                anyhow::bail!(
                    "tls: --acme-domain goes with neither an operator certificate nor --insecure-http"
                );
            }
            if !self.acme_directory.starts_with("https://") {
                anyhow::bail!(
                    "tls.acme_directory {:?} is not an https:// URL",
                    self.acme_directory
                );
            }
            for d in &self.acme_domains {
                let ok = d.parse::<std::net::IpAddr>().is_err()
                    && rustls::pki_types::DnsName::try_from(d.as_str()).is_ok();
                if !ok {
                    anyhow::bail!("tls.acme_domains: {d:?} is not a DNS name");
                }
            }
        }
        for n in &self.names {
            let dns_ok = n.parse::<std::net::IpAddr>().is_ok()
                || rustls::pki_types::DnsName::try_from(n.as_str()).is_ok();
            if !dns_ok {
                anyhow::bail!("tls.names: {n:?} is neither a DNS name nor an IP address");
            }
        }
        Ok(())
    }
}

/// The `[registry]` section: image pulls from OCI registries.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrySection {
    /// Whether tenants (not only admins) may pull images [default: true].
    pub tenant_pull: bool,
    /// Registries tenants may pull from (empty: any).
    pub tenant_hosts: Vec<String>,
    /// Registries (`host[:port]`) spoken to over plain HTTP; every other one over verified TLS.
    pub insecure: Vec<String>,
    /// A PEM file of extra CA certificates trusted for registry TLS.
    pub ca_file: Option<PathBuf>,
    /// Most bytes one pulled image may unpack to [default: 64GiB].
    pub max_image_size: u64,
    /// Longest one pull may take [default: 6h].
    pub pull_timeout: Duration,
    /// Pull jobs one tenant may run at a time [default: 4].
    pub tenant_max_pulls: usize,
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            tenant_pull: true,
            tenant_hosts: Vec::new(),
            insecure: Vec::new(),
            ca_file: None,
            max_image_size: gpuvisor_node::registry::DEFAULT_MAX_IMAGE_SIZE,
            pull_timeout: gpuvisor_node::registry::DEFAULT_PULL_DEADLINE,
            tenant_max_pulls: 4,
        }
    }
}

/// `[registry]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    tenant_pull: Option<bool>,
    tenant_hosts: Option<Vec<String>>,
    insecure: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    max_image_size: Option<String>,
    pull_timeout: Option<String>,
    tenant_max_pulls: Option<usize>,
}

/// Flags for `[registry]`.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryOverrides {
    /// A registry (host[:port]) to pull from over plain HTTP; repeatable [registry.insecure].
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// Extra CA certificates (PEM) for registry TLS [registry.ca_file].
    #[arg(long = "registry-ca", value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// Whether tenants may pull images: allow or deny [registry.tenant_pull].
    #[arg(long = "tenant-pull", value_name = "allow|deny")]
    pub tenant_pull: Option<String>,
    /// A registry (host[:port]) tenants may pull from; repeatable; none: any
    /// [registry.tenant_hosts].
    #[arg(long = "tenant-registry", value_name = "HOST")]
    pub tenant_registry: Vec<String>,
    /// Most bytes one pulled image may unpack to, e.g. 64GiB [registry.max_image_size].
    #[arg(long = "max-image-size", value_name = "SIZE")]
    pub max_image_size: Option<String>,
    /// Longest one pull may take, e.g. 6h [registry.pull_timeout].
    #[arg(long = "pull-timeout", value_name = "DURATION")]
    pub pull_timeout: Option<String>,
    /// Pull jobs one tenant may run at a time [registry.tenant_max_pulls].
    #[arg(long = "tenant-max-pulls", value_name = "N")]
    pub tenant_max_pulls: Option<usize>,
}

impl RegistrySection {
    fn apply_file(&mut self, f: RegistryFile) -> anyhow::Result<()> {
        if let Some(v) = &f.max_image_size {
            self.max_image_size = registry_size(v)?;
        }
        if let Some(v) = &f.pull_timeout {
            self.pull_timeout = registry_duration(v)?;
        }
        if let Some(v) = f.tenant_max_pulls {
            self.tenant_max_pulls = v;
        }
        if let Some(v) = f.tenant_pull {
            self.tenant_pull = v;
        }
        if let Some(v) = f.tenant_hosts {
            self.tenant_hosts = v;
        }
        if let Some(v) = f.insecure {
            self.insecure = v;
        }
        if f.ca_file.is_some() {
            self.ca_file = f.ca_file;
        }
        Ok(())
    }

    fn apply_flags(&mut self, o: &RegistryOverrides) -> anyhow::Result<()> {
        if !o.tenant_registry.is_empty() {
            self.tenant_hosts = o.tenant_registry.clone();
        }
        if !o.insecure_registry.is_empty() {
            self.insecure = o.insecure_registry.clone();
        }
        if o.registry_ca.is_some() {
            self.ca_file = o.registry_ca.clone();
        }
        if let Some(v) = &o.max_image_size {
            self.max_image_size = registry_size(v)?;
        }
        if let Some(v) = &o.pull_timeout {
            self.pull_timeout = registry_duration(v)?;
        }
        if let Some(v) = o.tenant_max_pulls {
            self.tenant_max_pulls = v;
        }
        match o.tenant_pull.as_deref() {
            None => {}
            Some("allow") => self.tenant_pull = true,
            Some("deny") => self.tenant_pull = false,
            Some(other) => anyhow::bail!("--tenant-pull {other:?}: use allow or deny"),
        }
        Ok(())
    }
}

/// The `[network]` section: names of this daemon's host objects and what instances may reach
/// beyond the internet and their own tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// Prefix of bridges, veths, netns names and iptables chains (`gv`: `gvb0`, `GPUVISOR-FWD`).
    /// Two daemons on one host need different prefixes (and pools).
    pub prefix: String,
    /// Reserved or host destinations instances may reach anyway: `a.b.c.d[/len][:port]`.
    pub allow: Vec<NetRule>,
    /// Further destinations instances may not reach (e.g. a public LAN of the host).
    pub deny: Vec<NetRule>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            prefix: gpuvisor_node::net::DEFAULT_PREFIX.to_string(),
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// `[network]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    prefix: Option<String>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
}

/// Parses `list` (named `what` in errors) into rules, naming the first bad entry.
fn net_rules(what: &str, list: &[String]) -> anyhow::Result<Vec<NetRule>> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<NetRule>()
                .map_err(|e| anyhow::anyhow!("network.{what}[{i}]: {e}"))
        })
        .collect()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("/var/lib/gpuvisor"),
            database: None,
            runtime: "runc".into(),
            simulate_gpus: None,
            simulate_nodes: None,
            cpu_oversubscription: 1,
            net_plan: AddressPlan::default(),
            nat: true,
            stop_grace: Duration::from_secs(10),
            sweep_every: Duration::from_secs(30),
            pids_limit: 4096,
            admin_key_file: None,
            limiter_lib: None,
            vm_kernel: None,
            manage_ksm: true,
            vm_initrd: None,
            vm_qemu: None,
            reserved_cpus: Vec::new(),
            limiter_context_bytes: 0,
            limiter_over_quota: Default::default(),
            placement_policy: gpuvisor_scheduler::Policy::GvFrag,
            thermal_ceiling_c: 85.0,
            metrics_token: None,
            network: NetworkConfig::default(),
            limits: Limits::default(),
            registry: RegistrySection::default(),
            tls: TlsSection::default(),
            pricing: Default::default(),
            proxy: Default::default(),
            print_admin_key: false,
            peers: Vec::new(),
            cgroup_parent: gpuvisor_node::cgroup::PARENT.to_string(),
        }
    }
}

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database: Option<String>,
    runtime: Option<String>,
    simulate_gpus: Option<String>,
    simulate_nodes: Option<PathBuf>,
    cpu_oversubscription: Option<u32>,
    net_pool: Option<String>,
    net_tenant_prefix: Option<u8>,
    nat: Option<bool>,
    stop_grace: Option<String>,
    pids_limit: Option<i64>,
    admin_key_file: Option<PathBuf>,
    limiter_lib: Option<PathBuf>,
    vm_kernel: Option<PathBuf>,
    vm_initrd: Option<PathBuf>,
    vm_qemu: Option<PathBuf>,
    reserved_cpus: Option<String>,
    manage_ksm: Option<bool>,
    limiter_context_bytes: Option<String>,
    limiter_over_quota: Option<String>,
    placement_policy: Option<String>,
    thermal_ceiling_c: Option<f64>,
    metrics_token: Option<String>,
    network: Option<NetworkFile>,
    limits: Option<LimitsFile>,
    registry: Option<RegistryFile>,
    tls: Option<TlsFile>,
    pricing: Option<pricing::PricingFile>,
    proxy: Option<proxy::ProxyFile>,
    print_admin_key: Option<bool>,
    peer: Option<Vec<PeerConfig>>,
    cgroup_parent: Option<String>,
}

/// Flags (and their environment variables) that override the file.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigOverrides {
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "GPUVISOR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: /var/lib/gpuvisor].
    #[arg(long, env = "GPUVISOR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store URL: postgres://user:pass@host/db (default: SQLite in the data dir).
    #[arg(long, env = "GPUVISOR_DATABASE")]
    pub database: Option<String>,
    /// OCI runtime binary [default: runc].
    #[arg(long)]
    pub runtime: Option<String>,
    /// Simulate GPUs instead of probing, e.g. 2xA100-80GB,1xH100-80GB.
    #[arg(long, env = "GPUVISOR_SIMULATE_GPUS")]
    pub simulate_gpus: Option<String>,
    /// Register simulated nodes from an openb node list CSV (`sn,cpu_milli,memory_mib,gpu,model`);
    /// instances that do not fit this host are placed on them and never run.
    #[arg(long, env = "GPUVISOR_SIMULATE_NODES")]
    pub simulate_nodes: Option<PathBuf>,
    /// Instances allowed to pin the same CPU [default: 1, exclusive].
    #[arg(long)]
    pub cpu_oversubscription: Option<u32>,
    /// Grace between SIGTERM and SIGKILL on stop, e.g. 10s.
    #[arg(long)]
    pub stop_grace: Option<String>,
    /// How often the reconciler sweeps the host, e.g. 30s (tests only).
    #[arg(long, hide = true)]
    pub sweep_every: Option<String>,
    /// Write the first admin key to this file (mode 0600) [default: <data dir>/admin.key].
    #[arg(long)]
    pub admin_key_file: Option<PathBuf>,
    /// libgpuvisor_limiter.so to inject for fractional GPUs.
    #[arg(long)]
    pub limiter_lib: Option<PathBuf>,
    /// Kernel for VM images without /boot (e.g. Debian's linux-image-cloud-amd64 vmlinuz).
    #[arg(long, env = "GPUVISOR_VM_KERNEL")]
    pub vm_kernel: Option<PathBuf>,
    /// Initrd going with --vm-kernel.
    #[arg(long, env = "GPUVISOR_VM_INITRD")]
    pub vm_initrd: Option<PathBuf>,
    /// The QEMU system emulator VMs run in (default: qemu-system-x86_64 on PATH) [vm_qemu].
    #[arg(long, env = "GPUVISOR_QEMU")]
    pub vm_qemu: Option<PathBuf>,
    /// Host CPUs kept from instances, e.g. `0` or `0-1`: VMs' QEMU threads other than the
    /// vCPUs (I/O, live copies) run there [reserved_cpus].
    #[arg(long, value_name = "LIST", env = "GPUVISOR_RESERVED_CPUS")]
    pub reserved_cpus: Option<String>,
    /// Whether the daemon runs KSM while VMs run (`false`: the operator's) [manage_ksm].
    #[arg(long, value_name = "BOOL")]
    pub manage_ksm: Option<bool>,
    /// An instance whose processes hold more GPU memory than its quota (NVML's count): kill its
    /// processes on that GPU and record an event (kill, the default), or only record it (event).
    #[arg(long)]
    pub limiter_over_quota: Option<String>,
    /// Placement policy: gvfrag (default), fgd, bestfit, spread, random.
    #[arg(long)]
    pub placement_policy: Option<String>,
    /// Disable egress NAT for instances.
    #[arg(long)]
    pub no_nat: bool,
    /// GPU temperature (°C) that raises a thermal alarm [default: 85].
    #[arg(long)]
    pub thermal_ceiling: Option<f64>,
    /// Bearer token that may scrape /metrics (besides admin keys).
    #[arg(long, env = "GPUVISOR_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Prefix of this daemon's bridges, veths, netns and iptables chains [default: gv].
    #[arg(long, env = "GPUVISOR_NET_PREFIX")]
    pub net_prefix: Option<String>,
    /// The parent of the instance cgroups [default: gpuvisor]; `gpuvisor-<name>` for a second
    /// daemon of the host.
    #[arg(long, env = "GPUVISOR_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// Instance address pool, a CIDR from /8 to /29 (a bare address is a /16)
    /// [default: 10.88.0.0/16].
    #[arg(long, env = "GPUVISOR_NET_POOL")]
    pub net_pool: Option<String>,
    /// Size of each tenant's subnet in the pool, 24 to 29: the pool holds
    /// 2^(this - pool length) tenants, each with 2^(32 - this) - 3 instance addresses
    /// [default: 24].
    #[arg(long, env = "GPUVISOR_NET_TENANT_PREFIX")]
    pub net_tenant_prefix: Option<u8>,
    /// A reserved or host destination instances may reach, a.b.c.d[/len][:port]; repeatable;
    /// replaces the file's `[network] allow`.
    #[arg(long = "net-allow", value_name = "DEST")]
    pub net_allow: Vec<String>,
    /// A destination instances may not reach, a.b.c.d[/len][:port]; repeatable; replaces the
    /// file's `[network] deny`.
    #[arg(long = "net-deny", value_name = "DEST")]
    pub net_deny: Vec<String>,
    /// Boxed: the `serve` variant of the CLI stays small.
    #[command(flatten)]
    pub limits: Box<LimitsOverrides>,
    #[command(flatten)]
    pub registry: Box<RegistryOverrides>,
    #[command(flatten)]
    pub tls: Box<TlsOverrides>,
    #[command(flatten)]
    pub proxy: Box<proxy::ProxyOverrides>,
    /// Print the first admin key on stdout as well (by default it only goes to its 0600 file).
    #[arg(long)]
    pub print_admin_key: bool,
}

fn grace(s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s)
        .with_context(|| format!("stop_grace {s:?} is not a duration like 10s"))
}

impl Config {
    pub fn load(file: Option<&Path>, o: &ConfigOverrides) -> anyhow::Result<Self> {
        let mut c = Config::default();
        let (mut pool, mut tenant_len) = (None, None);
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            let f: FileConfig =
                toml::from_str(&text).with_context(|| format!("bad config {}", path.display()))?;
            if let Some(v) = f.listen {
                c.listen = v;
            }
            if let Some(v) = f.data_dir {
                c.data_dir = v;
            }
            if f.database.is_some() {
                c.database = f.database;
            }
            if let Some(v) = f.runtime {
                c.runtime = v;
            }
            if f.simulate_gpus.is_some() {
                c.simulate_gpus = f.simulate_gpus;
            }
            if f.simulate_nodes.is_some() {
                c.simulate_nodes = f.simulate_nodes;
            }
            if let Some(v) = f.cpu_oversubscription {
                c.cpu_oversubscription = v;
            }
            pool = f.net_pool.or(pool);
            tenant_len = f.net_tenant_prefix.or(tenant_len);
            if let Some(v) = f.nat {
                c.nat = v;
            }
            if let Some(v) = f.stop_grace {
                c.stop_grace = grace(&v)?;
            }
            if let Some(v) = f.pids_limit {
                c.pids_limit = v;
            }
            if f.admin_key_file.is_some() {
                c.admin_key_file = f.admin_key_file;
            }
            if f.limiter_lib.is_some() {
                c.limiter_lib = f.limiter_lib;
            }
            if f.vm_kernel.is_some() {
                c.vm_kernel = f.vm_kernel;
            }
            if f.vm_initrd.is_some() {
                c.vm_initrd = f.vm_initrd;
            }
            if f.vm_qemu.is_some() {
                c.vm_qemu = f.vm_qemu;
            }
            if let Some(v) = f.reserved_cpus {
                c.reserved_cpus = parse_reserved_cpus(&v)?;
            }
            if let Some(v) = f.manage_ksm {
                c.manage_ksm = v;
            }
            if let Some(v) = f.placement_policy {
                c.placement_policy = v.parse()?;
            }
            if let Some(v) = f.thermal_ceiling_c {
                c.thermal_ceiling_c = v;
            }
            if f.metrics_token.is_some() {
                c.metrics_token = f.metrics_token;
            }
            if let Some(n) = f.network {
                if let Some(v) = n.prefix {
                    c.network.prefix = v;
                }
                if let Some(v) = n.allow {
                    c.network.allow = net_rules("allow", &v)?;
                }
                if let Some(v) = n.deny {
                    c.network.deny = net_rules("deny", &v)?;
                }
            }
            if let Some(v) = f.limiter_over_quota {
                c.limiter_over_quota = v.parse().map_err(anyhow::Error::msg)?;
            }
            if let Some(l) = f.limits {
                c.limits.apply_file(l)?;
            }
            if let Some(r) = f.registry {
                c.registry.apply_file(r)?;
            }
            if let Some(t) = f.tls {
                c.tls.apply_file(t)?;
            }
            if let Some(p) = f.proxy {
                c.proxy.apply_file(p).context("bad [proxy]")?;
            }
            if let Some(p) = f.pricing {
                pricing::apply(&mut c.pricing, p).context("bad [pricing]")?;
            }
            if let Some(v) = f.print_admin_key {
                c.print_admin_key = v;
            }
            if let Some(v) = f.cgroup_parent {
                c.cgroup_parent = v;
            }
            if let Some(peers) = f.peer {
                for p in &peers {
                    if !p.endpoint.starts_with("https://") {
                        anyhow::bail!(
                            "bad [[peer]] {}: endpoint {:?} is not an https:// URL (a migration \
                             carries the guest's memory and disk)",
                            p.node,
                            p.endpoint
                        );
                    }
                }
                c.peers = peers;
            }
            if let Some(v) = f.limiter_context_bytes {
                c.limiter_context_bytes = gpuvisor_wire::parse_size(&v)
                    .with_context(|| format!("limiter_context_bytes {v:?}"))?;
            }
        }
        if let Some(v) = o.listen {
            c.listen = v;
        }
        if let Some(v) = &o.data_dir {
            c.data_dir = v.clone();
        }
        if o.database.is_some() {
            c.database = o.database.clone();
        }
        if let Some(v) = &o.runtime {
            c.runtime = v.clone();
        }
        if o.simulate_gpus.is_some() {
            c.simulate_gpus = o.simulate_gpus.clone();
        }
        if o.simulate_nodes.is_some() {
            c.simulate_nodes = o.simulate_nodes.clone();
        }
        if let Some(v) = o.cpu_oversubscription {
            c.cpu_oversubscription = v;
        }
        if let Some(v) = &o.stop_grace {
            c.stop_grace = grace(v)?;
        }
        if let Some(v) = &o.sweep_every {
            c.sweep_every = humantime::parse_duration(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("sweep_every {v:?} is not a duration like 30s"))?;
        }
        if o.admin_key_file.is_some() {
            c.admin_key_file = o.admin_key_file.clone();
        }
        if let Some(v) = &o.placement_policy {
            c.placement_policy = v.parse()?;
        }
        if o.limiter_lib.is_some() {
            c.limiter_lib = o.limiter_lib.clone();
        }
        if o.vm_kernel.is_some() {
            c.vm_kernel = o.vm_kernel.clone();
        }
        if o.vm_initrd.is_some() {
            c.vm_initrd = o.vm_initrd.clone();
        }
        if o.vm_qemu.is_some() {
            c.vm_qemu = o.vm_qemu.clone();
        }
        if let Some(v) = &o.reserved_cpus {
            c.reserved_cpus = parse_reserved_cpus(v)?;
        }
        if let Some(v) = o.manage_ksm {
            c.manage_ksm = v;
        }
        if let Some(v) = &o.limiter_over_quota {
            c.limiter_over_quota = v.parse().map_err(anyhow::Error::msg)?;
        }
        if o.no_nat {
            c.nat = false;
        }
        if let Some(v) = o.thermal_ceiling {
            c.thermal_ceiling_c = v;
        }
        if o.metrics_token.is_some() {
            c.metrics_token = o.metrics_token.clone();
        }
        if let Some(v) = &o.net_prefix {
            c.network.prefix = v.clone();
        }
        if let Some(v) = &o.cgroup_parent {
            c.cgroup_parent = v.clone();
        }
        let p = c.cgroup_parent.as_str();
        anyhow::ensure!(
            p == gpuvisor_node::cgroup::PARENT
                || p.strip_prefix("gpuvisor-").is_some_and(|n| {
                    (1..=16).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric())
                }),
            "cgroup_parent {p:?} is not gpuvisor or gpuvisor-<letters and digits>"
        );
        pool = o.net_pool.clone().or(pool);
        tenant_len = o.net_tenant_prefix.or(tenant_len);
        let pool = match pool {
            Some(p) => p.parse().map_err(|e| anyhow::anyhow!("net_pool: {e}"))?,
            None => c.net_plan.pool(),
        };
        c.net_plan = AddressPlan::new(pool, tenant_len.unwrap_or(c.net_plan.tenant_len()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !o.net_allow.is_empty() {
            c.network.allow = net_rules("allow", &o.net_allow)?;
        }
        if !o.net_deny.is_empty() {
            c.network.deny = net_rules("deny", &o.net_deny)?;
        }
        gpuvisor_node::net::check_prefix(&c.network.prefix).map_err(|e| anyhow::anyhow!("{e}"))?;
        c.limits.apply_flags(&o.limits)?;
        c.registry.apply_flags(&o.registry)?;
        c.tls.apply_flags(&o.tls)?;
        c.proxy.apply_flags(&o.proxy)?;
        c.tls.check(c.listen)?;
        c.print_admin_key |= o.print_admin_key;
        if !c.thermal_ceiling_c.is_finite() || c.thermal_ceiling_c <= 0.0 {
            anyhow::bail!("thermal_ceiling_c must be a positive temperature in °C");
        }
        if c.metrics_token.as_deref().is_some_and(|t| t.len() < 16) {
            anyhow::bail!("metrics_token must be at least 16 characters");
        }
        if c.cpu_oversubscription == 0 {
            anyhow::bail!("cpu_oversubscription must be at least 1");
        }
        Ok(c)
    }
}

/// `[limits]`: what one tenant can make the daemon do. Sizes like `64MiB`, durations like
/// `30s` or `7days`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most bytes of output one exec streams; the command is killed past it.
    pub exec_max_output: u64,
    /// Exec deadline when the request gives none.
    pub exec_timeout: Duration,
    /// Longest exec deadline a request may ask for.
    pub exec_max_timeout: Duration,
    /// Execs one tenant may run at once.
    pub exec_per_tenant: usize,
    /// Execs the daemon runs at once.
    pub exec_total: usize,
    /// An interactive exec session with no input and no output for this long is ended.
    pub exec_session_idle_timeout: Duration,
    /// Longest an interactive exec session lasts.
    pub exec_session_max_time: Duration,
    /// Most bytes (input and output) one interactive exec session moves.
    pub exec_session_max_bytes: u64,
    /// How long an exec session's client may stay silent (no pong) or not read before it is
    /// taken for gone. Hidden: 60 s, shorter only in tests.
    pub exec_session_liveness: Duration,
    /// Log bytes kept on disk per instance (current + one rotated segment).
    pub log_max_bytes: u64,
    /// Instance output is dropped while the logs' filesystem has less free than this.
    pub log_reserve: u64,
    /// Largest request body.
    pub max_body: u64,
    /// Largest image upload (`image import ./x.tar`, streamed to disk).
    pub max_upload: u64,
    /// Time a client has to send a request's headers (slow-loris protection).
    pub header_timeout: Duration,
    /// Time a client has to send a request's body.
    pub body_timeout: Duration,
    /// Requests one principal (tenant) may have in flight; unauthenticated requests share one
    /// such allowance.
    pub requests_per_key: usize,
    /// Open connections; more wait in the listen backlog.
    pub max_connections: usize,
    /// Open connections from one client address; more are closed at once, so one client
    /// cannot hold every connection slot.
    pub max_connections_per_ip: usize,
    /// Events older than this are pruned.
    pub events_max_age: Duration,
    /// Events kept per instance.
    pub events_per_instance: u64,
    /// Terminated instances are pruned this long after they ended.
    pub terminated_max_age: Duration,
    /// Audit log rows are pruned this long after they were written.
    pub audit_max_age: Duration,
    /// Requests per key per second: reads and mutations apart, each with its burst; failed
    /// authentications per client address per minute (0: no limit).
    pub rates: crate::ratelimit::Rates,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            exec_max_output: 16 << 20,
            exec_timeout: Duration::from_secs(300),
            exec_max_timeout: Duration::from_secs(3600),
            exec_per_tenant: 8,
            exec_total: 64,
            exec_session_idle_timeout: Duration::from_secs(3600),
            exec_session_max_time: Duration::from_secs(24 * 3600),
            exec_session_max_bytes: 1 << 30,
            exec_session_liveness: Duration::from_secs(60),
            log_max_bytes: 64 << 20,
            log_reserve: 1 << 30,
            max_body: 1 << 20,
            max_upload: 64 << 30,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            requests_per_key: 32,
            max_connections: 1024,
            max_connections_per_ip: 128,
            events_max_age: Duration::from_secs(30 * 86_400),
            events_per_instance: 1000,
            terminated_max_age: Duration::from_secs(7 * 86_400),
            audit_max_age: Duration::from_secs(365 * 86_400),
            rates: crate::ratelimit::Rates::default(),
        }
    }
}

/// `[limits]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    exec_max_output: Option<String>,
    exec_timeout: Option<String>,
    exec_max_timeout: Option<String>,
    exec_per_tenant: Option<usize>,
    exec_total: Option<usize>,
    exec_session_idle_timeout: Option<String>,
    exec_session_max_time: Option<String>,
    exec_session_max_bytes: Option<String>,
    exec_session_liveness: Option<String>,
    log_max_bytes: Option<String>,
    log_reserve: Option<String>,
    max_body: Option<String>,
    max_upload: Option<String>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    requests_per_key: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    events_max_age: Option<String>,
    events_per_instance: Option<u64>,
    terminated_max_age: Option<String>,
    audit_max_age: Option<String>,
    reads_per_second: Option<u32>,
    read_burst: Option<u32>,
    mutations_per_second: Option<u32>,
    mutation_burst: Option<u32>,
    auth_failures_per_minute: Option<u32>,
    auth_failure_burst: Option<u32>,
}

/// Flags for `[limits]`.
#[derive(Debug, Clone, Default, Args)]
pub struct LimitsOverrides {
    /// Most bytes of output one exec streams, e.g. 16MiB [limits.exec_max_output].
    #[arg(long)]
    pub exec_max_output: Option<String>,
    /// Default exec deadline, e.g. 5m [limits.exec_timeout].
    #[arg(long)]
    pub exec_timeout: Option<String>,
    /// Longest exec deadline a client may ask for, e.g. 1h [limits.exec_max_timeout].
    #[arg(long)]
    pub exec_max_timeout: Option<String>,
    /// Execs one tenant may run at once [limits.exec_per_tenant].
    #[arg(long)]
    pub exec_per_tenant: Option<usize>,
    /// Execs the daemon runs at once [limits.exec_total].
    #[arg(long)]
    pub exec_total: Option<usize>,
    /// End an interactive exec session idle this long, e.g. 1h
    /// [limits.exec_session_idle_timeout].
    #[arg(long)]
    pub exec_session_idle_timeout: Option<String>,
    /// Longest interactive exec session, e.g. 24h [limits.exec_session_max_time].
    #[arg(long)]
    pub exec_session_max_time: Option<String>,
    /// Most bytes one interactive exec session moves, e.g. 1GiB
    /// [limits.exec_session_max_bytes].
    #[arg(long)]
    pub exec_session_max_bytes: Option<String>,
    /// How long an exec session's client may be silent or not read (tests only).
    #[arg(long, hide = true)]
    pub exec_session_liveness: Option<String>,
    /// Log bytes kept per instance, e.g. 64MiB [limits.log_max_bytes].
    #[arg(long)]
    pub log_max_bytes: Option<String>,
    /// Free space kept on the logs' filesystem, e.g. 1GiB [limits.log_reserve].
    #[arg(long)]
    pub log_reserve: Option<String>,
    /// Largest request body, e.g. 1MiB [limits.max_body].
    #[arg(long)]
    pub max_body: Option<String>,
    /// Largest image upload, e.g. 64GiB [limits.max_upload].
    #[arg(long)]
    pub max_upload: Option<String>,
    /// Time to send request headers, e.g. 10s [limits.header_timeout].
    #[arg(long)]
    pub header_timeout: Option<String>,
    /// Time to send a request body, e.g. 30s [limits.body_timeout].
    #[arg(long)]
    pub body_timeout: Option<String>,
    /// Requests in flight per tenant [limits.requests_per_key].
    #[arg(long)]
    pub requests_per_key: Option<usize>,
    /// Open connections from one client address [limits.max_connections_per_ip].
    #[arg(long)]
    pub max_connections_per_ip: Option<usize>,
    /// Reads one key may make per second, 0: no limit [limits.reads_per_second].
    #[arg(long)]
    pub reads_per_second: Option<u32>,
    /// Reads one key may make at once past its rate [limits.read_burst].
    #[arg(long)]
    pub read_burst: Option<u32>,
    /// Mutations one key may make per second, 0: no limit [limits.mutations_per_second].
    #[arg(long)]
    pub mutations_per_second: Option<u32>,
    /// Mutations one key may make at once past its rate [limits.mutation_burst].
    #[arg(long)]
    pub mutation_burst: Option<u32>,
    /// Failed authentications one address may make per minute, 0: no limit
    /// [limits.auth_failures_per_minute].
    #[arg(long)]
    pub auth_failures_per_minute: Option<u32>,
    /// Failed authentications one address may make at once [limits.auth_failure_burst].
    #[arg(long)]
    pub auth_failure_burst: Option<u32>,
}

fn registry_size(v: &str) -> anyhow::Result<u64> {
    match gpuvisor_wire::parse_size(v) {
        Ok(n) if n > 0 => Ok(n),
        _ => anyhow::bail!("registry.max_image_size {v:?} is not a size like 64GiB"),
    }
}

fn registry_duration(v: &str) -> anyhow::Result<Duration> {
    match humantime::parse_duration(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => anyhow::bail!("registry.pull_timeout {v:?} is not a duration like 6h"),
    }
}

fn size(key: &str, v: &str) -> anyhow::Result<u64> {
    gpuvisor_wire::parse_size(v)
        .with_context(|| format!("limits.{key} {v:?} is not a size like 64MiB"))
}

fn duration(key: &str, v: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(v)
        .with_context(|| format!("limits.{key} {v:?} is not a duration like 30s"))
}

impl Limits {
    fn apply_file(&mut self, f: LimitsFile) -> anyhow::Result<()> {
        macro_rules! set {
            ($field:ident, size) => {
                if let Some(v) = &f.$field {
                    self.$field = size(stringify!($field), v)?;
                }
            };
            ($field:ident, duration) => {
                if let Some(v) = &f.$field {
                    self.$field = duration(stringify!($field), v)?;
                }
            };
            ($field:ident) => {
                if let Some(v) = f.$field {
                    self.$field = v;
                }
            };
        }
        set!(exec_max_output, size);
        set!(exec_timeout, duration);
        set!(exec_max_timeout, duration);
        set!(exec_per_tenant);
        set!(exec_total);
        set!(exec_session_idle_timeout, duration);
        set!(exec_session_max_time, duration);
        set!(exec_session_max_bytes, size);
        set!(exec_session_liveness, duration);
        set!(log_max_bytes, size);
        set!(log_reserve, size);
        set!(max_body, size);
        set!(max_upload, size);
        set!(header_timeout, duration);
        set!(body_timeout, duration);
        set!(requests_per_key);
        set!(max_connections);
        set!(max_connections_per_ip);
        set!(events_max_age, duration);
        set!(events_per_instance);
        set!(terminated_max_age, duration);
        if let Some(v) = f.reads_per_second {
            self.rates.reads_per_second = v;
        }
        if let Some(v) = f.read_burst {
            self.rates.read_burst = v;
        }
        if let Some(v) = f.mutations_per_second {
            self.rates.mutations_per_second = v;
        }
        if let Some(v) = f.mutation_burst {
            self.rates.mutation_burst = v;
        }
        if let Some(v) = f.auth_failures_per_minute {
            self.rates.auth_failures_per_minute = v;
        }
        if let Some(v) = f.auth_failure_burst {
            self.rates.auth_failure_burst = v;
        }
        set!(audit_max_age, duration);
        self.check()
    }

    /// Flags are the file's settings given once more: one parser for both.
    fn apply_flags(&mut self, o: &LimitsOverrides) -> anyhow::Result<()> {
        self.apply_file(LimitsFile {
            exec_max_output: o.exec_max_output.clone(),
            exec_timeout: o.exec_timeout.clone(),
            exec_max_timeout: o.exec_max_timeout.clone(),
            exec_per_tenant: o.exec_per_tenant,
            exec_total: o.exec_total,
            exec_session_idle_timeout: o.exec_session_idle_timeout.clone(),
            exec_session_max_time: o.exec_session_max_time.clone(),
            exec_session_max_bytes: o.exec_session_max_bytes.clone(),
            exec_session_liveness: o.exec_session_liveness.clone(),
            log_max_bytes: o.log_max_bytes.clone(),
            log_reserve: o.log_reserve.clone(),
            max_body: o.max_body.clone(),
            max_upload: o.max_upload.clone(),
            header_timeout: o.header_timeout.clone(),
            body_timeout: o.body_timeout.clone(),
            requests_per_key: o.requests_per_key,
            max_connections_per_ip: o.max_connections_per_ip,
            reads_per_second: o.reads_per_second,
            read_burst: o.read_burst,
            mutations_per_second: o.mutations_per_second,
            mutation_burst: o.mutation_burst,
            auth_failures_per_minute: o.auth_failures_per_minute,
            auth_failure_burst: o.auth_failure_burst,
            ..Default::default()
        })
    }

    fn check(&self) -> anyhow::Result<()> {
        let positive = [
            ("exec_per_tenant", self.exec_per_tenant as u64),
            ("exec_total", self.exec_total as u64),
            ("requests_per_key", self.requests_per_key as u64),
            ("max_connections", self.max_connections as u64),
            ("max_connections_per_ip", self.max_connections_per_ip as u64),
            ("exec_max_output", self.exec_max_output),
            ("exec_session_max_bytes", self.exec_session_max_bytes),
            ("max_body", self.max_body),
            ("max_upload", self.max_upload),
            ("events_per_instance", self.events_per_instance),
        ];
        for (k, v) in positive {
            if v == 0 {
                anyhow::bail!("limits.{k} must be at least 1");
            }
        }
        if self.log_max_bytes < 64 << 10 {
            anyhow::bail!("limits.log_max_bytes must be at least 64KiB");
        }
        for (k, v) in [
            ("exec_timeout", self.exec_timeout),
            ("exec_max_timeout", self.exec_max_timeout),
            ("exec_session_idle_timeout", self.exec_session_idle_timeout),
            ("exec_session_max_time", self.exec_session_max_time),
            ("exec_session_liveness", self.exec_session_liveness),
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if v.is_zero() {
                anyhow::bail!("limits.{k} must be longer than 0");
            }
        }
        Ok(())
    }

    /// The engine's share: exec bounds and retention.
    pub fn engine(&self) -> gpuvisor_control::engine::limits::Limits {
        use gpuvisor_control::engine::limits::{ExecLimits, Limits, Retention};
        Limits {
            exec: ExecLimits {
                max_output: self.exec_max_output,
                default_timeout: self.exec_timeout.min(self.exec_max_timeout),
                max_timeout: self.exec_max_timeout,
                per_tenant: self.exec_per_tenant,
                total: self.exec_total,
                session_idle_timeout: self.exec_session_idle_timeout,
                session_max_time: self.exec_session_max_time,
                session_max_bytes: self.exec_session_max_bytes,
            },
            retention: Retention {
                events_max_age: self.events_max_age,
                events_per_instance: self.events_per_instance,
                terminated_max_age: self.terminated_max_age,
                audit_max_age: self.audit_max_age,
                ..Retention::default()
            },
        }
    }
}

/// `reserved_cpus`: a CPU list such as `0` or `0-1,8`.
fn parse_reserved_cpus(v: &str) -> anyhow::Result<Vec<u32>> {
    match gpuvisor_node::host::parse_cpu_list(v.trim()) {
        Some(l) => Ok(l),
        _ => anyhow::bail!("reserved_cpus {v:?}: expected a CPU list such as `0` or `0-1,8`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_file_then_flags() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"/x\"\nstop_grace = \"2s\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), &ConfigOverrides::default()).unwrap();
        assert!(c.peers.is_empty());
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        assert_eq!(c.stop_grace, Duration::from_secs(2));
        assert_eq!(c.runtime, "runc");
        let o = ConfigOverrides {
            data_dir: Some("/y".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::load(Some(&f), &o).unwrap().data_dir,
            PathBuf::from("/y")
        );
        assert_eq!(
            Config::load(None, &ConfigOverrides::default()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(&f, "lisen = \"x\"\n").unwrap();
        assert!(Config::load(Some(&f), &ConfigOverrides::default()).is_err());
        std::fs::write(&f, "stop_grace = \"soon\"\n").unwrap();
        assert!(Config::load(Some(&f), &ConfigOverrides::default()).is_err());
        std::fs::write(&f, "[limits]\nexec_per_tenant = 0\n").unwrap();
        assert!(Config::load(Some(&f), &ConfigOverrides::default()).is_err());
        std::fs::write(&f, "[limits]\nexec_timout = \"1s\"\n").unwrap();
        assert!(Config::load(Some(&f), &ConfigOverrides::default()).is_err());
    }

    #[test]
    fn limits_from_file_then_flags() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "[limits]\nexec_max_output = \"1MiB\"\nexec_timeout = \"20s\"\nexec_per_tenant = 2\nevents_max_age = \"3days\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), &ConfigOverrides::default()).unwrap();
        assert_eq!(c.limits.exec_max_output, 1 << 20);
        assert_eq!(c.limits.exec_timeout, Duration::from_secs(20));
        assert_eq!(c.limits.exec_per_tenant, 2);
        assert_eq!(c.limits.events_max_age, Duration::from_secs(3 * 86_400));
        assert_eq!(c.limits.log_max_bytes, 64 << 20);
        let mut o = ConfigOverrides::default();
        o.limits.exec_per_tenant = Some(5);
        o.limits.log_max_bytes = Some("1MiB".into());
        let c = Config::load(Some(&f), &o).unwrap();
        assert_eq!(c.limits.exec_per_tenant, 5);
        assert_eq!(c.limits.log_max_bytes, 1 << 20);
        assert_eq!(
            c.limits.engine().exec.default_timeout,
            Duration::from_secs(20)
        );
    }

    #[test]
    fn network_section_and_flags() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "[network]\nprefix = \"ga\"\nallow = [\"10.1.2.0/24:443\", \"192.168.5.7\"]\n\
             deny = [\"192.0.2.0/24\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), &ConfigOverrides::default()).unwrap();
        assert_eq!(c.network.prefix, "ga");
        let allow: Vec<String> = c.network.allow.iter().map(|r| r.to_string()).collect();
        assert_eq!(allow, ["10.1.2.0/24:443", "192.168.5.7/32"]);
        assert_eq!(c.network.deny[0].to_string(), "192.0.2.0/24");
        // Flags replace the file's lists and prefix.
        let o = ConfigOverrides {
            net_prefix: Some("gb".into()),
            net_allow: vec!["10.9.0.0/16".into()],
            net_pool: Some("10.87.0.0".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&f), &o).unwrap();
        assert_eq!(c.network.prefix, "gb");
        assert_eq!(c.network.allow.len(), 1);
        assert_eq!(c.net_plan.pool().to_string(), "10.87.0.0/16");
        assert_eq!(c.net_plan.tenants(), 256);
        // The tenant subnet size from the file, the pool from a flag; bad plans are refused.
        std::fs::write(&f, "net_tenant_prefix = 26\n").unwrap();
        let o = ConfigOverrides {
            net_pool: Some("10.80.0.0/14".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&f), &o).unwrap();
        assert_eq!(c.net_plan.tenants(), 4096);
        assert_eq!(c.net_plan.hosts(), 2..=62);
        for (pool, needle) in [
            ("10.80.1.0/16", "host bits"),
            ("10.80.0.0/27", "cannot be larger"),
        ] {
            let o = ConfigOverrides {
                net_pool: Some(pool.into()),
                ..Default::default()
            };
            let e = Config::load(Some(&f), &o).unwrap_err().to_string();
            assert!(e.contains(needle), "{pool}: {e}");
        }
        assert_eq!(Config::default().network.prefix, "gv");

        // Each bad entry is refused at start, naming the entry and what is wrong with it.
        for (text, needle) in [
            (
                "allow = [\"10.1.2.0/24:99999\"]",
                "network.allow[0]: \"10.1.2.0/24:99999\" has a port",
            ),
            (
                "allow = [\"10.1.2.5/24\"]",
                "host bits set (the network is 10.1.2.0/24)",
            ),
            ("allow = [\"10.1.2.0/33\"]", "prefix length"),
            (
                "deny = [\"1.2.3.4\", \"example.com\"]",
                "network.deny[1]: \"example.com\" is not an IPv4",
            ),
            ("allow = [\"fd00::/8\"]", "IPv6"),
            ("prefix = \"GV\"", "network prefix \"GV\""),
            ("prefix = \"toolong\"", "1-4 characters"),
            ("allowed = []", "unknown field"),
        ] {
            std::fs::write(&f, format!("[network]\n{text}\n")).unwrap();
            let err = format!(
                "{:#}",
                Config::load(Some(&f), &ConfigOverrides::default()).unwrap_err()
            );
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn limiter_over_quota_action() {
        use gpuvisor_node::limiter::OverQuotaAction;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        let none = ConfigOverrides::default();
        assert_eq!(
            Config::load(None, &none).unwrap().limiter_over_quota,
            OverQuotaAction::Kill
        );
        std::fs::write(&f, "limiter_over_quota = \"event\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&f), &none).unwrap().limiter_over_quota,
            OverQuotaAction::Event
        );
        std::fs::write(&f, "limiter_over_quota = \"ignore\"\n").unwrap();
        let e = Config::load(Some(&f), &none).unwrap_err().to_string();
        assert!(e.contains("kill"), "{e}");
    }
    #[test]
    fn reserved_cpus_from_the_file_and_the_flag() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        let none = ConfigOverrides::default();
        assert!(Config::load(None, &none).unwrap().reserved_cpus.is_empty());
        std::fs::write(&f, "reserved_cpus = \"0-1,4\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&f), &none).unwrap().reserved_cpus,
            vec![0, 1, 4]
        );
        let flag = ConfigOverrides {
            reserved_cpus: Some("3".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::load(Some(&f), &flag).unwrap().reserved_cpus,
            vec![3]
        );
        for bad in ["all", "2-1", "0-4000000000"] {
            std::fs::write(&f, format!("reserved_cpus = \"{bad}\"\n")).unwrap();
            let e = format!("{:#}", Config::load(Some(&f), &none).unwrap_err());
            assert!(e.contains("expected a CPU list"), "{bad}: {e}");
        }
    }

    /// The interactive exec session bounds: read from the file, handed to the engine, and a
    /// zero refused like the other limits.
    #[test]
    fn exec_session_limits() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "[limits]\nexec_session_idle_timeout = \"10m\"\nexec_session_max_time = \"2h\"\nexec_session_max_bytes = \"64MiB\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), &ConfigOverrides::default()).unwrap();
        let e = c.limits.engine().exec;
        assert_eq!(e.session_idle_timeout, Duration::from_secs(600));
        assert_eq!(e.session_max_time, Duration::from_secs(7200));
        assert_eq!(e.session_max_bytes, 64 << 20);
        std::fs::write(&f, "[limits]\nexec_session_idle_timeout = \"0s\"\n").unwrap();
        let err = Config::load(Some(&f), &ConfigOverrides::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("exec_session_idle_timeout"),
            "{err:#}"
        );
    }

    #[test]
    fn peers_are_https_daemons_with_a_key_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "[[peer]]\nnode = \"node-b\"\nendpoint = \"https://10.0.0.2:7070\"\nca = \"/b/ca.pem\"\nkey_file = \"/b/admin.key\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), &ConfigOverrides::default()).unwrap();
        assert_eq!(
            c.peers,
            vec![PeerConfig {
                node: "node-b".into(),
                endpoint: "https://10.0.0.2:7070".into(),
                ca: Some("/b/ca.pem".into()),
                key_file: "/b/admin.key".into(),
            }]
        );
        // Plain HTTP would carry the guest's memory in clear; unknown keys are refused.
        for bad in [
            "[[peer]]\nnode = \"b\"\nendpoint = \"http://10.0.0.2:7070\"\nkey_file = \"/k\"\n",
            "[[peer]]\nnode = \"b\"\nendpoint = \"https://10.0.0.2:7070\"\nkey = \"secret\"\n",
        ] {
            std::fs::write(&f, bad).unwrap();
            assert!(
                Config::load(Some(&f), &ConfigOverrides::default()).is_err(),
                "{bad}"
            );
        }
    }
}
