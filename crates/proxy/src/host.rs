//! `<instance-id>-<port>.<domain>[:port]` → (instance id, port).

/// The instance and port a Host (or `:authority`) names under `domain`; `None` for any other
/// name (another domain, a deeper name, a bad port, characters an id never has).
pub fn parse_host(host: &str, domain: &str) -> Option<(String, u16)> {
    // Drop a port; an IPv6 literal is never ours.
    let name = match host.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => n,
        Some(_) => return None,
        None => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let label = name.strip_suffix(domain)?.strip_suffix('.')?;
    let (id, port) = label.rsplit_once('-')?;
    // An instance id is 12 lowercase hex digits: any other name is refused here, before the
    // daemon is asked.
    if id.len() != 12 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    if port.is_empty() || port.len() > 5 || port.starts_with('0') {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some((id.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::parse_host;

    #[test]
    fn names_under_the_domain_only() {
        let d = "proxy.example.com";
        let ok = |h: &str| parse_host(h, d);
        assert_eq!(
            ok("a1b2c3d4e5f6-8888.proxy.example.com"),
            Some(("a1b2c3d4e5f6".into(), 8888))
        );
        assert_eq!(
            ok("A1B2C3D4E5F6-8888.Proxy.Example.com:8443"),
            Some(("a1b2c3d4e5f6".into(), 8888))
        );
        assert_eq!(
            ok("a1b2c3d4e5f6-80.proxy.example.com."),
            Some(("a1b2c3d4e5f6".into(), 80))
        );
        for bad in [
            "proxy.example.com",
            "x.proxy.example.com",
            "a-8888.b.proxy.example.com",
            "a-8888.proxy.example.com.evil.net",
            "a-8888.evilproxy.example.com",
            "a-8888xproxy.example.com",
            "a-0.proxy.example.com",
            "a-080.proxy.example.com",
            "a-65536.proxy.example.com",
            "-8888.proxy.example.com",
            "a_b-8888.proxy.example.com",
            "a1-b2-80.proxy.example.com",
            "a1b2c3d4e5f-8888.proxy.example.com",
            "a1b2c3d4e5f6a-8888.proxy.example.com",
            "g1b2c3d4e5f6-8888.proxy.example.com",
            "a-8888.proxy.example.com:x",
            "[::1]:8443",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }
}
