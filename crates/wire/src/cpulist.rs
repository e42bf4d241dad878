//! Kernel CPU lists (`0-3,6`): how pinned CPUs are written in cgroups, sysfs and our output.

/// The largest CPU id a list may name (the kernel's own limit is 8191 on x86-64): a list is
/// expanded, so `0-4000000000` must not be.
const MAX_CPU: u32 = 65_535;

/// Parses a kernel CPU list (`0-3,6,8-9`).
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b > MAX_CPU {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok().filter(|c| *c <= MAX_CPU)?),
        }
    }
    Some(out)
}

/// Formats CPUs as a kernel CPU list (`0-3,6`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(parse_cpu_list("0-3,6"), Some(vec![0, 1, 2, 3, 6]));
        assert_eq!(format_cpu_list(&[6, 0, 1, 2, 3]), "0-3,6");
        assert_eq!(format_cpu_list(&[]), "");
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("0-4000000000"), None);
        assert_eq!(parse_cpu_list("70000"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
