//! Lookup structures so evaluation cost does not grow with the number of
//! agents or destinations: exact IDs in a hash map, patterns keyed by their
//! literal prefix, and per-agent destination indexes (exact hosts plus
//! parent-domain lookups for `*.` wildcards).

use std::collections::HashMap;

use crate::host::{Destination, HostPattern};
use crate::id_pattern::IdPattern;
use crate::spiffe_id::SpiffeId;

/// Agent entry indexes (file order) per ID.
#[derive(Debug, Default)]
pub(crate) struct AgentIndex {
    exact: HashMap<Box<str>, Vec<usize>>,
    /// Literal prefix (`spiffe://td/lit/...`) -> agents whose pattern starts with it.
    patterns: HashMap<Box<str>, Vec<usize>>,
}

impl AgentIndex {
    pub(crate) fn insert(&mut self, idx: usize, id: &IdPattern) {
        match id {
            IdPattern::Exact(e) => self.exact.entry(e.as_str().into()).or_default().push(idx),
            IdPattern::Pattern(p) => self
                .patterns
                .entry(p.literal_prefix().into())
                .or_default()
                .push(idx),
        }
    }

    /// Candidate agent indexes in file order; callers still check the pattern.
    /// Exact hits come straight from the map, patterns from each prefix of the ID.
    pub(crate) fn candidates(&self, id: &SpiffeId, out: &mut Vec<usize>) {
        if let Some(v) = self.exact.get(id.as_str()) {
            out.extend_from_slice(v);
        }
        if self.patterns.is_empty() {
            return;
        }
        let s = id.as_str();
        let td_end = s.len() - id.path().len();
        let mut end = td_end;
        loop {
            if let Some(v) = self.patterns.get(&s[..end]) {
                out.extend_from_slice(v);
            }
            if end == s.len() {
                break;
            }
            end = s[end + 1..].find('/').map_or(s.len(), |i| end + 1 + i);
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

/// Pathway indexes (file order within the agent) per destination host.
#[derive(Debug, Default)]
pub(crate) struct DestIndex {
    exact: HashMap<Box<str>, Vec<(usize, Option<u16>)>>,
    /// Keyed by the suffix after `*.`.
    subdomains: HashMap<Box<str>, Vec<(usize, Option<u16>)>>,
    any: Vec<(usize, Option<u16>)>,
}

impl DestIndex {
    pub(crate) fn insert(&mut self, pathway: usize, d: &Destination) {
        let entry = (pathway, d.port);
        match &d.host {
            HostPattern::Any => self.any.push(entry),
            HostPattern::Exact(h) => self.exact.entry(h.as_str().into()).or_default().push(entry),
            HostPattern::Subdomains(s) => self
                .subdomains
                .entry(s.as_str().into())
                .or_default()
                .push(entry),
        }
    }

    /// Pathways with a destination matching the normalized `host` and `port`,
    /// sorted and deduplicated.
    pub(crate) fn candidates(&self, host: &str, port: u16, out: &mut Vec<usize>) {
        let mut push = |list: &[(usize, Option<u16>)]| {
            for (p, want) in list {
                if want.is_none_or(|w| w == port) {
                    out.push(*p);
                }
            }
        };
        if let Some(v) = self.exact.get(host) {
            push(v);
        }
        if !self.subdomains.is_empty() {
            // every proper parent domain: a.b.c -> b.c, c
            let mut rest = host;
            while let Some(i) = rest.find('.') {
                rest = &rest[i + 1..];
                if let Some(v) = self.subdomains.get(rest) {
                    push(v);
                }
            }
        }
        push(&self.any);
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}
