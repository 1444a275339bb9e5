//! The compiled policy: immutable after load, shared across requests.

use std::fmt;
use std::sync::Arc;

use crate::cel_env::{CelExpr, VarSet};
use crate::decision::Mode;
use crate::id_pattern::IdPattern;
use crate::index::{AgentIndex, DestIndex};
use crate::pathway::Pathway;

pub struct Policy {
    pub(crate) origin: String,
    pub(crate) trust_domains: Vec<String>,
    pub(crate) mode: Mode,
    pub(crate) rules: Vec<Rule>,
    pub(crate) agents: Vec<Agent>,
    pub(crate) agent_index: AgentIndex,
    pub(crate) cel_root: cel::Context<'static, 'static>,
    /// Variables any expression uses; only these are built per evaluation.
    pub(crate) cel_vars: VarSet,
    /// Some pathway has `mcp`: only then is a request's body looked at for messages.
    pub(crate) has_mcp: bool,
    /// Some pathway with `mcp` has a `when`, which may read a message's arguments.
    pub(crate) mcp_conditions: bool,
}

#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) when: CelExpr,
    pub(crate) dry_run: bool,
}

#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) name: String,
    pub(crate) id: IdPattern,
    pub(crate) pathways: Vec<Arc<Pathway>>,
    pub(crate) dests: DestIndex,
}

/// A deny rule as seen from outside.
#[derive(Debug, Clone, Copy)]
pub struct RuleInfo<'a> {
    pub name: &'a str,
    pub when: &'a str,
    pub dry_run: bool,
}

/// An agent entry as seen from outside.
#[derive(Debug, Clone, Copy)]
pub struct AgentInfo<'a> {
    pub name: &'a str,
    pub id: &'a IdPattern,
    pub pathways: &'a [Arc<Pathway>],
}

impl Policy {
    /// The file name used in messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn trust_domains(&self) -> &[String] {
        &self.trust_domains
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether any expression reads `request`: when none does, the caller need not
    /// build the request's attributes (its header view above all).
    pub fn reads_request(&self) -> bool {
        self.cel_vars.request
    }

    /// Agent entry names in file order (may repeat only if the file does, which load rejects).
    pub fn agent_names(&self) -> impl Iterator<Item = &str> {
        self.agents.iter().map(|a| a.name.as_str())
    }

    pub fn rules(&self) -> impl Iterator<Item = RuleInfo<'_>> {
        self.rules.iter().map(|r| RuleInfo {
            name: &r.name,
            when: r.when.source(),
            dry_run: r.dry_run,
        })
    }

    pub fn agents(&self) -> impl Iterator<Item = AgentInfo<'_>> {
        self.agents.iter().map(|a| AgentInfo {
            name: &a.name,
            id: &a.id,
            pathways: &a.pathways,
        })
    }

    /// All pathways, in file order.
    pub fn pathways(&self) -> impl Iterator<Item = &Arc<Pathway>> {
        self.agents.iter().flat_map(|a| a.pathways.iter())
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("origin", &self.origin)
            .field("trust_domains", &self.trust_domains)
            .field("mode", &self.mode)
            .field("rules", &self.rules.len())
            .field("agents", &self.agents.len())
            .finish_non_exhaustive()
    }
}
