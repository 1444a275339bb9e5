//! Strict loading: parse the YAML, validate every value, compile CEL once and
//! build the indexes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::cel_env::{root_context, CelExpr, VarSet};
use crate::decision::Mode;
use crate::error::PolicyError;
use crate::host::Destination;
use crate::id_pattern::IdPattern;
use crate::index::{AgentIndex, DestIndex};
use crate::mcp::{McpRules, NamePattern};
use crate::model::{Located, McpSpec, ModeSpec, PathwaySpec, PolicyFile, UpstreamSpec};
use crate::pathway::{Limits, Pathway, SecretRef, Timeouts, Upstream};
use crate::policy::{Agent, Policy, Rule};
use crate::spiffe_id::{is_trust_domain_char, SpiffeId};

impl Policy {
    /// Loads a policy from YAML text; `origin` names the file in messages.
    pub fn from_yaml_str(yaml: &str, origin: &str) -> Result<Policy, PolicyError> {
        let file = parse_yaml::<PolicyFile>(yaml, origin)?;
        compile(file, origin)
    }

    pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Policy::from_yaml_str(&text, &path.display().to_string())
    }
}

fn yaml_options() -> serde_saphyr::Options {
    // The default node budget (250k) is below a 10,000-agent policy; keep the
    // other anti-bomb limits (aliases, depth) at their defaults.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 20_000_000;
    budget.max_events = 40_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Strict YAML → `T` with the field path and position in the error.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    yaml: &str,
    origin: &str,
) -> Result<T, PolicyError> {
    // Fast path without path tracking; parse again only to explain a failure.
    let first = serde_saphyr::with_deserializer_from_str_with_options(yaml, yaml_options(), |de| {
        T::deserialize(de)
    });
    let err = match first {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let mut field = String::new();
    let res = serde_saphyr::with_deserializer_from_str_with_options(yaml, yaml_options(), |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    let e = match res {
        Ok(_) => err,
        Err(e) => e,
    };
    let loc = e.location();
    let field = if field.is_empty() || field == "." {
        String::new()
    } else {
        format!("{field}: ")
    };
    Err(PolicyError::Yaml {
        origin: origin.into(),
        line: loc.map(|l| l.line()),
        column: loc.map(|l| l.column()),
        field,
        message: first_line(&e.to_string()),
    })
}

/// serde-saphyr's Display adds a source snippet; the position is reported separately.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    // drop a leading "line N column M: "; we print the position ourselves
    match line.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, rest)) if pos.contains("column") => rest.to_owned(),
        _ => line.to_owned(),
    }
}

struct Errors<'a> {
    origin: &'a str,
    list: Vec<PolicyError>,
}

impl Errors<'_> {
    fn push(&mut self, line: u64, context: impl Into<String>, message: impl Into<String>) {
        self.list.push(PolicyError::Invalid {
            origin: self.origin.into(),
            line: (line > 0).then_some(line),
            context: context.into(),
            message: message.into(),
        });
    }
}

/// Names go into metric labels, headers and log lines: keep them plain.
fn check_name(errs: &mut Errors<'_>, what: &str, ctx: &str, name: &Located<String>) {
    let n = &name.value;
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        errs.push(
            name.line,
            ctx,
            format!("{what} name {n:?} must be 1-63 characters of A-Z a-z 0-9 - _ . starting with a letter or digit"),
        );
    }
}

fn compile(file: PolicyFile, origin: &str) -> Result<Policy, PolicyError> {
    let mut errs = Errors {
        origin,
        list: Vec::new(),
    };
    if file.version.value != 1 {
        errs.push(
            file.version.line,
            "version",
            format!("unsupported version {} (expected 1)", file.version.value),
        );
    }

    let mut trust_domains = Vec::new();
    if file.trust_domains.is_empty() {
        errs.push(0, "trust_domains", "at least one trust domain is required");
    }
    for td in &file.trust_domains {
        let v = &td.value;
        if v.is_empty() || !v.chars().all(is_trust_domain_char) {
            errs.push(
                td.line,
                "trust_domains",
                format!("invalid trust domain {v:?} (lower-case a-z 0-9 . - _, no scheme or port)"),
            );
        } else if trust_domains.contains(v) {
            errs.push(
                td.line,
                "trust_domains",
                format!("duplicate trust domain {v:?}"),
            );
        } else {
            trust_domains.push(v.clone());
        }
    }

    let mut rules = Vec::new();
    let mut rule_names = HashSet::new();
    for r in file.rules {
        let ctx = format!("rule {:?}", r.name.value);
        check_name(&mut errs, "rule", &ctx, &r.name);
        if !rule_names.insert(r.name.value.clone()) {
            errs.push(
                r.name.line,
                &ctx,
                format!("duplicate rule name {:?}", r.name.value),
            );
        }
        match CelExpr::compile(&r.when.value) {
            Ok(when) if when.uses_mcp() => errs.push(
                r.when.line,
                &ctx,
                "`when` reads request.mcp, which only `when` of pathways with `mcp` can see",
            ),
            Ok(when) => rules.push(Rule {
                name: r.name.value,
                when,
                dry_run: r.dry_run,
            }),
            Err(e) => errs.push(r.when.line, &ctx, format!("`when` {:?}: {e}", r.when.value)),
        }
    }

    let mut agents = Vec::new();
    let mut agent_index = AgentIndex::default();
    let mut agent_names = HashSet::new();
    for a in file.agents {
        let ctx = format!("agent {:?}", a.name.value);
        check_name(&mut errs, "agent", &ctx, &a.name);
        if !agent_names.insert(a.name.value.clone()) {
            errs.push(
                a.name.line,
                &ctx,
                format!("duplicate agent name {:?}", a.name.value),
            );
        }
        let id = match IdPattern::parse(&a.id.value) {
            Ok(id) => {
                if !trust_domains.iter().any(|t| t == id.trust_domain()) {
                    errs.push(
                        a.id.line,
                        &ctx,
                        format!(
                            "id {:?}: trust domain {:?} is not in trust_domains",
                            a.id.value,
                            id.trust_domain()
                        ),
                    );
                }
                Some(id)
            }
            Err(e) => {
                errs.push(a.id.line, &ctx, format!("invalid id {:?}: {e}", a.id.value));
                None
            }
        };
        let mut pathways = Vec::new();
        let mut dests = DestIndex::default();
        let mut pathway_names = HashSet::new();
        for p in a.pathways {
            let pctx = format!("{ctx}, pathway {:?}", p.name.value);
            check_name(&mut errs, "pathway", &pctx, &p.name);
            if !pathway_names.insert(p.name.value.clone()) {
                errs.push(
                    p.name.line,
                    &pctx,
                    format!("duplicate pathway name {:?}", p.name.value),
                );
            }
            if let Some(pw) = compile_pathway(&mut errs, &pctx, &a.name.value, p) {
                let idx = pathways.len();
                for d in &pw.destinations {
                    dests.insert(idx, d);
                }
                pathways.push(Arc::new(pw));
            }
        }
        if let Some(id) = id {
            agent_index.insert(agents.len(), &id);
            agents.push(Agent {
                name: a.name.value,
                id,
                pathways,
                dests,
            });
        }
    }

    let mut cel_vars = VarSet::default();
    for r in &rules {
        cel_vars.add(&r.when);
    }
    for p in agents.iter().flat_map(|a| a.pathways.iter()) {
        if let Some(w) = &p.when {
            cel_vars.add(w);
        }
    }
    let mcp_pathways = || {
        agents
            .iter()
            .flat_map(|a| a.pathways.iter())
            .filter(|p| p.mcp.is_some())
    };
    let has_mcp = mcp_pathways().next().is_some();
    let mcp_conditions = mcp_pathways().any(|p| p.when.is_some());
    match errs.list.len() {
        0 => Ok(Policy {
            origin: origin.into(),
            trust_domains,
            mode: match file.mode {
                ModeSpec::Enforce => Mode::Enforce,
                ModeSpec::Audit => Mode::Audit,
            },
            rules,
            agents,
            agent_index,
            cel_root: root_context(),
            cel_vars,
            has_mcp,
            mcp_conditions,
        }),
        1 => Err(errs.list.remove(0)),
        _ => Err(PolicyError::Many(errs.list)),
    }
}

fn compile_pathway(
    errs: &mut Errors<'_>,
    ctx: &str,
    agent: &str,
    p: PathwaySpec,
) -> Option<Pathway> {
    let before = errs.list.len();
    let mut destinations = Vec::new();
    if p.destinations.is_empty() {
        errs.push(p.name.line, ctx, "at least one destination is required");
    }
    for d in &p.destinations {
        match Destination::parse(&d.value) {
            Ok(dest) => destinations.push(dest),
            Err(e) => errs.push(d.line, ctx, format!("destination {:?}: {e}", d.value)),
        }
    }

    let methods = p.methods.map(|ms| {
        if ms.is_empty() {
            errs.push(
                p.name.line,
                ctx,
                "`methods: []` allows nothing; list methods or remove the key",
            );
        }
        ms.into_iter()
            .filter_map(|m| {
                let ok = !m.value.is_empty()
                    && m.value
                        .bytes()
                        .all(|b| b.is_ascii_alphabetic() || b == b'-');
                if !ok {
                    errs.push(m.line, ctx, format!("invalid method {:?}", m.value));
                }
                ok.then(|| m.value.to_ascii_uppercase())
            })
            .collect::<Vec<_>>()
    });
    if p.upstream.is_some()
        && methods
            .as_ref()
            .is_some_and(|ms| ms.iter().any(|m| m == "CONNECT"))
    {
        errs.push(
            p.name.line,
            ctx,
            "method CONNECT on a pathway with `upstream`: the gateway cannot apply upstream settings to a tunnel",
        );
    }

    let models = p.models.map(|ms| {
        if ms.is_empty() {
            errs.push(
                p.name.line,
                ctx,
                "`models: []` allows nothing; list models or remove the key",
            );
        }
        ms.into_iter()
            .filter_map(|m| {
                let star = m.value.find('*');
                let ok = !m.value.is_empty() && star.is_none_or(|i| i == m.value.len() - 1);
                if !ok {
                    errs.push(
                        m.line,
                        ctx,
                        format!("invalid model {:?}: `*` only at the end", m.value),
                    );
                }
                ok.then_some(m.value)
            })
            .collect::<Vec<_>>()
    });
    if models.is_some() && p.upstream.is_none() {
        errs.push(
            p.name.line,
            ctx,
            "`models` needs `upstream`: the model is read from the request body, which only L7 pathways see",
        );
    }

    let mcp = p.mcp.map(|m| compile_mcp(errs, ctx, m));
    if mcp.is_some() && p.upstream.is_none() {
        errs.push(
            p.name.line,
            ctx,
            "`mcp` needs `upstream`: MCP messages are read from request bodies, which only L7 pathways see (a plain-HTTP server: `upstream: { tls: false }`)",
        );
    }

    let inspect = p
        .inspect
        .and_then(|spec| match crate::inspect::compile(spec) {
            Ok(i) => Some(i),
            Err(problems) => {
                for (line, message) in problems {
                    errs.push(if line > 0 { line } else { p.name.line }, ctx, message);
                }
                None
            }
        });
    if inspect.is_some() && p.upstream.is_none() {
        errs.push(
            p.name.line,
            ctx,
            "`inspect` needs `upstream`: bodies are read only on L7 pathways, never inside a CONNECT tunnel (a plain-HTTP destination: `upstream: { tls: false }`)",
        );
    }

    let when = p.when.and_then(|w| match CelExpr::compile(&w.value) {
        Ok(c) if c.uses_mcp() && mcp.is_none() => {
            errs.push(
                w.line,
                ctx,
                format!(
                    "`when` {:?} reads request.mcp, which only pathways with `mcp` see",
                    w.value
                ),
            );
            None
        }
        Ok(c) => Some(c),
        Err(e) => {
            errs.push(w.line, ctx, format!("`when` {:?}: {e}", w.value));
            None
        }
    });

    let upstream = p
        .upstream
        .map(|u| compile_upstream(errs, ctx, p.name.line, u));

    let l = p.limits;
    let limits = Limits {
        requests_per_minute: l.requests_per_minute,
        max_concurrent: l.max_concurrent,
        max_request_body_bytes: l.max_request_body_bytes,
        bytes_per_hour: l.bytes_per_hour,
        llm_tokens_per_hour: l.llm_tokens_per_hour,
    };
    for (key, zero) in [
        ("requests_per_minute", limits.requests_per_minute == Some(0)),
        ("max_concurrent", limits.max_concurrent == Some(0)),
        (
            "max_request_body_bytes",
            limits.max_request_body_bytes == Some(0),
        ),
        ("bytes_per_hour", limits.bytes_per_hour == Some(0)),
        ("llm_tokens_per_hour", limits.llm_tokens_per_hour == Some(0)),
    ] {
        if zero {
            errs.push(
                p.name.line,
                ctx,
                format!("limits.{key}: 0 would block everything; must be at least 1"),
            );
        }
    }

    let response = p
        .timeouts
        .response
        .and_then(|r| match parse_duration(&r.value) {
            Ok(d) => Some(d),
            Err(why) => {
                errs.push(
                    r.line,
                    ctx,
                    format!("timeouts.response {:?}: {why}", r.value),
                );
                None
            }
        });

    let mut allow_cidrs = Vec::new();
    for c in &p.allow_cidrs {
        let parsed = c
            .value
            .parse::<ipnet::IpNet>()
            .or_else(|_| c.value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) if net.trunc() == net => allow_cidrs.push(net),
            Ok(net) => errs.push(
                c.line,
                ctx,
                format!(
                    "allow_cidrs {:?} has host bits set (did you mean {}?)",
                    c.value,
                    net.trunc()
                ),
            ),
            Err(_) => errs.push(
                c.line,
                ctx,
                format!("allow_cidrs {:?} is not a CIDR like 10.96.0.0/12", c.value),
            ),
        }
    }

    if errs.list.len() != before {
        return None;
    }
    Some(Pathway {
        name: p.name.value,
        agent: agent.into(),
        destinations,
        methods,
        models,
        upstream: upstream.flatten(),
        limits,
        allow_cidrs,
        require_sni: p.require_sni,
        timeouts: Timeouts { response },
        mcp,
        inspect,
        when,
    })
}

/// `mcp:` lists: exact names or a trailing `*`.
fn compile_mcp(errs: &mut Errors<'_>, ctx: &str, m: McpSpec) -> McpRules {
    let mut list = |key: &str, entries: Vec<Located<String>>| -> Vec<NamePattern> {
        entries
            .into_iter()
            .filter_map(|e| {
                let parsed = NamePattern::parse(&e.value);
                if parsed.is_none() {
                    errs.push(
                        e.line,
                        ctx,
                        format!("invalid mcp.{key} entry {:?}: `*` only at the end", e.value),
                    );
                }
                parsed
            })
            .collect()
    };
    McpRules {
        tools: list("tools", m.tools),
        resources: list("resources", m.resources),
        prompts: list("prompts", m.prompts),
    }
}

/// A duration as gateway.yaml writes them (`300s`, `5m`, `1m 30s`); zero is refused.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("not a duration like 300s or 5m ({e})")),
    }
}

fn compile_upstream(
    errs: &mut Errors<'_>,
    ctx: &str,
    line: u64,
    u: UpstreamSpec,
) -> Option<Upstream> {
    let before = errs.list.len();
    let spiffe_id = u.spiffe_id.and_then(|s| match s.value.parse::<SpiffeId>() {
        Ok(id) => Some(id),
        Err(e) => {
            errs.push(
                s.line,
                ctx,
                format!("upstream.spiffe_id {:?}: {e}", s.value),
            );
            None
        }
    });
    let implied = spiffe_id.is_some() || u.ca_file.is_some();
    if u.tls == Some(false) && implied {
        errs.push(
            line,
            ctx,
            "upstream.tls: false contradicts ca_file/spiffe_id, which need TLS",
        );
    }
    if u.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        errs.push(line, ctx, "upstream.ca_file is empty");
    }
    let mut inject_headers: Vec<(String, SecretRef)> = Vec::new();
    for (name, secret) in u.inject_headers {
        let lower = name.to_ascii_lowercase();
        let token = !lower.is_empty()
            && lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            errs.push(
                line,
                ctx,
                format!("upstream.inject_headers: invalid header name {name:?}"),
            );
            continue;
        }
        if inject_headers.iter().any(|(n, _)| *n == lower) {
            errs.push(
                line,
                ctx,
                format!("upstream.inject_headers: header {name:?} listed twice"),
            );
            continue;
        }
        if secret.secret_file.as_os_str().is_empty() {
            errs.push(
                line,
                ctx,
                format!("upstream.inject_headers.{name}: empty secret_file"),
            );
            continue;
        }
        inject_headers.push((
            lower,
            SecretRef {
                secret_file: secret.secret_file,
                prefix: secret.prefix,
            },
        ));
    }
    (errs.list.len() == before).then_some(Upstream {
        tls: u.tls.unwrap_or(implied),
        ca_file: u.ca_file,
        spiffe_id,
        inject_headers,
    })
}
