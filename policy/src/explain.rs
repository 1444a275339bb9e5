//! `policy explain`: the decision plus every rule and pathway considered.

use std::fmt;

use crate::cel_env::CelResult;
use crate::decision::Decision;
use crate::evaluate::{PathwayOutcome, Tracer};
use crate::mcp::McpCall;
use crate::pathway::Pathway;
use crate::policy::{Agent, Policy, Rule};
use crate::request::{Request, RequestKind};

#[derive(Debug, Clone)]
pub struct Explanation {
    pub request: String,
    pub source: String,
    pub decision: Decision,
    /// The JSON-RPC message decided, for requests to MCP servers.
    pub mcp: Option<McpCall>,
    pub trust_domain_ok: bool,
    /// Matching agent entries: (name, id as written).
    pub agents: Vec<(String, String)>,
    pub rules: Vec<RuleStep>,
    pub pathways: Vec<PathwayStep>,
}

#[derive(Debug, Clone)]
pub struct RuleStep {
    pub name: String,
    pub dry_run: bool,
    pub when: String,
    /// `Ok(matched)` or the CEL error.
    pub result: Result<bool, String>,
}

#[derive(Debug, Clone)]
pub struct PathwayStep {
    pub agent: String,
    pub pathway: String,
    pub destinations: Vec<String>,
    pub outcome: PathwayOutcome,
    /// For an MCP message this pathway allowed: the `mcp` list and entry that allowed
    /// its target (`("tools", "read_*")`).
    pub mcp_entry: Option<(&'static str, String)>,
}

#[derive(Default)]
struct Recorder {
    mcp: Option<McpCall>,
    trust_domain_ok: bool,
    agents: Vec<(String, String)>,
    rules: Vec<RuleStep>,
    pathways: Vec<PathwayStep>,
}

impl Tracer for Recorder {
    const ACTIVE: bool = true;

    fn agents(&mut self, matched: &[&Agent], trust_domain_ok: bool) {
        self.trust_domain_ok = trust_domain_ok;
        self.agents = matched
            .iter()
            .map(|a| (a.name.clone(), a.id.to_string()))
            .collect();
    }

    fn rule(&mut self, rule: &Rule, result: &CelResult) {
        self.rules.push(RuleStep {
            name: rule.name.clone(),
            dry_run: rule.dry_run,
            when: rule.when.source().to_owned(),
            result: result.clone(),
        });
    }

    fn pathway(&mut self, p: &Pathway, outcome: &PathwayOutcome) {
        self.pathways.push(PathwayStep {
            agent: p.agent.clone(),
            pathway: p.name.clone(),
            destinations: p.destinations.iter().map(|d| d.to_string()).collect(),
            outcome: outcome.clone(),
            mcp_entry: match (outcome, &p.mcp, &self.mcp) {
                (PathwayOutcome::Allows, Some(rules), Some(call)) => rules
                    .entry_for(call)
                    .map(|(list, entry)| (list, entry.to_owned())),
                _ => None,
            },
        });
    }
}

impl Policy {
    /// Evaluates `req` and records every rule and pathway considered.
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        self.explain_mcp(req, None)
    }

    /// Like [`Policy::explain`], for one JSON-RPC message of a request to an MCP
    /// server (see [`Policy::evaluate_mcp`]).
    pub fn explain_mcp(&self, req: &Request<'_>, call: Option<&McpCall>) -> Explanation {
        let mut rec = Recorder {
            mcp: call.cloned(),
            ..Recorder::default()
        };
        let decision = self.run(req, call, &mut rec);
        let target = match req.kind {
            RequestKind::Connect => format!("CONNECT {}:{}", bracket(req.host), req.port),
            RequestKind::Http => {
                let q = if req.query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", req.query)
                };
                format!(
                    "{} http://{}:{}{}{q}",
                    req.method.to_ascii_uppercase(),
                    bracket(req.host),
                    req.port,
                    req.path
                )
            }
        };
        Explanation {
            request: target,
            source: req.source.to_string(),
            decision,
            mcp: rec.mcp,
            trust_domain_ok: rec.trust_domain_ok,
            agents: rec.agents,
            rules: rec.rules,
            pathways: rec.pathways,
        }
    }
}

fn bracket(h: &str) -> String {
    if h.contains(':') {
        format!("[{h}]")
    } else {
        h.to_owned()
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        writeln!(f, "request: {} from {}", self.request, self.source)?;
        if let Some(call) = &self.mcp {
            let method = if call.method.is_empty() {
                "(a response)"
            } else {
                call.method.as_str()
            };
            write!(f, "mcp: {method}")?;
            if let Some(name) = &call.name {
                write!(f, " {name:?}")?;
            }
            if !call.arguments.is_empty() {
                write!(
                    f,
                    " arguments {}",
                    serde_json::Value::Object(call.arguments.clone())
                )?;
            }
            writeln!(f)?;
        }
        let verdict = if d.allowed { "ALLOW" } else { "DENY" };
        let enforced = if d.allowed || d.enforced {
            ""
        } else {
            " (audit mode: not enforced)"
        };
        write!(f, "decision: {verdict}{enforced}: {}", d.reason)?;
        if let Some(p) = &d.pathway {
            write!(f, " [agent {}, pathway {}]", p.agent, p.name)?;
        } else if let Some(a) = &d.agent {
            write!(f, " [agent {a}]")?;
        }
        if let Some(r) = &d.rule {
            write!(f, " [rule {r}]")?;
        }
        writeln!(f)?;
        if !d.dry_run_rules.is_empty() {
            writeln!(
                f,
                "dry-run rules that would deny: {}",
                d.dry_run_rules.join(", ")
            )?;
        }

        writeln!(f, "deny rules:")?;
        if self.rules.is_empty() {
            writeln!(f, "  (none evaluated)")?;
        }
        for r in &self.rules {
            let dry = if r.dry_run { " (dry run)" } else { "" };
            let what = match &r.result {
                Ok(true) => "MATCH".to_owned(),
                Ok(false) => "no match".to_owned(),
                Err(e) => format!("ERROR, counts as a match: {e}"),
            };
            writeln!(f, "  {}{dry}: {what}    when: {}", r.name, r.when)?;
        }

        if !self.trust_domain_ok {
            writeln!(f, "agents: none (trust domain not in trust_domains)")?;
        } else if self.agents.is_empty() {
            writeln!(f, "agents: no agent entry matches {}", self.source)?;
        } else {
            writeln!(f, "agents matching the source, in file order:")?;
            for (name, id) in &self.agents {
                writeln!(f, "  {name}    id: {id}")?;
            }
        }

        if !self.pathways.is_empty() {
            writeln!(f, "pathways considered:")?;
        }
        for p in &self.pathways {
            let why = match &p.outcome {
                PathwayOutcome::Allows => match &p.mcp_entry {
                    Some((list, entry)) => format!("ALLOWS (mcp.{list} entry {entry:?})"),
                    None => "ALLOWS".to_owned(),
                },
                PathwayOutcome::DestinationMismatch => {
                    format!("destination not listed ({})", p.destinations.join(", "))
                }
                PathwayOutcome::MethodNotAllowed => "method not allowed".to_owned(),
                PathwayOutcome::ModelNotAllowed { model: Some(m) } => {
                    format!("model {m:?} not allowed")
                }
                PathwayOutcome::ModelNotAllowed { model: None } => {
                    "lists models but the request names none (or is a tunnel)".to_owned()
                }
                PathwayOutcome::McpNotAllowed { denial } => format!("mcp: {denial}"),
                PathwayOutcome::ConditionFalse => "`when` is false".to_owned(),
                PathwayOutcome::ConditionError { error } => {
                    format!("`when` failed, counts as no match: {error}")
                }
            };
            writeln!(f, "  {}/{}: {why}", p.agent, p.pathway)?;
        }
        Ok(())
    }
}
