//! Which resolved addresses the gateway may connect to (the SSRF guard).
//!
//! Every range of the IANA IPv4 and IPv6 special-purpose registries that is not
//! globally reachable is blocked. IPv6 forms that embed an IPv4 address (mapped,
//! compatible, NAT64, 6to4, Teredo) are judged by the IPv4 address inside, because
//! that is where the packets end up. A pathway's `allow_cidrs` is the only way through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why an address is blocked: the registry range it falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockedRange {
    pub name: &'static str,
}

const V4_BLOCKED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("192.175.48.0/24", "direct delegation AS112"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
];

const V6_BLOCKED: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy prefix"),
    // Reached only when no embedded form matched: the rest of the NAT64 /32 is
    // unassigned, and a network-specific layout could carry any IPv4 address.
    ("64:ff9b::/32", "NAT64 (unassigned form)"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing SIDs"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

type Tables = (Vec<(Ipv4Net, &'static str)>, Vec<(Ipv6Net, &'static str)>);

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        // The tables are constants; a parse failure is a bug caught by the unit tests.
        let v4 = V4_BLOCKED
            .iter()
            .filter_map(|(n, name)| n.parse().ok().map(|net| (net, *name)))
            .collect();
        let v6 = V6_BLOCKED
            .iter()
            .filter_map(|(n, name)| n.parse().ok().map(|net| (net, *name)))
            .collect();
        (v4, v6)
    })
}

/// The IPv4 address an IPv6 address carries, for every embedding form that routes to it.
pub fn embedded_ipv4(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d (not :: and ::1).
    if s[..5] == [0; 5] && (s[5] == 0xffff || (s[5] == 0 && u32::from(tail) > 1)) {
        return Some(tail);
    }
    // IPv4-translated ::ffff:0:a.b.c.d (RFC 2765).
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return Some(tail);
    }
    // NAT64 well-known prefix 64:ff9b::/96 and local-use 64:ff9b:1::/48.
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1) {
        return Some(tail);
    }
    // 6to4 2002:AABB:CCDD::/48.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    // Teredo 2001:0::/32: the client's address is the last 32 bits, inverted.
    if s[0] == 0x2001 && s[1] == 0 {
        return Some(Ipv4Addr::from(!u32::from(tail)));
    }
    None
}

/// The blocked range `ip` falls in, if any (before `allow_cidrs` is considered).
pub fn blocked_range(ip: IpAddr) -> Option<BlockedRange> {
    let (v4, v6) = tables();
    match ip {
        IpAddr::V4(a) => v4
            .iter()
            .find(|(net, _)| net.contains(&a))
            .map(|(_, name)| BlockedRange { name }),
        IpAddr::V6(a) => {
            if let Some(inner) = embedded_ipv4(&a) {
                return blocked_range(IpAddr::V4(inner)).or_else(|| {
                    // The local-use NAT64 prefix is not globally reachable whatever it carries.
                    let s = a.segments();
                    (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1).then_some(BlockedRange {
                        name: "local-use NAT64",
                    })
                });
            }
            v6.iter()
                .find(|(net, _)| net.contains(&a))
                .map(|(_, name)| BlockedRange { name })
        }
    }
}

/// Whether the gateway may connect to `ip` for a pathway with these `allow_cidrs`.
pub fn check(ip: IpAddr, allow_cidrs: &[IpNet]) -> Result<(), BlockedRange> {
    let Some(range) = blocked_range(ip) else {
        return Ok(());
    };
    let inner = match ip {
        IpAddr::V6(v6) => embedded_ipv4(&v6).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    let allowed = allow_cidrs
        .iter()
        .any(|net| net.contains(&ip) || inner.is_some_and(|i| net.contains(&i)));
    if allowed {
        Ok(())
    } else {
        Err(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(s: &str) -> bool {
        blocked_range(s.parse().unwrap()).is_some()
    }

    #[test]
    fn tables_parse() {
        let (v4, v6) = tables();
        assert_eq!(v4.len(), V4_BLOCKED.len());
        assert_eq!(v6.len(), V6_BLOCKED.len());
    }

    #[test]
    fn special_purpose_addresses_are_blocked() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.251",
            "198.18.0.1",
            "240.0.0.1",
            "::",
            "::1",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::8.8.8.8",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo for 127.0.0.1
            "2001:db8::1",
            "64:ff9b:0:0:1::a9fe:a9fe",
            "64:ff9b:a9fe:a9fe::",
            "3fff::1",
            "5f00::1",
            "100::1",
            "::ffff:0:10.0.0.1",
            "192.0.0.170",
            "203.0.113.7",
            "198.51.100.1",
            "192.88.99.1",
        ] {
            assert!(blocked(a), "{a} should be blocked");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for a in [
            "8.8.8.8",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!blocked(a), "{a} should pass");
        }
    }

    #[test]
    fn allow_cidrs_open_a_range_and_cover_embedded_forms() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(check("127.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!(check("::ffff:127.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!(check("10.0.0.1".parse().unwrap(), &allow).is_err());
        assert!(check("::1".parse().unwrap(), &allow).is_err());
    }
}
