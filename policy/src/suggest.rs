//! Learn mode: turn observed audit records into a proposed allowlist and a
//! policy test file that pins it down.
//!
//! Feed parsed audit lines to an [`Aggregator`] one at a time (memory grows
//! with distinct (source, destination, method) keys, not with lines), then
//! call [`suggest`] with the current policy text. The result is YAML text that
//! has already been loaded by the strict loader, and tests that have already
//! passed against it.

mod edit;
pub mod group;
mod mcp;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat};
use serde::Deserialize;

use crate::decision::{Decision, Mode, Reason};
use crate::error::PolicyError;
use crate::headers::HeaderView;
use crate::host::normalize_host;
use crate::id_pattern::IdPattern;
use crate::load::parse_yaml;
use crate::model::PolicyFile;
use crate::policy::Policy;
use crate::request::{Request, RequestKind};
use crate::spiffe_id::SpiffeId;
use crate::testing::{parse_tests, run_tests, TestFileError};

pub use edit::EditError;
use group::{dest_text, Obs, PathwayPlan};

/// Destinations listed per pathway in the summary (the file has them all).
const SUMMARY_DESTINATIONS: usize = 6;

/// The audit `reason` of a request refused after DNS for its address.
pub const BLOCKED_ADDRESS_REASON: &str = "destination address not allowed";

/// The fields of an audit line that `suggest` reads. Unknown fields are
/// ignored and missing ones default, so new audit fields never break it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuditEntry<'a> {
    #[serde(borrow)]
    pub ts: Cow<'a, str>,
    #[serde(borrow)]
    pub source_spiffe_id: Cow<'a, str>,
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    #[serde(borrow)]
    pub host: Cow<'a, str>,
    pub port: u16,
    #[serde(borrow)]
    pub path: Cow<'a, str>,
    #[serde(borrow)]
    pub decision: Cow<'a, str>,
    pub enforced: Option<bool>,
    #[serde(borrow)]
    pub rule: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub reason: Cow<'a, str>,
    #[serde(borrow)]
    pub mcp_method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub mcp_tool: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Destinations seen fewer times than this are not proposed.
    pub min_count: u64,
    /// Distinct subdomains of one registrable domain needed for a `*.` entry;
    /// 0 disables wildcards.
    pub wildcard_min: usize,
    /// Ignore records before this time (milliseconds since the epoch).
    pub since_ms: Option<i64>,
    /// Set the suggested policy's mode; `None` keeps the current one.
    pub mode: Option<Mode>,
    /// Written after `$schema=` in the generated files' first line.
    pub policy_schema: String,
    pub tests_schema: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_count: 1,
            wildcard_min: 3,
            since_ms: None,
            mode: None,
            policy_schema: "policy.schema.json".into(),
            tests_schema: "policy-tests.schema.json".into(),
        }
    }
}

/// Why an audit line was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct EntryError {
    pub field: &'static str,
    pub why: String,
}

fn bad(field: &'static str, why: impl Into<String>) -> EntryError {
    EntryError {
        field,
        why: why.into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Edit(#[from] EditError),
    /// The generated files did not load or their tests did not pass: a bug here.
    #[error("generated {what} is invalid: {why}")]
    Generated { what: &'static str, why: String },
}

/// Milliseconds since the epoch of an RFC 3339 timestamp.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn requests(n: u64) -> String {
    if n == 1 {
        "1 request".into()
    } else {
        format!("{n} requests")
    }
}

fn fmt_ts(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "?".into())
}

#[derive(Debug, Clone)]
struct Stats {
    source: String,
    kind: RequestKind,
    method: String,
    host: String,
    port: u16,
    count: u64,
    first: i64,
    last: i64,
    allowed: u64,
    /// Denied by no pathway (enforced or not).
    denied: u64,
    /// Of `denied`: let through only because of audit mode.
    audit_only: u64,
    rule: Option<String>,
    rule_count: u64,
    blocked: u64,
    /// The first path seen (L7), used for the test case.
    sample_path: String,
    /// Directory-level common prefix of every path seen (L7).
    prefix: Option<String>,
    /// MCP messages and the tools they called.
    mcp: mcp::McpSeen,
}

/// Counts of what [`Aggregator::add`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub used: u64,
    pub before_since: u64,
}

/// Streams audit records into per-(source, kind, method, host, port) statistics.
#[derive(Debug, Default)]
pub struct Aggregator {
    options: Options,
    keys: HashMap<String, Stats>,
    key_buf: String,
    counts: Counts,
}

impl Aggregator {
    pub fn new(options: Options) -> Self {
        Aggregator {
            options,
            ..Default::default()
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Distinct (source, kind, method, host, port) keys so far.
    pub fn distinct(&self) -> usize {
        self.keys.len()
    }

    /// Adds one record. An invalid record changes nothing and says why.
    pub fn add(&mut self, e: &AuditEntry<'_>) -> Result<(), EntryError> {
        let ts = parse_rfc3339(&e.ts).ok_or_else(|| bad("ts", "not an RFC 3339 timestamp"))?;
        let kind = match &*e.kind {
            "connect" => RequestKind::Connect,
            "http" => RequestKind::Http,
            // A connection the gateway closed (its peer's certificate expired or no
            // longer verifies): not a request, nothing to suggest from.
            "connection" => return Ok(()),
            k => return Err(bad("kind", format!("{k:?} is not connect or http"))),
        };
        let decision = &*e.decision;
        if decision != "allow" && decision != "deny" {
            return Err(bad(
                "decision",
                format!("{decision:?} is not allow or deny"),
            ));
        }
        if e.method.is_empty()
            || e.method.len() > 32
            || !e
                .method
                .bytes()
                .all(|b| b.is_ascii_alphabetic() || b == b'-')
        {
            return Err(bad(
                "method",
                format!("{:?} is not an HTTP method", e.method),
            ));
        }
        let source: SpiffeId = e
            .source_spiffe_id
            .parse()
            .map_err(|err| bad("source_spiffe_id", format!("{err}")))?;
        let host = normalize_host(&e.host)
            .filter(|h| valid_host(h))
            .ok_or_else(|| bad("host", format!("{:?} is not a host name", e.host)))?;
        if e.port == 0 {
            return Err(bad("port", "missing or 0"));
        }
        if let Some(since) = self.options.since_ms {
            if ts < since {
                self.counts.before_since += 1;
                return Ok(());
            }
        }
        self.counts.used += 1;
        let method = e.method.to_ascii_uppercase();
        let path = match kind {
            RequestKind::Http => {
                let p = e.path.split(['?', '#']).next().unwrap_or("");
                if p.starts_with('/') {
                    p
                } else {
                    "/"
                }
            }
            RequestKind::Connect => "",
        };
        self.key_buf.clear();
        let _ = write!(
            self.key_buf,
            "{}\n{}\n{method}\n{host}\n{}",
            source.as_str(),
            kind.as_str(),
            e.port
        );
        let s = match self.keys.get_mut(self.key_buf.as_str()) {
            Some(s) => s,
            None => self.keys.entry(self.key_buf.clone()).or_insert(Stats {
                source: source.as_str().to_owned(),
                kind,
                method,
                host: host.into_owned(),
                port: e.port,
                count: 0,
                first: ts,
                last: ts,
                allowed: 0,
                denied: 0,
                audit_only: 0,
                rule: None,
                rule_count: 0,
                blocked: 0,
                sample_path: path.to_owned(),
                prefix: None,
                mcp: mcp::McpSeen::default(),
            }),
        };
        s.count += 1;
        s.first = s.first.min(ts);
        s.last = s.last.max(ts);
        if decision == "allow" {
            s.allowed += 1;
        } else if let Some(rule) = e.rule.as_deref().filter(|r| !r.is_empty()) {
            s.rule_count += 1;
            if s.rule.is_none() {
                s.rule = Some(rule.to_owned());
            }
        } else if e.reason.starts_with(BLOCKED_ADDRESS_REASON) {
            s.blocked += 1;
        } else {
            s.denied += 1;
            if e.enforced == Some(false) {
                s.audit_only += 1;
            }
        }
        s.mcp.add(e.mcp_method.as_deref(), e.mcp_tool.as_deref());
        if kind == RequestKind::Http {
            let dir = group::path_dir(path);
            s.prefix = Some(match s.prefix.take() {
                None => dir.to_owned(),
                Some(cur) if dir.starts_with(cur.as_str()) => cur,
                Some(cur) => group::common_dir(&cur, dir),
            });
        }
        Ok(())
    }
}

fn valid_host(h: &str) -> bool {
    if h.contains(':') {
        return h.parse::<Ipv6Addr>().is_ok();
    }
    h.len() <= 253
        && h.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        })
        && !h.starts_with('.')
        && !h.contains("..")
}

/// The current policy: its text (kept as written) and the name used in messages.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub text: &'a str,
    pub origin: &'a str,
}

/// What `suggest` proposes.
#[derive(Debug, Clone)]
pub struct Suggestion {
    pub policy_yaml: String,
    pub tests_yaml: String,
    /// Human-readable, one section per agent.
    pub summary: String,
    pub added_pathways: usize,
    pub added_agents: usize,
    pub test_cases: usize,
    /// Nothing was added: the policy text is the current one.
    pub unchanged: bool,
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    AlreadyAllowed,
    Rule(String),
    Blocked,
    Untrusted,
    NeedsReview(String),
    NotReAdded,
    BelowMin,
    Candidate,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Existing(usize),
    New(String),
}

fn request_for<'a>(s: &'a Stats, source: &'a SpiffeId) -> Request<'a> {
    Request {
        source,
        source_address: None,
        kind: s.kind,
        method: &s.method,
        host: &s.host,
        port: s.port,
        path: &s.sample_path,
        query: "",
        headers: HeaderView::empty(),
        llm_model: None,
        now: SystemTime::now(),
    }
}

fn request_line(s: &Stats) -> String {
    match s.kind {
        RequestKind::Connect => format!("CONNECT {}", dest_text(&s.host, s.port)),
        RequestKind::Http => format!(
            "{} http://{}{}",
            s.method,
            dest_text(&s.host, s.port),
            s.sample_path
        ),
    }
}

/// JSON string syntax is valid YAML double-quoted syntax.
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Builds the suggestion from aggregated records and the current policy.
pub fn suggest(agg: Aggregator, current: Option<Current<'_>>) -> Result<Suggestion, SuggestError> {
    let opts = agg.options;
    let loaded = match current {
        Some(c) => Some((
            c,
            Policy::from_yaml_str(c.text, c.origin)?,
            parse_yaml::<PolicyFile>(c.text, c.origin)?,
        )),
        None => None,
    };
    let mut stats: Vec<Stats> = agg.keys.into_values().collect();
    stats.sort_by(|a, b| {
        (&a.source, &a.host, a.port, a.kind.as_str(), &a.method).cmp(&(
            &b.source,
            &b.host,
            b.port,
            b.kind.as_str(),
            &b.method,
        ))
    });
    let ids: Vec<SpiffeId> = stats
        .iter()
        .map(|s| s.source.parse::<SpiffeId>())
        .collect::<Result<_, _>>()
        .map_err(|e| SuggestError::Generated {
            what: "source",
            why: e.to_string(),
        })?;

    // 1. What the current policy says about each key, and what to do with it.
    let mut status = Vec::with_capacity(stats.len());
    for (s, id) in stats.iter().zip(&ids) {
        let cur = loaded
            .as_ref()
            .map(|(_, p, _)| mcp::evaluate(p, &request_for(s, id), &s.mcp));
        let st = if s.rule_count > 0 {
            Status::Rule(s.rule.clone().unwrap_or_default())
        } else if s.blocked > 0 {
            Status::Blocked
        } else if let Some(d) = cur.as_ref().filter(|d| d.allowed) {
            let _ = d;
            Status::AlreadyAllowed
        } else {
            match cur.as_ref().map(|d| &d.reason) {
                Some(Reason::UntrustedTrustDomain) => Status::Untrusted,
                Some(Reason::DeniedByRule | Reason::DenyRuleError) => Status::Rule(
                    cur.as_ref()
                        .and_then(|d| d.rule.clone())
                        .unwrap_or_default(),
                ),
                Some(
                    r @ (Reason::ModelNotAllowed { .. }
                    | Reason::McpNotAllowed { .. }
                    | Reason::ConditionNotMet
                    | Reason::ConditionError { .. }),
                ) => Status::NeedsReview(r.to_string()),
                Some(_) if s.denied == 0 => Status::NotReAdded,
                _ if s.count < opts.min_count => Status::BelowMin,
                _ => Status::Candidate,
            }
        };
        status.push(st);
    }

    // 2. Which agent entry each candidate goes to.
    let mut taken_agents: HashSet<String> = HashSet::new();
    let mut pattern_agent: HashSet<usize> = HashSet::new();
    if let Some((_, p, _)) = &loaded {
        taken_agents.extend(p.agent_names().map(str::to_owned));
    }
    let mut by_target: BTreeMap<Target, Vec<usize>> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        if status[i] != Status::Candidate {
            continue;
        }
        let target = match &loaded {
            Some((_, p, _)) => {
                let agents: Vec<_> = p.agents().collect();
                let exact = agents
                    .iter()
                    .position(|a| matches!(a.id, IdPattern::Exact(_)) && a.id.matches(id));
                let pattern = agents.iter().position(|a| a.id.matches(id));
                match exact.or(pattern) {
                    Some(ix) => {
                        if exact.is_none() {
                            pattern_agent.insert(ix);
                        }
                        Target::Existing(ix)
                    }
                    None => Target::New(id.as_str().to_owned()),
                }
            }
            None => Target::New(id.as_str().to_owned()),
        };
        by_target.entry(target).or_default().push(i);
    }
    // Hosts a wildcard must not cover, per source: refused addresses and
    // destinations an existing pathway restricts.
    let mut avoid_by_source: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (s, st) in stats.iter().zip(&status) {
        if matches!(
            st,
            Status::Blocked | Status::NeedsReview(_) | Status::NotReAdded
        ) {
            avoid_by_source
                .entry(s.source.as_str())
                .or_default()
                .insert(s.host.as_str());
        }
    }

    // 3. Plan and render pathways per target.
    let mut pathway_blocks: Vec<(usize, String)> = Vec::new();
    let mut agents_block = String::new();
    let mut added_pathways = 0;
    let mut added_agents = 0;
    let mut new_agent_names: BTreeMap<String, String> = BTreeMap::new();
    let mut planned: Vec<(String, PathwayPlan)> = Vec::new();
    for (target, members) in &by_target {
        let obs: Vec<Obs<'_>> = members
            .iter()
            .map(|&i| {
                let s = &stats[i];
                Obs {
                    source: &s.source,
                    kind: s.kind,
                    method: &s.method,
                    host: &s.host,
                    port: s.port,
                    count: s.count,
                    first: s.first,
                    last: s.last,
                    prefix: s.prefix.as_deref(),
                }
            })
            .collect();
        let mut avoid: HashSet<&str> = HashSet::new();
        for o in &obs {
            if let Some(a) = avoid_by_source.get(o.source) {
                avoid.extend(a.iter().copied());
            }
        }
        let (mut taken_pathways, source_cond, agent_name) = match target {
            Target::Existing(ix) => {
                let names = loaded
                    .as_ref()
                    .and_then(|(_, p, _)| p.agents().nth(*ix))
                    .map(|a| {
                        (
                            a.pathways.iter().map(|p| p.name.clone()).collect(),
                            a.name.to_owned(),
                        )
                    })
                    .unwrap_or_default();
                (names.0, pattern_agent.contains(ix), names.1)
            }
            Target::New(id) => {
                let name = group::unique_name(group::agent_name_base(id), &mut taken_agents);
                new_agent_names.insert(id.clone(), name.clone());
                (HashSet::new(), false, name)
            }
        };
        let plans = group::plan_pathways(
            &obs,
            opts.wildcard_min,
            source_cond,
            &avoid,
            &mut taken_pathways,
        );
        added_pathways += plans.len();
        let mut block = String::new();
        for p in &plans {
            render_pathway(&mut block, p);
            planned.push((agent_name.clone(), p.clone()));
        }
        match target {
            Target::Existing(ix) => pathway_blocks.push((*ix, block)),
            Target::New(id) => {
                added_agents += 1;
                let first = members.iter().map(|&i| stats[i].first).min().unwrap_or(0);
                let _ = writeln!(
                    agents_block,
                    "# suggested: new agent, first seen {}",
                    fmt_ts(first)
                );
                let _ = writeln!(agents_block, "- name: {}", q(&agent_name));
                let _ = writeln!(agents_block, "  id: {}", q(id));
                let _ = writeln!(agents_block, "  pathways:");
                for l in block.lines() {
                    let _ = writeln!(agents_block, "    {l}");
                }
            }
        }
    }

    // 3b. Tools agents called on MCP pathways that do not list them, added in place.
    let mcp_adds = match &loaded {
        Some((_, p, _)) => mcp::additions(
            p,
            stats
                .iter()
                .zip(&ids)
                .map(|(s, id)| (request_for(s, id), &s.mcp)),
        ),
        None => Vec::new(),
    };
    let (mcp_edit, mcp_failed) = match &loaded {
        Some((c, _, file)) if !mcp_adds.is_empty() => mcp::apply(c.text, c.origin, file, &mcp_adds),
        _ => (None, Vec::new()),
    };

    // 4. The policy text.
    let unchanged = added_pathways == 0 && opts.mode.is_none() && mcp_edit.is_none();
    let policy_yaml = match &loaded {
        Some((c, p, file)) => {
            let (base, file) = match &mcp_edit {
                Some((t, f)) => (t.as_str(), f),
                None => (c.text, file),
            };
            if added_pathways == 0 && opts.mode.is_none_or(|m| m == p.mode()) {
                base.to_owned()
            } else {
                let ins = edit::Insertions {
                    pathways: pathway_blocks
                        .iter()
                        .map(|(i, b)| (*i, b.as_str()))
                        .collect(),
                    agents: &agents_block,
                    mode: opts.mode.filter(|m| *m != p.mode()),
                };
                let mut text = edit::edit(base, file, &ins)?;
                if !text.starts_with("# yaml-language-server:") {
                    text = format!(
                        "# yaml-language-server: $schema={}\n{text}",
                        opts.policy_schema
                    );
                }
                text
            }
        }
        None => {
            if stats.is_empty() {
                String::new()
            } else {
                new_policy_text(&opts, &stats, &ids, &status, &agents_block)
            }
        }
    };

    // 5. Load what we wrote and check it holds what we meant.
    let suggested = if policy_yaml.is_empty() {
        None
    } else {
        let p = Policy::from_yaml_str(&policy_yaml, "suggested-policy.yaml").map_err(|e| {
            SuggestError::Generated {
                what: "policy",
                why: e.to_string(),
            }
        })?;
        verify_structure(&p, loaded.as_ref().map(|(_, p, _)| p), &planned)?;
        Some(p)
    };

    // 6. Tests and summary from the suggested policy's own verdicts.
    let mut tests = String::new();
    let _ = writeln!(
        tests,
        "# yaml-language-server: $schema={}",
        opts.tests_schema
    );
    let _ = writeln!(
        tests,
        "# Generated by `egress-gateway policy suggest`: one case per observed (source, destination, method)."
    );
    let _ = writeln!(
        tests,
        "# Allow cases pin what the suggested policy allows; deny cases what a deny rule or a blocked address refused."
    );
    let mut cases = 0;
    let mut sections: BTreeMap<String, Section> = BTreeMap::new();
    let label = |s: &Stats, d: Option<&Decision>| -> String {
        d.and_then(|d| d.agent.clone())
            .or_else(|| new_agent_names.get(&s.source).cloned())
            .unwrap_or_else(|| s.source.clone())
    };
    let mut test_lines = String::new();
    for ((s, id), st) in stats.iter().zip(&ids).zip(&status) {
        let d = suggested
            .as_ref()
            .map(|p| mcp::evaluate(p, &request_for(s, id), &s.mcp));
        let agent = label(s, d.as_ref());
        let sec = sections.entry(agent.clone()).or_default();
        let what = format!("{} ({})", request_line(s), requests(s.count));
        let allowed = d.as_ref().is_some_and(|d| d.allowed);
        let mut case = |expect: &str, pathway: Option<&str>, rule: Option<&str>| {
            cases += 1;
            let _ = writeln!(
                test_lines,
                "  - name: {}",
                q(&format!("{}: {} -> {expect}", s.source, request_line(s)))
            );
            let _ = writeln!(test_lines, "    source: {}", q(&s.source));
            let _ = writeln!(test_lines, "    request: {}", q(&request_line(s)));
            if s.mcp.any {
                // MCP traffic is JSON-RPC: the case carries a message no list gates.
                let _ = writeln!(test_lines, "    mcp: {{ method: \"initialize\" }}");
            }
            let _ = writeln!(test_lines, "    expect: {expect}");
            if let Some(p) = pathway {
                let _ = writeln!(test_lines, "    pathway: {}", q(p));
            }
            if let Some(r) = rule {
                let _ = writeln!(test_lines, "    rule: {}", q(r));
            }
        };
        let pathway = d.as_ref().and_then(|d| d.pathway_name()).map(str::to_owned);
        match st {
            Status::Rule(r) => {
                let matched = d.as_ref().and_then(|d| d.rule.clone());
                if allowed {
                    sec.notes.push(format!(
                        "{what}: denied in the log by rule {r:?}, which does not fire without the request's headers/time; not tested"
                    ));
                } else {
                    case("deny", None, matched.as_deref().filter(|m| m == r));
                    sec.denied.push(format!("{what}: deny rule {r:?}"));
                }
            }
            Status::Blocked => {
                if allowed {
                    sec.notes.push(format!(
                        "{what}: allowed by the policy, refused at run time for its address; not tested"
                    ));
                } else {
                    case("deny", None, None);
                    sec.denied.push(format!("{what}: blocked address"));
                }
            }
            _ if allowed => {
                case("allow", pathway.as_deref(), None);
                match st {
                    Status::Candidate => {}
                    Status::AlreadyAllowed => sec.already += 1,
                    _ => sec.notes.push(format!(
                        "{what}: covered by suggested pathway {:?} although not proposed on its own",
                        pathway.as_deref().unwrap_or("")
                    )),
                }
            }
            Status::Untrusted => sec
                .denied
                .push(format!("{what}: trust domain not in trust_domains")),
            Status::NeedsReview(why) => sec.denied.push(format!(
                "{what}: a pathway lists this destination but {why}; review by hand"
            )),
            Status::NotReAdded => sec.denied.push(format!(
                "{what}: allowed in the log, not by the current policy; not re-added"
            )),
            Status::BelowMin => sec
                .denied
                .push(format!("{what}: below --min-count {}", opts.min_count)),
            Status::Candidate | Status::AlreadyAllowed => sec.notes.push(format!(
                "{what}: meant to be allowed but the suggested policy denies it ({})",
                d.as_ref().map(|d| d.reason.to_string()).unwrap_or_default()
            )),
        }
    }
    // Each tool called on an MCP pathway, as the suggested policy decides it.
    for ((s, id), st) in stats.iter().zip(&ids).zip(&status) {
        let Some(p) = suggested.as_ref().filter(|_| !s.mcp.tools.is_empty()) else {
            continue;
        };
        if matches!(st, Status::Rule(_) | Status::Blocked) {
            continue;
        }
        let agent = label(s, None);
        for tool in s.mcp.tools.keys() {
            let d = p.evaluate_mcp(&request_for(s, id), Some(&mcp::tool_call(tool)));
            if !d.allowed {
                sections
                    .entry(agent.clone())
                    .or_default()
                    .notes
                    .push(format!(
                        "{}: tools/call {tool:?} stays denied ({}); not tested",
                        request_line(s),
                        d.reason
                    ));
                continue;
            }
            cases += 1;
            let _ = writeln!(
                test_lines,
                "  - name: {}",
                q(&format!(
                    "{}: {} tools/call {tool} -> allow",
                    s.source,
                    request_line(s)
                ))
            );
            let _ = writeln!(test_lines, "    source: {}", q(&s.source));
            let _ = writeln!(test_lines, "    request: {}", q(&request_line(s)));
            let _ = writeln!(test_lines, "    mcp: {{ tool: {} }}", q(tool));
            let _ = writeln!(test_lines, "    expect: allow");
            if let Some(pw) = d.pathway_name() {
                let _ = writeln!(test_lines, "    pathway: {}", q(pw));
            }
        }
    }
    for add in &mcp_adds {
        let sec = sections.entry(add.agent.clone()).or_default();
        let tools: Vec<&str> = add.tools.iter().map(String::as_str).collect();
        if mcp_failed.contains(&add) {
            sec.notes.push(format!(
                "pathway {:?}: tools called but not in mcp.tools: {}; add by hand",
                add.pathway,
                tools.join(", ")
            ));
        } else {
            sec.added.push(format!(
                "pathway {:?}: mcp.tools + {} ({})",
                add.pathway,
                tools.join(", "),
                requests(add.calls)
            ));
        }
    }
    if cases == 0 {
        tests.push_str("tests: []\n");
    } else {
        tests.push_str("tests:\n");
        tests.push_str(&test_lines);
    }
    if let Some(p) = &suggested {
        let prepared =
            parse_tests(&tests, "suggested-tests.yaml").map_err(|e: TestFileError| {
                SuggestError::Generated {
                    what: "tests",
                    why: e.to_string(),
                }
            })?;
        let report = run_tests(p, &prepared);
        if let Some(f) = report.failures().next() {
            return Err(SuggestError::Generated {
                what: "tests",
                why: format!("{}: expected {}, got {}", f.name, f.expected, f.got),
            });
        };
    }

    for (agent, plan) in &planned {
        let sec = sections.entry(agent.clone()).or_default();
        // Keep the summary readable for pathways with many destinations.
        let mut dests: Vec<&str> = plan
            .destinations
            .iter()
            .take(SUMMARY_DESTINATIONS)
            .map(|d| d.text.as_str())
            .collect();
        let more = plan.destinations.len().saturating_sub(SUMMARY_DESTINATIONS);
        let more_text = format!("... {more} more");
        if more > 0 {
            dests.push(&more_text);
        }
        let mut line = format!(
            "pathway {:?}: {} [{}]",
            plan.name,
            dests.join(", "),
            plan.methods.join(", ")
        );
        if let Some(w) = &plan.when {
            let _ = write!(line, " when {w}");
        }
        let _ = write!(line, " ({})", requests(plan.count));
        sec.added.push(line);
    }
    for (id, name) in &new_agent_names {
        sections
            .entry(name.clone())
            .or_default()
            .notes
            .push(format!("new agent entry for {id}"));
    }
    let mode = suggested
        .as_ref()
        .map(|p| p.mode())
        .or(opts.mode)
        .unwrap_or(Mode::Audit);
    let audit_only: u64 = stats.iter().map(|s| s.audit_only).sum();
    let mut summary = String::new();
    for (agent, sec) in &sections {
        let _ = writeln!(summary, "agent {agent}:");
        for l in &sec.added {
            let _ = writeln!(summary, "  + {l}");
        }
        if sec.already > 0 {
            let _ = writeln!(
                summary,
                "  = {} observed destination/method pairs already allowed",
                sec.already
            );
        }
        for l in &sec.denied {
            let _ = writeln!(summary, "  - stays denied: {l}");
        }
        for l in &sec.notes {
            let _ = writeln!(summary, "  ! {l}");
        }
    }
    if audit_only > 0 {
        let _ = writeln!(
            summary,
            "{audit_only} requests were let through only because of mode: audit"
        );
    }
    if unchanged {
        let _ = writeln!(summary, "no new pathways: the policy is unchanged");
    } else {
        let _ = writeln!(
            summary,
            "{added_pathways} pathways added ({added_agents} new agents), mode {mode}"
        );
    }
    Ok(Suggestion {
        policy_yaml,
        tests_yaml: tests,
        summary,
        added_pathways,
        added_agents,
        test_cases: cases,
        unchanged,
        mode,
    })
}

#[derive(Debug, Default)]
struct Section {
    added: Vec<String>,
    already: usize,
    denied: Vec<String>,
    notes: Vec<String>,
}

fn render_pathway(out: &mut String, p: &PathwayPlan) {
    let _ = writeln!(
        out,
        "# suggested: {}, first seen {}, last seen {}",
        requests(p.count),
        fmt_ts(p.first),
        fmt_ts(p.last)
    );
    let _ = writeln!(out, "- name: {}", q(&p.name));
    let _ = writeln!(out, "  destinations:");
    for d in &p.destinations {
        let _ = writeln!(out, "    - {}  # {}", q(&d.text), d.comment);
    }
    let methods: Vec<String> = p.methods.iter().map(|m| q(m)).collect();
    let _ = writeln!(out, "  methods: [{}]", methods.join(", "));
    if let Some(w) = &p.when {
        // Single-quoted YAML: the CEL holds no `'` (built from validated text).
        let _ = writeln!(out, "  when: '{}'", w.replace('\'', "''"));
    }
    if p.upstream_tls {
        let _ = writeln!(
            out,
            "  upstream:  # the gateway speaks TLS to the destination; add inject_headers as needed"
        );
        let _ = writeln!(out, "    tls: true");
    }
}

fn new_policy_text(
    opts: &Options,
    stats: &[Stats],
    ids: &[SpiffeId],
    status: &[Status],
    agents_block: &str,
) -> String {
    let tds: BTreeSet<&str> = ids
        .iter()
        .zip(status)
        .filter(|(_, st)| **st == Status::Candidate)
        .map(|(id, _)| id.trust_domain())
        .collect();
    let first = stats.iter().map(|s| s.first).min().unwrap_or(0);
    let last = stats.iter().map(|s| s.last).max().unwrap_or(0);
    let total: u64 = stats.iter().map(|s| s.count).sum();
    let mode = opts.mode.unwrap_or(Mode::Audit);
    let mut t = String::new();
    let _ = writeln!(t, "# yaml-language-server: $schema={}", opts.policy_schema);
    let _ = writeln!(
        t,
        "# Suggested by `egress-gateway policy suggest` from {total} audit records, {} to {}.",
        fmt_ts(first),
        fmt_ts(last)
    );
    let _ = writeln!(
        t,
        "# Review every pathway before switching to mode: enforce."
    );
    let _ = writeln!(t, "version: 1");
    let list: Vec<String> = tds.iter().map(|t| q(t)).collect();
    if list.is_empty() {
        // Nothing to allow; keep the file loadable with the observed domains.
        let all: BTreeSet<&str> = ids.iter().map(|i| i.trust_domain()).collect();
        let all: Vec<String> = all.iter().map(|t| q(t)).collect();
        let _ = writeln!(t, "trust_domains: [{}]", all.join(", "));
    } else {
        let _ = writeln!(t, "trust_domains: [{}]", list.join(", "));
    }
    let _ = writeln!(t, "mode: {mode}");
    if agents_block.is_empty() {
        let _ = writeln!(t, "agents: []");
    } else {
        let _ = writeln!(t, "agents:");
        for l in agents_block.lines() {
            let _ = writeln!(t, "  {l}");
        }
    }
    t
}

/// The suggested policy keeps every current agent and pathway in place and
/// adds exactly the planned pathways.
fn verify_structure(
    suggested: &Policy,
    current: Option<&Policy>,
    planned: &[(String, PathwayPlan)],
) -> Result<(), SuggestError> {
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(c) = current {
        for a in c.agents() {
            want.insert(
                a.name.to_owned(),
                a.pathways.iter().map(|p| p.name.clone()).collect(),
            );
        }
    }
    for (agent, plan) in planned {
        want.entry(agent.clone())
            .or_default()
            .push(plan.name.clone());
    }
    let got: BTreeMap<String, Vec<String>> = suggested
        .agents()
        .map(|a| {
            (
                a.name.to_owned(),
                a.pathways.iter().map(|p| p.name.clone()).collect(),
            )
        })
        .collect();
    if got != want {
        return Err(SuggestError::Generated {
            what: "policy",
            why: format!("expected agents and pathways {want:?}, got {got:?}"),
        });
    }
    Ok(())
}
