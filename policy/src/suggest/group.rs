//! Grouping observed destinations into pathways: registrable domains from the
//! Public Suffix List, `*.` wildcards, method sets and path prefixes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use crate::request::RequestKind;

/// One observed (source, kind, method, host, port) that should be allowed.
#[derive(Debug, Clone)]
pub struct Obs<'a> {
    pub source: &'a str,
    pub kind: RequestKind,
    pub method: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub count: u64,
    pub first: i64,
    pub last: i64,
    /// Directory-level common path prefix (L7 only).
    pub prefix: Option<&'a str>,
}

/// A proposed pathway, not yet rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathwayPlan {
    pub name: String,
    pub destinations: Vec<DestPlan>,
    /// Upper case, sorted.
    pub methods: Vec<String>,
    /// CEL, built only from validated characters.
    pub when: Option<String>,
    /// L7 to port 443: the gateway originates TLS.
    pub upstream_tls: bool,
    pub count: u64,
    pub first: i64,
    pub last: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestPlan {
    /// `host:port` as written in the policy.
    pub text: String,
    pub comment: String,
}

/// The registrable domain (eTLD+1) of `host`, or `None` for IP literals and
/// hosts whose suffix is not in the Public Suffix List (cluster-local names
/// such as `svc.cluster.local` must never be grouped under a guessed suffix).
pub fn registrable_domain(host: &str) -> Option<&str> {
    if host.contains(':') || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    if !psl::suffix(host.as_bytes())?.is_known() {
        return None;
    }
    psl::domain_str(host)
}

/// Hosts seen under one registrable domain and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGroup {
    /// `Some(base)`: propose `*.base`; hosts strictly below it are covered.
    pub wildcard: Option<String>,
    /// Hosts written as exact entries (the base itself, or all when no wildcard).
    pub exact: Vec<String>,
    /// Hosts covered by the wildcard.
    pub covered: Vec<String>,
}

/// Decides between one `*.base` entry and exact entries for the `hosts` of one
/// registrable domain `domain` (`None`: not groupable). `avoid` holds hosts of
/// the same agent that must stay denied; a wildcard that would cover one of
/// them is not proposed.
pub fn group_hosts(
    domain: Option<&str>,
    hosts: &BTreeSet<&str>,
    min_subdomains: usize,
    avoid: &HashSet<&str>,
) -> HostGroup {
    let exact_only = || HostGroup {
        wildcard: None,
        exact: hosts.iter().map(|h| h.to_string()).collect(),
        covered: Vec::new(),
    };
    let Some(domain) = domain else {
        return exact_only();
    };
    if min_subdomains == 0 {
        return exact_only();
    }
    let subs: Vec<&str> = hosts
        .iter()
        .copied()
        .filter(|h| is_strictly_below(h, domain))
        .collect();
    if subs.len() < min_subdomains {
        return exact_only();
    }
    // The narrowest parent every subdomain shares, never above the registrable
    // domain: a.b.x.com, c.b.x.com, d.b.x.com give `*.b.x.com`.
    let mut base = parent(subs[0]).unwrap_or(domain);
    for h in &subs[1..] {
        while !is_strictly_below(h, base) && base.len() > domain.len() {
            base = parent(base).unwrap_or(domain);
        }
    }
    if !is_strictly_below(subs[0], base) || base.len() < domain.len() {
        base = domain;
    }
    let below: Vec<&str> = hosts
        .iter()
        .copied()
        .filter(|h| is_strictly_below(h, base))
        .collect();
    if below.len() < min_subdomains || avoid.iter().any(|a| is_strictly_below(a, base)) {
        return exact_only();
    }
    HostGroup {
        wildcard: Some(base.to_owned()),
        exact: hosts
            .iter()
            .filter(|h| !is_strictly_below(h, base))
            .map(|h| h.to_string())
            .collect(),
        covered: below.iter().map(|h| h.to_string()).collect(),
    }
}

fn is_strictly_below(host: &str, base: &str) -> bool {
    host.len() > base.len() + 1
        && host.ends_with(base)
        && host.as_bytes()[host.len() - base.len() - 1] == b'.'
}

fn parent(host: &str) -> Option<&str> {
    host.split_once('.').map(|(_, p)| p)
}

/// The directory part of a path: up to and including its last `/`.
pub fn path_dir(path: &str) -> &str {
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path.rfind('/') {
        Some(i) => &path[..=i],
        None => "/",
    }
}

/// The longest common prefix of two directory prefixes, cut back to a `/`.
pub fn common_dir(a: &str, b: &str) -> String {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let common = &a.as_bytes()[..n];
    match common.iter().rposition(|&c| c == b'/') {
        // Cut at an ASCII '/', so the slice is valid UTF-8.
        Some(i) => String::from_utf8_lossy(&common[..=i]).into_owned(),
        None => String::new(),
    }
}

/// A path prefix that is safe to put in a CEL string literal inside a YAML
/// single-quoted scalar, and narrow enough to be worth a condition.
pub fn usable_prefix(prefix: &str) -> Option<&str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/-._~%+,;=:@".contains(c);
    let end = prefix.find(|c| !safe(c)).unwrap_or(prefix.len());
    let p = path_dir(&prefix[..end]);
    (p.len() > 1 && p.starts_with('/')).then_some(p)
}

/// `host:port`, with brackets around IPv6 literals.
pub fn dest_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A name of 1-63 characters of `A-Z a-z 0-9 - _ .`, not in `taken`; adds it.
pub fn unique_name(base: &str, taken: &mut HashSet<String>) -> String {
    let mut clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    clean = clean.trim_matches(['-', '.']).to_owned();
    if clean.is_empty() {
        clean = "suggested".to_owned();
    }
    clean.truncate(56);
    let mut name = clean.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{clean}-{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// An agent name from a SPIFFE ID: its last path segment
/// (`.../sa/research-agent` gives `research-agent`).
pub fn agent_name_base(spiffe_id: &str) -> &str {
    spiffe_id
        .rsplit('/')
        .find(|s| !s.is_empty() && !s.contains(':'))
        .unwrap_or("agent")
}

/// Pathways for one agent's observations. `source_cond`: the agent entry is an
/// ID pattern, so each pathway is narrowed to the SPIFFE IDs that were seen.
pub fn plan_pathways(
    obs: &[Obs<'_>],
    min_subdomains: usize,
    source_cond: bool,
    avoid: &HashSet<&str>,
    taken: &mut HashSet<String>,
) -> Vec<PathwayPlan> {
    // (group key, kind, port for L7) → observations; the group key is the
    // registrable domain, or the host itself when it has none.
    let mut groups: BTreeMap<(String, bool, u16), Vec<&Obs<'_>>> = BTreeMap::new();
    for o in obs {
        let key = registrable_domain(o.host).unwrap_or(o.host).to_owned();
        let (l7, port) = match o.kind {
            RequestKind::Connect => (false, 0),
            RequestKind::Http => (true, o.port),
        };
        groups.entry((key, l7, port)).or_default().push(o);
    }
    let mut out = Vec::new();
    for ((key, l7, port), items) in groups {
        let domain = registrable_domain(&key).filter(|d| *d == key);
        let mut ports: BTreeMap<u16, BTreeSet<&str>> = BTreeMap::new();
        for o in &items {
            ports.entry(o.port).or_default().insert(o.host);
        }
        let mut destinations = Vec::new();
        for (p, hosts) in &ports {
            let g = group_hosts(domain, hosts, min_subdomains, avoid);
            if let Some(base) = &g.wildcard {
                let n: u64 = items
                    .iter()
                    .filter(|o| o.port == *p && g.covered.iter().any(|c| c == o.host))
                    .map(|o| o.count)
                    .sum();
                let mut names: Vec<&str> = g
                    .covered
                    .iter()
                    .map(|h| h.strip_suffix(base.as_str()).unwrap_or(h))
                    .map(|h| h.trim_end_matches('.'))
                    .take(5)
                    .collect();
                if g.covered.len() > 5 {
                    names.push("...");
                }
                destinations.push(DestPlan {
                    text: format!("*.{base}:{p}"),
                    comment: format!(
                        "{} subdomains ({}), {}",
                        g.covered.len(),
                        names.join(", "),
                        super::requests(n)
                    ),
                });
            }
            for h in &g.exact {
                let n: u64 = items
                    .iter()
                    .filter(|o| o.port == *p && o.host == h)
                    .map(|o| o.count)
                    .sum();
                destinations.push(DestPlan {
                    text: dest_text(h, *p),
                    comment: super::requests(n),
                });
            }
        }
        let methods: BTreeSet<String> = items.iter().map(|o| o.method.to_owned()).collect();
        let mut conds = Vec::new();
        if source_cond {
            let ids: BTreeSet<&str> = items.iter().map(|o| o.source).collect();
            conds.push(if ids.len() == 1 {
                format!(
                    "source.spiffe_id == \"{}\"",
                    ids.iter().next().unwrap_or(&"")
                )
            } else {
                let list: Vec<String> = ids.iter().map(|i| format!("\"{i}\"")).collect();
                format!("source.spiffe_id in [{}]", list.join(", "))
            });
        }
        if l7 {
            let mut prefix: Option<String> = None;
            for o in &items {
                let p = o.prefix.unwrap_or("/");
                prefix = Some(match prefix {
                    None => p.to_owned(),
                    Some(cur) => common_dir(&cur, p),
                });
            }
            if let Some(p) = prefix.as_deref().and_then(usable_prefix) {
                conds.push(format!("request.path.startsWith(\"{p}\")"));
            }
        }
        let name_base = match (l7, port) {
            (false, _) => key.clone(),
            (true, 443) | (true, 80) => format!("{key}-http"),
            (true, p) => format!("{key}-http-{p}"),
        };
        out.push(PathwayPlan {
            name: unique_name(&name_base, taken),
            destinations,
            methods: methods.into_iter().collect(),
            when: (!conds.is_empty()).then(|| conds.join(" && ")),
            upstream_tls: l7 && port == 443,
            count: items.iter().map(|o| o.count).sum(),
            first: items.iter().map(|o| o.first).min().unwrap_or(0),
            last: items.iter().map(|o| o.last).max().unwrap_or(0),
        });
    }
    out
}
