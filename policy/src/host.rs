//! Host normalization and destination (`host:port`) patterns.
//!
//! Hosts compare in one canonical form: lower case, no trailing dot, IDNs as
//! A-labels. Request hosts and policy hosts both go through [`normalize_host`].

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("no port; write host:port (port `*` for any port)")]
    MissingPort,
    #[error("port {0:?} is not a number in 1..=65535 or `*`")]
    BadPort(String),
    #[error("empty host")]
    EmptyHost,
    #[error("wildcard only allowed as a leading `*.` or a lone `*`")]
    Wildcard,
    #[error("invalid host name: {0}")]
    BadHost(String),
    #[error(
        "{0:?} can never match: the gateway refuses numeric host forms other than a \
         dotted-quad IPv4 address (e.g. 2130706433, 127.1, 0x7f.1) in requests; \
         write the address as a.b.c.d, or use a DNS name"
    )]
    NeverMatches(String),
}

/// Canonical form of a host as a client sent it. Returns `None` for hosts that
/// are not valid names (such a host matches nothing). Borrowed on the fast path.
pub fn normalize_host(host: &str) -> Option<Cow<'_, str>> {
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if trimmed.is_empty() {
        return None;
    }
    if trimmed.is_ascii() {
        if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
            return Some(Cow::Owned(trimmed.to_ascii_lowercase()));
        }
        return Some(Cow::Borrowed(trimmed));
    }
    // UTS #46 mapping: case-folds and converts U-labels to A-labels (`xn--`).
    match idna::domain_to_ascii(trimmed) {
        Ok(a) if !a.is_empty() => Some(Cow::Owned(a.strip_suffix('.').unwrap_or(&a).to_owned())),
        _ => None,
    }
}

/// The host half of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `*`: any host.
    Any,
    /// An exact (normalized) host name or IP literal.
    Exact(String),
    /// `*.suffix`: any host strictly below `suffix`, at any depth. Stores `suffix`.
    Subdomains(String),
}

impl HostPattern {
    /// `host` must already be normalized.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(e) => e == host,
            HostPattern::Subdomains(s) => {
                host.len() > s.len() + 1
                    && host.ends_with(s.as_str())
                    && host.as_bytes()[host.len() - s.len() - 1] == b'.'
            }
        }
    }
}

/// One `host:port` entry of a pathway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub host: HostPattern,
    /// `None` for port `*`.
    pub port: Option<u16>,
}

impl Destination {
    pub fn parse(s: &str) -> Result<Destination, DestinationError> {
        let (host, port) = split_host_port(s)?;
        let port = match port {
            "*" => None,
            p => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err(DestinationError::BadPort(p.into())),
            },
        };
        Ok(Destination {
            host: parse_host_pattern(host)?,
            port,
        })
    }

    /// `host` must already be normalized.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && self.host.matches(host)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) if h.contains(':') => write!(f, "[{h}]"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Subdomains(s) => write!(f, "*.{s}"),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => write!(f, "{}:*", self.host),
        }
    }
}

fn split_host_port(s: &str) -> Result<(&str, &str), DestinationError> {
    if let Some(rest) = s.strip_prefix('[') {
        // [v6]:port
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| DestinationError::BadHost(s.into()))?;
        let port = after
            .strip_prefix(':')
            .ok_or(DestinationError::MissingPort)?;
        return Ok((h, port));
    }
    let (h, p) = s.rsplit_once(':').ok_or(DestinationError::MissingPort)?;
    if h.contains(':') {
        // a bare IPv6 literal: its last group would be read as a port
        return Err(DestinationError::BadHost(format!(
            "{s:?}: write IPv6 literals in brackets, e.g. [::1]:443"
        )));
    }
    if p.is_empty() {
        return Err(DestinationError::MissingPort);
    }
    Ok((h, p))
}

fn parse_host_pattern(h: &str) -> Result<HostPattern, DestinationError> {
    if h.is_empty() {
        return Err(DestinationError::EmptyHost);
    }
    if h == "*" {
        return Ok(HostPattern::Any);
    }
    if let Ok(v6) = h.parse::<Ipv6Addr>() {
        return Ok(HostPattern::Exact(v6.to_string()));
    }
    let (wild, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h),
    };
    if name.contains('*') {
        return Err(DestinationError::Wildcard);
    }
    let norm = normalize_host(name)
        .ok_or_else(|| DestinationError::BadHost(h.into()))?
        .into_owned();
    validate_name(&norm).map_err(|why| DestinationError::BadHost(format!("{h:?}: {why}")))?;
    // The gateway's request parser refuses what C resolvers read as numbers; an entry
    // spelt that way would never match a request.
    if norm.parse::<std::net::Ipv4Addr>().is_err() && looks_numeric(&norm) {
        return Err(DestinationError::NeverMatches(h.into()));
    }
    if wild {
        if norm.parse::<IpAddr>().is_ok() {
            return Err(DestinationError::BadHost(format!(
                "{h:?}: `*.` before an IP address"
            )));
        }
        Ok(HostPattern::Subdomains(norm))
    } else {
        Ok(HostPattern::Exact(norm))
    }
}

/// True for what `inet_aton` would accept as an address (1 to 4 dot-separated parts,
/// each decimal, octal or `0x` hex), and for any name whose last label is all digits
/// (no top-level domain is): the same rule as the gateway's request target parser.
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

fn validate_name(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err("longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("invalid character {c:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(h: &str) -> String {
        normalize_host(h).unwrap().into_owned()
    }

    fn d(s: &str) -> Destination {
        Destination::parse(s).unwrap()
    }

    #[test]
    fn normalization() {
        assert_eq!(n("En.Wikipedia.ORG."), "en.wikipedia.org");
        assert_eq!(n("example.com"), "example.com");
        assert_eq!(n("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(n("BÜCHER.example."), "xn--bcher-kva.example");
        assert!(normalize_host("").is_none());
        assert!(normalize_host(".").is_none());
        assert!(matches!(
            normalize_host("plain.host"),
            Some(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn wildcard_matches_subdomains_not_apex_or_lookalikes() {
        let w = d("*.wikipedia.org:443");
        assert!(w.matches("en.wikipedia.org", 443));
        assert!(w.matches("a.b.c.wikipedia.org", 443));
        assert!(!w.matches("wikipedia.org", 443), "apex");
        assert!(!w.matches("evilwikipedia.org", 443), "look-alike");
        assert!(!w.matches("wikipedia.org.evil.com", 443));
        assert!(!w.matches("en.wikipedia.org", 80), "port");
    }

    #[test]
    fn exact_and_any() {
        assert!(d("Wikipedia.org.:443").matches("wikipedia.org", 443));
        assert!(!d("wikipedia.org:443").matches("en.wikipedia.org", 443));
        assert!(d("*:443").matches("anything.example", 443));
        assert!(d("api.example.com:*").matches("api.example.com", 8443));
        assert!(d("bücher.example:443").matches(&n("BÜCHER.example"), 443));
        assert!(d("[::1]:8080").matches("::1", 8080));
        assert!(d("10.0.0.1:80").matches("10.0.0.1", 80));
    }

    #[test]
    fn numeric_host_forms_the_gateway_refuses_can_never_match() {
        for h in [
            "2130706433",
            "127.1",
            "0x7f.1",
            "0x7f000001",
            "0177.0.0.1",
            "10.0.0.1.5",
            "host.123",
        ] {
            assert_eq!(
                Destination::parse(&format!("{h}:443")).unwrap_err(),
                DestinationError::NeverMatches(h.into()),
                "{h}"
            );
        }
        assert_eq!(
            Destination::parse("*.0.1:443").unwrap_err(),
            DestinationError::NeverMatches("*.0.1".into())
        );
        for ok in [
            "127.0.0.1:80",
            "1password.com:443",
            "x1.example:443",
            "0x.example:443",
        ] {
            assert!(Destination::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn destination_errors() {
        use DestinationError::*;
        assert_eq!(Destination::parse("example.com").unwrap_err(), MissingPort);
        assert_eq!(
            Destination::parse("*.example.com").unwrap_err(),
            MissingPort
        );
        assert_eq!(Destination::parse("example.com:").unwrap_err(), MissingPort);
        assert_eq!(
            Destination::parse("example.com:0").unwrap_err(),
            BadPort("0".into())
        );
        assert_eq!(
            Destination::parse("example.com:65536").unwrap_err(),
            BadPort("65536".into())
        );
        assert_eq!(
            Destination::parse("example.com:+80").unwrap_err(),
            BadPort("+80".into())
        );
        assert_eq!(Destination::parse("api.*.com:443").unwrap_err(), Wildcard);
        assert_eq!(
            Destination::parse("*example.com:443").unwrap_err(),
            Wildcard
        );
        assert_eq!(
            Destination::parse("**.example.com:443").unwrap_err(),
            Wildcard
        );
        assert_eq!(Destination::parse("a.*:443").unwrap_err(), Wildcard);
        assert_eq!(Destination::parse(":443").unwrap_err(), EmptyHost);
        assert!(matches!(
            Destination::parse("exa mple.com:443").unwrap_err(),
            BadHost(_)
        ));
        assert!(matches!(
            Destination::parse("::1:443").unwrap_err(),
            BadHost(_)
        ));
        assert!(matches!(
            Destination::parse("a..b:443").unwrap_err(),
            BadHost(_)
        ));
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?"
    }

    proptest! {
        #[test]
        fn subdomain_wildcard(prefix in prop::collection::vec(label(), 0..4), base in prop::collection::vec(label(), 1..3), junk in label()) {
            // A last label of digits alone is a numeric host form (never matches).
            let base = format!("{}q", base.join("."));
            let pat = d(&format!("*.{base}:443"));
            let host = if prefix.is_empty() { base.clone() } else { format!("{}.{base}", prefix.join(".")) };
            // matches exactly when there is at least one extra label
            prop_assert_eq!(pat.matches(&host, 443), !prefix.is_empty());
            // gluing text onto the first label is never a subdomain
            let glued = format!("{junk}{base}");
            prop_assert!(!pat.matches(&glued, 443));
        }

        #[test]
        fn case_and_trailing_dot_do_not_matter(labels in prop::collection::vec(label(), 1..4), upper in any::<bool>(), dot in any::<bool>()) {
            let host = format!("{}q", labels.join("."));
            let pat = d(&format!("{host}:443"));
            let mut sent = if upper { host.to_uppercase() } else { host.clone() };
            if dot { sent.push('.'); }
            prop_assert!(pat.matches(&n(&sent), 443));
        }
    }
}
