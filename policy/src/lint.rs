//! Warnings about entries that are valid but broader than an operator likely means:
//! `policy check` prints them and still exits 0.

use crate::host::HostPattern;
use crate::policy::Policy;

/// IPv4 ranges shorter than this (and IPv6 ranges shorter than [`WIDE_V6`]) in
/// `allow_cidrs` open more than one of the blocked ranges at once.
const WIDE_V4: u8 = 8;
const WIDE_V6: u8 = 7;

impl Policy {
    /// Over-broad entries, one sentence each, in file order: a destination of any host
    /// (`*:*`, `*:443`), every subdomain of a public suffix (`*.com`, `*.co.uk`), and
    /// `allow_cidrs` that open most of the address space (`0.0.0.0/0`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.pathways() {
            let ctx = format!(
                "{}: agent {:?}, pathway {:?}",
                self.origin(),
                p.agent,
                p.name
            );
            for d in &p.destinations {
                match &d.host {
                    HostPattern::Any => out.push(format!(
                        "{ctx}: destination `{d}` allows every host{}; only the address checks stand between the agent and the internet",
                        if d.port.is_none() { " on every port" } else { "" }
                    )),
                    HostPattern::Subdomains(suffix) => match public_suffix(suffix) {
                        Some(psl::Type::Icann) => out.push(format!(
                            "{ctx}: destination `{d}` allows every domain under the public suffix `{suffix}`, where anyone can register one"
                        )),
                        Some(psl::Type::Private) => out.push(format!(
                            "{ctx}: destination `{d}` allows every site under the shared suffix `{suffix}` (public suffix list, private section), which many unrelated parties control"
                        )),
                        None => {}
                    },
                    _ => {}
                }
            }
            for net in &p.allow_cidrs {
                let wide = match net {
                    ipnet::IpNet::V4(n) => n.prefix_len() < WIDE_V4,
                    ipnet::IpNet::V6(n) => n.prefix_len() < WIDE_V6,
                };
                if wide {
                    out.push(format!(
                        "{ctx}: allow_cidrs `{net}` lets the pathway reach private, loopback and cloud metadata addresses"
                    ));
                }
            }
        }
        out
    }
}

/// `com`, `co.uk` (ICANN) or `github.io` (private): a name under which domains
/// belong to whoever registers them.
fn public_suffix(name: &str) -> Option<psl::Type> {
    psl::suffix(name.as_bytes())
        .filter(|s| s.is_known() && s.as_bytes() == name.as_bytes())
        .and_then(|s| s.typ())
}

#[cfg(test)]
mod tests {
    use crate::Policy;

    fn warnings(destinations: &str, cidrs: &str) -> Vec<String> {
        let yaml = format!(
            "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: p\n        destinations: {destinations}\n        allow_cidrs: {cidrs}\n"
        );
        Policy::from_yaml_str(&yaml, "p.yaml").unwrap().warnings()
    }

    #[test]
    fn over_broad_entries_warn() {
        let w = warnings(
            r#"["*.com:443", "*.co.uk:443", "*:*", "*.github.io:443"]"#,
            "[0.0.0.0/0, \"::/0\"]",
        );
        assert_eq!(w.len(), 6, "{w:#?}");
        assert!(
            w[0].contains("`*.com:443`") && w[0].contains("public suffix `com`"),
            "{}",
            w[0]
        );
        assert!(w[1].contains("`*.co.uk:443`"), "{}", w[1]);
        assert!(
            w[2].contains("`*:*` allows every host on every port"),
            "{}",
            w[2]
        );
        assert!(w[3].contains("shared suffix `github.io`"), "{}", w[3]);
        assert!(
            w[4].contains("0.0.0.0/0") && w[4].starts_with("p.yaml: agent \"a\", pathway \"p\""),
            "{}",
            w[4]
        );
        assert!(w[5].contains("::/0"));
    }

    #[test]
    fn ordinary_entries_do_not() {
        let w = warnings(
            r#"["*.wikipedia.org:443", "api.openai.com:443", "*.example.co.uk:443", "[::1]:80"]"#,
            "[10.96.0.0/12, 127.0.0.0/8, \"fc00::/7\"]",
        );
        assert_eq!(w, Vec::<String>::new());
    }
}
