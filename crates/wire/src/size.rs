//! Human byte sizes (`4GiB`, `512M`, `10G`). Binary units are the default: a GPU cloud user who
//! writes `4G` means 4 GiB, as Docker and Kubernetes users do; `GB`/`MB` are decimal.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("size {0:?} is not a number with an optional unit (e.g. 512MiB, 4GiB)")]
    Malformed(String),
    #[error("unknown size unit {0:?} (use B, KiB, MiB, GiB, TiB, or K, M, G, T)")]
    Unit(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size into bytes. Fractions are allowed (`1.5GiB`); negative numbers are not.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::Malformed(s.to_string()));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| SizeError::Malformed(s.to_string()))?;
    let mult: f64 = match unit.trim() {
        "" | "B" | "b" => 1.0,
        "K" | "k" | "KiB" | "Ki" => 1024.0,
        "M" | "m" | "MiB" | "Mi" => 1024.0 * 1024.0,
        "G" | "g" | "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        "T" | "t" | "TiB" | "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => return Err(SizeError::Unit(other.to_string())),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(SizeError::Overflow(s.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with the largest binary unit that keeps the number ≥ 1 (`4GiB`, `1.5GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if (v - v.round()).abs() < 0.005 {
        format!("{}{}", v.round() as u64, UNITS[i])
    } else {
        format!("{v:.2}{}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("-1G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("GiB"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("4XB"), Err(SizeError::Unit(_))));
        assert!(matches!(
            parse_size("99999999999TiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["4GiB", "512MiB", "1.50GiB", "10GiB", "100B"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }
}
