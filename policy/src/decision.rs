//! The typed outcome of an evaluation.

use std::fmt;
use std::sync::Arc;

use crate::mcp::McpDenial;
use crate::pathway::Pathway;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Enforce,
    /// Verdicts are computed and logged; denials are not enforced.
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a decision came out the way it did. For denials by pathway checks this
/// is the check that got furthest among the candidate pathways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Allowed,
    /// A tunnel to a destination an L7 pathway names: allowed for TLS interception,
    /// each request inside is decided on its own.
    Intercepted,
    /// A deny rule matched.
    DeniedByRule,
    /// A deny rule's CEL failed to evaluate; fail closed (`policy explain` shows the error).
    DenyRuleError,
    /// The peer's trust domain is not in `trust_domains`.
    UntrustedTrustDomain,
    /// No agent entry's `id` matches the peer.
    NoMatchingAgent,
    /// No pathway of the matching agents lists this destination.
    NoMatchingPathway,
    /// A pathway lists the destination but not the method (tunnels are CONNECT).
    MethodNotAllowed,
    /// A pathway lists the destination and method but not the model (`None`:
    /// the request named no model).
    ModelNotAllowed {
        model: Option<String>,
    },
    /// A pathway with `mcp` refused the request's JSON-RPC message.
    McpNotAllowed {
        denial: McpDenial,
    },
    /// A pathway's `when` evaluated to false.
    ConditionNotMet,
    /// A pathway's `when` failed to evaluate; a non-match.
    ConditionError {
        error: String,
    },
}

impl Reason {
    /// Stable snake_case code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::Intercepted => "intercepted",
            Reason::DeniedByRule => "denied_by_rule",
            Reason::DenyRuleError => "deny_rule_error",
            Reason::UntrustedTrustDomain => "untrusted_trust_domain",
            Reason::NoMatchingAgent => "no_matching_agent",
            Reason::NoMatchingPathway => "no_matching_pathway",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::ModelNotAllowed { .. } => "model_not_allowed",
            Reason::McpNotAllowed { denial } => denial.code(),
            Reason::ConditionNotMet => "condition_not_met",
            Reason::ConditionError { .. } => "condition_error",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Allowed => f.write_str("allowed by pathway"),
            Reason::Intercepted => f.write_str(
                "allowed for TLS interception: each request inside is decided on its own",
            ),
            Reason::DeniedByRule => f.write_str("denied by rule"),
            Reason::DenyRuleError => f.write_str("deny rule could not be evaluated (fail closed)"),
            Reason::UntrustedTrustDomain => f.write_str("trust domain not accepted"),
            Reason::NoMatchingAgent => f.write_str("no agent entry matches the source identity"),
            Reason::NoMatchingPathway => f.write_str("no pathway allows this destination"),
            Reason::MethodNotAllowed => f.write_str("method not allowed on this pathway"),
            Reason::ModelNotAllowed { model: Some(m) } => write!(f, "model {m:?} not allowed"),
            Reason::ModelNotAllowed { model: None } => f.write_str("request names no model"),
            Reason::McpNotAllowed { denial } => denial.fmt(f),
            Reason::ConditionNotMet => f.write_str("pathway condition not met"),
            Reason::ConditionError { error } => {
                write!(f, "pathway condition could not be evaluated: {error}")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Decision {
    /// The policy's verdict.
    pub allowed: bool,
    /// False for a denial in `mode: audit`.
    pub enforced: bool,
    /// The agent entry that allowed, or the first matching agent entry for denials.
    pub agent: Option<String>,
    /// The allowing pathway. In audit mode a denial by rule still carries the
    /// pathway that would have allowed, so the gateway can forward the request.
    pub pathway: Option<Arc<Pathway>>,
    /// The deny rule that matched, or, when only dry-run rules matched, the first of those.
    pub rule: Option<String>,
    pub reason: Reason,
    /// Dry-run deny rules that matched ("would deny").
    pub dry_run_rules: Vec<String>,
}

impl Decision {
    /// Whether the gateway lets the request through.
    pub fn permits(&self) -> bool {
        self.allowed || !self.enforced
    }

    pub fn pathway_name(&self) -> Option<&str> {
        self.pathway.as_deref().map(|p| p.name.as_str())
    }
}
