//! Evaluation, fail closed, in the documented order:
//! deny rules → pathways of every matching agent entry in file order → deny.

use std::borrow::Cow;
use std::sync::Arc;

use crate::cel_env::{Activation, CelResult};
use crate::decision::{Decision, Mode, Reason};
use crate::host::normalize_host;
use crate::mcp::{McpCall, McpDenial};
use crate::pathway::Pathway;
use crate::policy::{Agent, Policy, Rule};
use crate::request::{Request, RequestKind};

/// Why one pathway did or did not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathwayOutcome {
    Allows,
    DestinationMismatch,
    MethodNotAllowed,
    ModelNotAllowed { model: Option<String> },
    McpNotAllowed { denial: McpDenial },
    ConditionFalse,
    ConditionError { error: String },
}

impl PathwayOutcome {
    /// How far the request got; the furthest failure becomes the denial reason.
    fn rank(&self) -> u8 {
        match self {
            PathwayOutcome::DestinationMismatch => 0,
            PathwayOutcome::MethodNotAllowed => 1,
            PathwayOutcome::ModelNotAllowed { .. } => 2,
            PathwayOutcome::McpNotAllowed { .. } => 3,
            PathwayOutcome::ConditionFalse | PathwayOutcome::ConditionError { .. } => 4,
            PathwayOutcome::Allows => 5,
        }
    }

    fn reason(&self) -> Reason {
        match self {
            PathwayOutcome::Allows => Reason::Allowed,
            PathwayOutcome::DestinationMismatch => Reason::NoMatchingPathway,
            PathwayOutcome::MethodNotAllowed => Reason::MethodNotAllowed,
            PathwayOutcome::ModelNotAllowed { model } => Reason::ModelNotAllowed {
                model: model.clone(),
            },
            PathwayOutcome::McpNotAllowed { denial } => Reason::McpNotAllowed {
                denial: denial.clone(),
            },
            PathwayOutcome::ConditionFalse => Reason::ConditionNotMet,
            PathwayOutcome::ConditionError { error } => Reason::ConditionError {
                error: error.clone(),
            },
        }
    }
}

/// Hooks for `explain`. The no-op tracer compiles away, so `evaluate` pays nothing.
pub(crate) trait Tracer {
    /// When active, every pathway of a matching agent is checked in file order
    /// (not only the destination index's candidates), so `explain` can say why
    /// each one failed. The outcome is the same either way.
    const ACTIVE: bool;
    fn agents(&mut self, _matched: &[&Agent], _trust_domain_ok: bool) {}
    fn rule(&mut self, _rule: &Rule, _result: &CelResult) {}
    fn pathway(&mut self, _pathway: &Pathway, _outcome: &PathwayOutcome) {}
}

pub(crate) struct NoTrace;

impl Tracer for NoTrace {
    const ACTIVE: bool = false;
}

impl Policy {
    /// Decides one connection or request. Pure: no I/O, no clocks (the time is
    /// `req.now`).
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        self.run(req, None, &mut NoTrace)
    }

    /// Decides one JSON-RPC message of a request to an MCP server: `call` is the
    /// message as read from the body, `None` when the body held none. Pathways with
    /// `mcp` check it (and their `when` sees it as `request.mcp`); other pathways
    /// decide as [`Policy::evaluate`] does.
    pub fn evaluate_mcp(&self, req: &Request<'_>, call: Option<&McpCall>) -> Decision {
        self.run(req, call, &mut NoTrace)
    }

    pub(crate) fn run<T: Tracer>(
        &self,
        req: &Request<'_>,
        mcp: Option<&McpCall>,
        t: &mut T,
    ) -> Decision {
        let method = match req.kind {
            RequestKind::Connect => "CONNECT",
            RequestKind::Http => req.method,
        };
        let host = normalize_host(req.host);
        // CEL sees the normalized host, or the raw one lower-cased if it is not a valid name.
        let cel_host: Cow<'_, str> = match &host {
            Some(h) => Cow::Borrowed(h.as_ref()),
            None => Cow::Owned(req.host.to_ascii_lowercase()),
        };
        let act = Activation::new(&self.cel_root, req, &cel_host, self.cel_vars);

        let td_ok = self
            .trust_domains
            .iter()
            .any(|t| t == req.source.trust_domain());
        let mut matched: Vec<&Agent> = Vec::new();
        if td_ok {
            let mut idx = Vec::new();
            self.agent_index.candidates(req.source, &mut idx);
            matched.extend(
                idx.into_iter()
                    .map(|i| &self.agents[i])
                    .filter(|a| a.id.matches(req.source)),
            );
        }
        t.agents(&matched, td_ok);
        let first_agent = matched.first().map(|a| a.name.clone());

        let mut dry_run_rules = Vec::new();
        for rule in &self.rules {
            let result = act.eval(&rule.when, None, None);
            t.rule(rule, &result);
            // fail closed: an error in a deny rule counts as a match
            let reason = match result {
                Ok(false) => continue,
                Ok(true) => Reason::DeniedByRule,
                Err(_) => Reason::DenyRuleError,
            };
            if rule.dry_run {
                dry_run_rules.push(rule.name.clone());
                continue;
            }
            // In audit mode the request goes through anyway; hand the gateway
            // the pathway that would have allowed it so it applies its settings.
            let (agent, pathway) = match self.mode {
                Mode::Audit => {
                    match self.find_pathway(&matched, host.as_deref(), method, req, mcp, &act, t) {
                        Ok((a, p)) => (Some(a.name.clone()), Some(p)),
                        Err(_) => (first_agent, None),
                    }
                }
                Mode::Enforce => (first_agent, None),
            };
            return Decision {
                allowed: false,
                enforced: self.mode == Mode::Enforce,
                agent,
                pathway,
                rule: Some(rule.name.clone()),
                reason,
                dry_run_rules,
            };
        }

        let outcome = if !td_ok {
            Err(Reason::UntrustedTrustDomain)
        } else if matched.is_empty() {
            Err(Reason::NoMatchingAgent)
        } else {
            self.find_pathway(&matched, host.as_deref(), method, req, mcp, &act, t)
        };
        let rule = dry_run_rules.first().cloned();
        match outcome {
            Ok((agent, pathway)) => Decision {
                allowed: true,
                enforced: true,
                agent: Some(agent.name.clone()),
                reason: if req.kind == RequestKind::Connect && pathway.is_l7() {
                    Reason::Intercepted
                } else {
                    Reason::Allowed
                },
                pathway: Some(pathway),
                rule,
                dry_run_rules,
            },
            Err(reason) => Decision {
                allowed: false,
                enforced: self.mode == Mode::Enforce,
                agent: first_agent,
                pathway: None,
                rule,
                reason,
                dry_run_rules,
            },
        }
    }

    /// The first pathway, over the matching agents in file order, that allows.
    #[allow(clippy::too_many_arguments)]
    fn find_pathway<'p, T: Tracer>(
        &'p self,
        matched: &[&'p Agent],
        host: Option<&str>,
        method: &str,
        req: &Request<'_>,
        mcp: Option<&McpCall>,
        act: &Activation<'_>,
        t: &mut T,
    ) -> Result<(&'p Agent, Arc<Pathway>), Reason> {
        let mut best = PathwayOutcome::DestinationMismatch;
        let mut cands = Vec::new();
        if req.kind == RequestKind::Connect {
            // A destination an L7 pathway names is intercepted even where an L4
            // pathway (say `*.com:443`) would tunnel it: its credentials, models and
            // budgets must not be skippable by asking for a tunnel.
            if let Some(found) = Self::l7_destination(matched, host, req, &mut cands) {
                return Ok(found);
            }
        }
        for agent in matched {
            cands.clear();
            if T::ACTIVE {
                cands.extend(0..agent.pathways.len());
            } else if let Some(h) = host {
                agent.dests.candidates(h, req.port, &mut cands);
            }
            for &i in &cands {
                let p = &agent.pathways[i];
                let outcome = check_pathway(p, host, method, req, mcp, act);
                t.pathway(p, &outcome);
                if outcome == PathwayOutcome::Allows {
                    return Ok((agent, Arc::clone(p)));
                }
                if outcome.rank() > best.rank() {
                    best = outcome;
                }
            }
        }
        Err(best.reason())
    }

    /// The first L7 pathway, over the matching agents in file order, whose
    /// destinations cover the CONNECT target.
    fn l7_destination<'p>(
        matched: &[&'p Agent],
        host: Option<&str>,
        req: &Request<'_>,
        cands: &mut Vec<usize>,
    ) -> Option<(&'p Agent, Arc<Pathway>)> {
        let h = host?;
        for agent in matched {
            cands.clear();
            agent.dests.candidates(h, req.port, cands);
            for &i in cands.iter() {
                let p = &agent.pathways[i];
                if p.is_l7() && p.destinations.iter().any(|d| d.matches(h, req.port)) {
                    return Some((agent, Arc::clone(p)));
                }
            }
        }
        None
    }
}

fn check_pathway(
    p: &Pathway,
    host: Option<&str>,
    method: &str,
    req: &Request<'_>,
    mcp: Option<&McpCall>,
    act: &Activation<'_>,
) -> PathwayOutcome {
    let dest_ok = host.is_some_and(|h| p.destinations.iter().any(|d| d.matches(h, req.port)));
    if !dest_ok {
        return PathwayOutcome::DestinationMismatch;
    }
    // A tunnel to an L7 pathway's destination is intercepted: the gateway terminates
    // its TLS and decides every request inside on its own (method, path, model,
    // `when`), so the tunnel itself needs only the destination.
    if req.kind == RequestKind::Connect && p.is_l7() {
        return PathwayOutcome::Allows;
    }
    if !p.allows_method(method) {
        return PathwayOutcome::MethodNotAllowed;
    }
    // `models` applies to requests the gateway can read (L7 only).
    let model = match &p.models {
        None => None,
        Some(_) => {
            if req.kind != RequestKind::Http || !p.allows_model(req.llm_model) {
                return PathwayOutcome::ModelNotAllowed {
                    model: req.llm_model.map(str::to_owned),
                };
            }
            req.llm_model
        }
    };
    // `mcp` applies to the JSON-RPC message the gateway read from the body; `when`
    // sees it as `request.mcp` (an empty call for requests that carry none).
    let no_call = McpCall::default();
    let mcp_view = match &p.mcp {
        None => None,
        Some(rules) => {
            if let Err(denial) = rules.check(method, mcp) {
                return PathwayOutcome::McpNotAllowed { denial };
            }
            Some(mcp.unwrap_or(&no_call))
        }
    };
    match &p.when {
        None => PathwayOutcome::Allows,
        Some(w) => match act.eval(w, model, mcp_view) {
            Ok(true) => PathwayOutcome::Allows,
            Ok(false) => PathwayOutcome::ConditionFalse,
            Err(error) => PathwayOutcome::ConditionError { error },
        },
    }
}
