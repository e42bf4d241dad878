//! The daemon's own secret keys: 32 random bytes each in `<data>/keys/<name>` (0600, in a 0700
//! directory), made at first use and read back after. The registry credentials' sealing key
//! and the audit log's chain key live here.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A key file that cannot be made or read: the path and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {why}", path.display())]
pub struct KeyError {
    pub path: PathBuf,
    pub why: String,
}

/// The key `name` of the daemon on `data_dir`, made now if it does not exist. A looser mode
/// found on it is tightened to 0600.
pub fn key_file(data_dir: &Path, name: &str) -> Result<[u8; 32], KeyError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| KeyError {
            path,
            why: e.to_string(),
        }
    };
    let dir = data_dir.join("keys");
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(&dir)(e)),
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(fail(&dir))?;
    let path = dir.join(name);
    let mut key = [0u8; 32];
    // Made whole in a file of its own, then linked in under its name (which fails if another
    // start made it first): a crash never leaves a short key under the name.
    let made = (|| -> std::io::Result<bool> {
        if path.exists() {
            return Ok(false);
        }
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(format!("getrandom: {e}")))?;
        f.write_all(&key)?;
        f.sync_all()?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })()
    .map_err(fail(&path))?;
    if !made {
        let meta = fs::metadata(&path).map_err(fail(&path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(fail(&path))?;
        }
        let bytes = fs::read(&path).map_err(fail(&path))?;
        if bytes.len() != key.len() {
            return Err(KeyError {
                path,
                why: format!("a key must be 32 bytes, found {}", bytes.len()),
            });
        }
        key.copy_from_slice(&bytes);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_private_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let a = key_file(d.path(), "one.key").unwrap();
        assert_eq!(key_file(d.path(), "one.key").unwrap(), a);
        assert_ne!(key_file(d.path(), "two.key").unwrap(), a);
        let mode = |p: &str| fs::metadata(d.path().join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("keys"), 0o700);
        assert_eq!(mode("keys/one.key"), 0o600);
        fs::set_permissions(
            d.path().join("keys/one.key"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert_eq!(key_file(d.path(), "one.key").unwrap(), a);
        assert_eq!(mode("keys/one.key"), 0o600);
        fs::write(d.path().join("keys/one.key"), b"short").unwrap();
        assert!(key_file(d.path(), "one.key")
            .unwrap_err()
            .to_string()
            .contains("32 bytes"));
    }
}
