//! The limiter's configuration file: a few `key=value` lines the daemon writes and binds
//! read-only into the instance at [`PATH`], and the library parses once, when it starts.
//!
//! Why a file and not environment variables: `/etc/ld.so.preload` injects the library into every
//! process of the instance, including ones that scrub their environment, and reading the
//! environment on a hot path is what made HAMi-core slow. The file only says where the region's
//! two files are and how big a context is; the limits themselves live in the region, so the
//! daemon can change them while the instance runs.
//!
//! Key decision: **one fixed path, no override.** The library reads nothing but [`PATH`] (no
//! environment variable, no fallback), so nothing a tenant controls (`--env`, an `export` in a
//! shell, `LD_PRELOAD` of its own) can point it elsewhere; the daemon binds the file read-only.
//! A process that finds no usable configuration refuses every CUDA allocation (see `hooks`): the
//! library is only ever injected into instances that have a fractional GPU, so "no config" means
//! something is wrong, never "no limits".
//!
//! Format (comments with `#`, unknown keys rejected so typos do not silently disable limits):
//! ```text
//! limits=/etc/gpuvisor/limiter.limits
//! usage=/run/gpuvisor/limiter.usage
//! context_bytes=314572800
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// The only place the library looks for its configuration.
pub const PATH: &str = "/etc/gpuvisor/limiter.conf";

/// Parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The region's limits file (read-only inside the instance; see [`crate::shm`]).
    pub limits: PathBuf,
    /// The region's usage file (read-write inside the instance).
    pub usage: PathBuf,
    /// Bytes charged once per process for its CUDA context(s), on the first context creation or
    /// primary-context retain. The driver's own context footprint is not visible through the API,
    /// so the daemon sets a measured figure for the GPU model (about 300-500 MiB on an H100).
    pub context_bytes: u64,
}

/// A configuration file that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A line without `=`.
    Syntax { line: usize },
    /// A key this version does not know.
    UnknownKey { line: usize, key: String },
    /// A value that is not what its key needs.
    BadValue { line: usize, key: String },
    /// No `limits=` or no `usage=` line.
    MissingRegion,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax { line } => write!(f, "line {line}: expected key=value"),
            ConfigError::UnknownKey { line, key } => write!(f, "line {line}: unknown key {key:?}"),
            ConfigError::BadValue { line, key } => write!(f, "line {line}: bad value for {key:?}"),
            ConfigError::MissingRegion => write!(f, "missing limits= or usage= line"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// A configuration pointing at a region's two files, with no context charge.
    pub fn new(limits: impl Into<PathBuf>, usage: impl Into<PathBuf>) -> Config {
        Config {
            limits: limits.into(),
            usage: usage.into(),
            context_bytes: 0,
        }
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut limits = None;
        let mut usage = None;
        let mut context_bytes = 0;
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or(ConfigError::Syntax { line: line_no })?;
            let (key, value) = (key.trim(), value.trim());
            let bad = || ConfigError::BadValue {
                line: line_no,
                key: key.to_string(),
            };
            match key {
                "limits" | "usage" if value.is_empty() => return Err(bad()),
                "limits" => limits = Some(PathBuf::from(value)),
                "usage" => usage = Some(PathBuf::from(value)),
                "context_bytes" => context_bytes = value.parse().map_err(|_| bad())?,
                _ => {
                    return Err(ConfigError::UnknownKey {
                        line: line_no,
                        key: key.to_string(),
                    })
                }
            }
        }
        Ok(Config {
            limits: limits.ok_or(ConfigError::MissingRegion)?,
            usage: usage.ok_or(ConfigError::MissingRegion)?,
            context_bytes,
        })
    }

    /// The file's text, as [`Config::parse`] reads it.
    pub fn render(&self) -> String {
        format!(
            "# written by gpuvisor; read once by libgpuvisor_limiter.so\nlimits={}\nusage={}\ncontext_bytes={}\n",
            self.limits.display(),
            self.usage.display(),
            self.context_bytes
        )
    }

    /// Writes the file atomically (temporary file + rename), mode 0644.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn round_trip() {
        let c = Config {
            limits: "/run/x.limits".into(),
            usage: "/run/x.usage".into(),
            context_bytes: 42,
        };
        assert_eq!(Config::parse(&c.render()).unwrap(), c);
    }

    #[test]
    fn rejects_unknown_and_missing() {
        assert!(matches!(
            Config::parse("limits=/a\nusage=/b\nquota=1\n"),
            Err(ConfigError::UnknownKey { line: 3, .. })
        ));
        assert_eq!(
            Config::parse("# nothing\n"),
            Err(ConfigError::MissingRegion)
        );
        assert_eq!(
            Config::parse("limits=/a\n"),
            Err(ConfigError::MissingRegion)
        );
        // The layout-1 key names one file that no longer holds the limits.
        assert!(matches!(
            Config::parse("region=/a"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            Config::parse("limits=/a\nusage=/b\ncontext_bytes=x"),
            Err(ConfigError::BadValue { .. })
        ));
    }
}
