//! The limiter's configuration file: a few `key=value` lines the daemon writes into the container
//! (read-only) and the library parses once, when it is loaded.
//!
//! Why a file and not environment variables: `/etc/ld.so.preload` injects the library into every
//! process of the instance, including ones that scrub their environment, and reading the
//! environment on a hot path is what made HAMi-core slow. The file only says where the shared
//! region is and how big a context is; the limits themselves live in the region, so the daemon
//! can change them while the instance runs.
//!
//! Format (comments with `#`, unknown keys rejected so typos do not silently disable limits):
//! ```text
//! region=/run/gpuvisor/limiter.shm
//! context_bytes=314572800
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// Where the library looks for its configuration when nothing else is said.
pub const DEFAULT_PATH: &str = "/etc/gpuvisor/limiter.conf";

/// Environment variable naming another configuration file; read once, in the library
/// constructor (tests use it; the daemon uses the default path).
pub const ENV_PATH: &str = "GPUVISOR_LIMITER_CONFIG";

/// Parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The shared accounting region of this instance (see [`crate::shm`]).
    pub region: PathBuf,
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
    /// No `region=` line.
    MissingRegion,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax { line } => write!(f, "line {line}: expected key=value"),
            ConfigError::UnknownKey { line, key } => write!(f, "line {line}: unknown key {key:?}"),
            ConfigError::BadValue { line, key } => write!(f, "line {line}: bad value for {key:?}"),
            ConfigError::MissingRegion => write!(f, "missing region= line"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// A configuration pointing at `region`, with no context charge.
    pub fn new(region: impl Into<PathBuf>) -> Config {
        Config {
            region: region.into(),
            context_bytes: 0,
        }
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut region = None;
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
            match key {
                "region" if !value.is_empty() => region = Some(PathBuf::from(value)),
                "context_bytes" => {
                    context_bytes = value.parse().map_err(|_| ConfigError::BadValue {
                        line: line_no,
                        key: key.to_string(),
                    })?
                }
                "region" => {
                    return Err(ConfigError::BadValue {
                        line: line_no,
                        key: key.to_string(),
                    })
                }
                _ => {
                    return Err(ConfigError::UnknownKey {
                        line: line_no,
                        key: key.to_string(),
                    })
                }
            }
        }
        Ok(Config {
            region: region.ok_or(ConfigError::MissingRegion)?,
            context_bytes,
        })
    }

    /// The file's text, as [`Config::parse`] reads it.
    pub fn render(&self) -> String {
        format!(
            "# written by gpuvisor; read once by libgpuvisor_limiter.so\nregion={}\ncontext_bytes={}\n",
            self.region.display(),
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
            region: "/run/x.shm".into(),
            context_bytes: 42,
        };
        assert_eq!(Config::parse(&c.render()).unwrap(), c);
    }

    #[test]
    fn rejects_unknown_and_missing() {
        assert!(matches!(
            Config::parse("region=/a\nquota=1\n"),
            Err(ConfigError::UnknownKey { line: 2, .. })
        ));
        assert_eq!(
            Config::parse("# nothing\n"),
            Err(ConfigError::MissingRegion)
        );
        assert!(matches!(
            Config::parse("region=/a\ncontext_bytes=x"),
            Err(ConfigError::BadValue { .. })
        ));
    }
}
