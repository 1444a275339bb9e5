//! Strict parsing of the destination an agent names (`CONNECT host:port`, `http://host:port/`).
//!
//! A host is either a DNS name or a canonical IP literal. Numeric spellings that C
//! resolvers turn into addresses (`2852039166`, `0xA9FEA9FE`, `0251.0376.0251.0376`,
//! `127.1`) are refused here, so they can never reach a resolver.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// Lower-case A-labels, no trailing dot.
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// The form the policy and the audit log see: names as-is, IPv6 without brackets.
    pub fn as_policy_str(&self) -> String {
        match self {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("destination `{0}` has no port (use host:port)")]
    MissingPort(String),
    #[error("destination `{0}` has an invalid port")]
    BadPort(String),
    #[error("destination `{0}` has an empty host")]
    EmptyHost(String),
    #[error("`{0}` is a numeric host form that resolvers misread; use a canonical dotted-quad IPv4 address or a DNS name")]
    NumericHost(String),
    #[error("`{0}` is not a valid DNS name or IP address")]
    InvalidHost(String),
}

/// Parses `host:port` or `[v6]:port`.
pub fn parse_authority(authority: &str) -> Result<Target, TargetError> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| TargetError::InvalidHost(authority.to_string()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| TargetError::MissingPort(authority.to_string()))?;
        let ip: Ipv6Addr = v6
            .parse()
            .map_err(|_| TargetError::InvalidHost(v6.to_string()))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| TargetError::MissingPort(authority.to_string()))?;
        if host.contains(':') {
            // An IPv6 literal must be bracketed, or the port is ambiguous.
            return Err(TargetError::InvalidHost(host.to_string()));
        }
        (parse_host(host)?, port)
    };
    let port = parse_port(port).ok_or_else(|| TargetError::BadPort(authority.to_string()))?;
    Ok(Target { host, port })
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Parses a host without a port (names, dotted-quad IPv4; IPv6 must be bracketed by the caller).
pub fn parse_host(host: &str) -> Result<Host, TargetError> {
    if host.is_empty() {
        return Err(TargetError::EmptyHost(host.to_string()));
    }
    // Rust's parser accepts only the canonical dotted quad (no octal, hex or short forms).
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if looks_numeric(trimmed) {
        return Err(TargetError::NumericHost(host.to_string()));
    }
    let ascii = if trimmed.is_ascii() {
        trimmed.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(trimmed).map_err(|_| TargetError::InvalidHost(host.to_string()))?
    };
    if !is_dns_name(&ascii) {
        return Err(TargetError::InvalidHost(host.to_string()));
    }
    // IDN mapping may itself produce a numeric form (full-width digits).
    if looks_numeric(&ascii) || ascii.parse::<Ipv4Addr>().is_ok() {
        return Err(TargetError::NumericHost(host.to_string()));
    }
    Ok(Host::Name(ascii))
}

/// True for anything `inet_aton` would accept: 1 to 4 dot-separated parts, each decimal,
/// octal (leading 0) or hex (0x). Also true when the last label is all digits, which no
/// real top-level domain is.
fn looks_numeric(host: &str) -> bool {
    let parts: Vec<&str> = host.split('.').collect();
    let numeric_part = |p: &str| {
        let p = p.to_ascii_lowercase();
        if let Some(hex) = p.strip_prefix("0x") {
            hex.bytes().all(|b| b.is_ascii_hexdigit())
        } else {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
        }
    };
    if parts.len() <= 4 && parts.iter().all(|p| numeric_part(p)) {
        return true;
    }
    parts
        .last()
        .is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

fn is_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized() {
        let t = parse_authority("API.OpenAI.com.:443").unwrap();
        assert_eq!(t.host, Host::Name("api.openai.com".into()));
        assert_eq!(t.port, 443);
        let t = parse_authority("bücher.example:443").unwrap();
        assert_eq!(t.host, Host::Name("xn--bcher-kva.example".into()));
    }

    #[test]
    fn ip_literals() {
        assert_eq!(
            parse_authority("[::1]:8080").unwrap().host,
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            parse_authority("93.184.216.34:80").unwrap().host,
            Host::Ip("93.184.216.34".parse().unwrap())
        );
        assert!(parse_authority("::1:80").is_err());
    }

    #[test]
    fn numeric_forms_never_become_names() {
        for h in [
            "2852039166",
            "0xA9FEA9FE",
            "0251.0376.0251.0376",
            "127.1",
            "0x7f.1",
            "017700000001",
            "169.254.169.254.",
            "1.2.3.04",
            "10.0.0.1.5",
        ] {
            let err = parse_authority(&format!("{h}:80")).unwrap_err();
            assert!(
                matches!(err, TargetError::NumericHost(_)),
                "{h} gave {err:?}"
            );
        }
    }

    #[test]
    fn malformed_authorities() {
        for a in [
            "example.com",
            "example.com:",
            "example.com:0",
            "example.com:65536",
            "example.com:+80",
            ":443",
            "exa mple.com:80",
            "-bad.com:80",
            "a..b:80",
            "user@host:80",
            "[::1]",
            "[zz]:80",
        ] {
            assert!(parse_authority(a).is_err(), "{a} was accepted");
        }
    }
}
