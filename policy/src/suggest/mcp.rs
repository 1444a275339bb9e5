//! Learn mode for MCP pathways: the tools agents called (`tools/call` audit lines with
//! `mcp_tool`) that a pathway's `mcp.tools` does not list yet are added to that list in
//! the operator's policy text, in place, and pinned down by test cases.
//!
//! A typical run: the pathway starts with `mcp: { tools: [] }` in `mode: audit`; every
//! call is logged as a denial that was not enforced; `policy suggest` then proposes the
//! tools that were used.

use std::collections::{BTreeMap, BTreeSet};

use crate::decision::{Decision, Reason};
use crate::load::parse_yaml;
use crate::mcp::{McpCall, McpDenial, TOOLS_CALL};
use crate::model::PolicyFile;
use crate::policy::Policy;
use crate::request::Request;

/// What the MCP audit lines of one (source, destination, method) said.
#[derive(Debug, Clone, Default)]
pub(crate) struct McpSeen {
    /// Some line named a JSON-RPC method: the key is MCP traffic.
    pub(crate) any: bool,
    /// `tools/call` tools and how often each was called.
    pub(crate) tools: BTreeMap<String, u64>,
}

impl McpSeen {
    pub(crate) fn add(&mut self, method: Option<&str>, tool: Option<&str>) {
        let Some(method) = method else {
            return;
        };
        self.any = true;
        if method == TOOLS_CALL {
            if let Some(t) = tool.filter(|t| valid_tool(t)) {
                *self.tools.entry(t.to_owned()).or_default() += 1;
            }
        }
    }
}

/// MCP tool names (1-128 of `A-Z a-z 0-9 _ - . /`); anything else is not proposed.
fn valid_tool(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
}

pub(crate) fn tool_call(tool: &str) -> McpCall {
    McpCall {
        method: TOOLS_CALL.into(),
        name: Some(tool.into()),
        arguments: Default::default(),
    }
}

/// The decision for a key: MCP keys are decided as a message no list gates (their lines
/// were JSON-RPC messages, not bare POSTs); their tools are checked one by one.
pub(crate) fn evaluate(p: &Policy, req: &Request<'_>, seen: &McpSeen) -> Decision {
    if seen.any {
        let baseline = McpCall {
            method: "initialize".into(),
            ..Default::default()
        };
        p.evaluate_mcp(req, Some(&baseline))
    } else {
        p.evaluate(req)
    }
}

/// Tools to add to one pathway's `mcp.tools`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Addition {
    pub(crate) agent: String,
    pub(crate) pathway: String,
    pub(crate) tools: BTreeSet<String>,
    /// `tools/call` requests behind them.
    pub(crate) calls: u64,
}

/// The observed tools the current policy refuses only because the MCP pathway they were
/// aimed at does not list them (not for a deny rule or a `when`).
pub(crate) fn additions<'a>(
    p: &Policy,
    keys: impl Iterator<Item = (Request<'a>, &'a McpSeen)>,
) -> Vec<Addition> {
    let mut out: Vec<Addition> = Vec::new();
    for (req, seen) in keys {
        for (tool, n) in &seen.tools {
            let d = p.evaluate_mcp(&req, Some(&tool_call(tool)));
            let unlisted = matches!(
                &d.reason,
                Reason::McpNotAllowed {
                    denial: McpDenial::Tool(_)
                }
            );
            if d.allowed || !unlisted {
                continue;
            }
            let Some(pw) = p.mcp_pathway(&req) else {
                continue;
            };
            match out
                .iter_mut()
                .find(|a| a.agent == pw.agent && a.pathway == pw.name)
            {
                Some(a) => {
                    a.tools.insert(tool.clone());
                    a.calls += n;
                }
                None => out.push(Addition {
                    agent: pw.agent.clone(),
                    pathway: pw.name.clone(),
                    tools: BTreeSet::from([tool.clone()]),
                    calls: *n,
                }),
            }
        }
    }
    out
}

/// Applies the additions to the policy text one by one, each checked by parsing the
/// result: the edited text and its parse, and the additions that could not be placed
/// (a list written in a way this edit does not handle).
pub(crate) fn apply<'a>(
    text: &str,
    origin: &str,
    file: &PolicyFile,
    adds: &'a [Addition],
) -> (Option<(String, PolicyFile)>, Vec<&'a Addition>) {
    let mut done: Option<(String, PolicyFile)> = None;
    let mut failed = Vec::new();
    for add in adds {
        let (cur_text, cur_file) = match &done {
            Some((t, f)) => (t.as_str(), f),
            None => (text, file),
        };
        let next = add_tools(cur_text, cur_file, add).and_then(|t| {
            let f = parse_yaml::<PolicyFile>(&t, origin).ok()?;
            (tool_lists(&f) == expected(cur_file, add)).then_some((t, f))
        });
        match next {
            Some(n) => done = Some(n),
            None => failed.push(add),
        }
    }
    (done, failed)
}

type ToolLists = Vec<(String, String, Option<Vec<String>>)>;

fn tool_lists(f: &PolicyFile) -> ToolLists {
    f.agents
        .iter()
        .flat_map(|a| {
            a.pathways.iter().map(|p| {
                (
                    a.name.value.clone(),
                    p.name.value.clone(),
                    p.mcp
                        .as_ref()
                        .map(|m| m.tools.iter().map(|t| t.value.clone()).collect()),
                )
            })
        })
        .collect()
}

fn expected(f: &PolicyFile, add: &Addition) -> ToolLists {
    let mut lists = tool_lists(f);
    for (agent, pathway, tools) in &mut lists {
        if *agent == add.agent && *pathway == add.pathway {
            if let Some(t) = tools {
                t.extend(add.tools.iter().cloned());
            }
        }
    }
    lists
}

/// JSON string syntax is valid YAML double-quoted syntax.
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The text with `add.tools` appended to the pathway's `mcp.tools`: after the last item
/// of a block list, before the `]` of a flow list, or into a `tools: []`.
fn add_tools(text: &str, file: &PolicyFile, add: &Addition) -> Option<String> {
    let agent = file.agents.iter().find(|a| a.name.value == add.agent)?;
    let pathway = agent
        .pathways
        .iter()
        .find(|p| p.name.value == add.pathway)?;
    let spec = pathway.mcp.as_ref()?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let quoted: Vec<String> = add.tools.iter().map(|t| q(t)).collect();
    match spec.tools.last() {
        Some(last) => {
            let ix = usize::try_from(last.line).ok()?.checked_sub(1)?;
            let line = lines.get(ix)?.clone();
            let body = line.trim_start();
            if body.starts_with("- ") {
                let indent = &line[..line.len() - body.len()];
                for (n, t) in quoted.iter().enumerate() {
                    lines.insert(ix + 1 + n, format!("{indent}- {t}"));
                }
            } else {
                let at = line.rfind(last.value.as_str())? + last.value.len();
                let close = at + line[at..].find(']')?;
                lines[ix] = format!(
                    "{}, {}{}",
                    &line[..close],
                    quoted.join(", "),
                    &line[close..]
                );
            }
        }
        None => {
            let from = usize::try_from(pathway.name.line).ok()?.checked_sub(1)?;
            let (ix, at) = lines.iter().enumerate().skip(from).find_map(|(i, l)| {
                let key = l.find("tools:")?;
                let rest = &l[key + "tools:".len()..];
                let open = rest.len() - rest.trim_start().len();
                rest.trim_start()
                    .starts_with("[]")
                    .then_some((i, key + "tools:".len() + open))
            })?;
            let l = &lines[ix];
            lines[ix] = format!("{}[{}]{}", &l[..at], quoted.join(", "), &l[at + 2..]);
        }
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suggest::{suggest, Aggregator, AuditEntry, Current, Options};

    const RESEARCH: &str = "spiffe://example.org/ns/ai/sa/research";

    fn policy(mcp: &str) -> String {
        format!(
            r#"version: 1
trust_domains: [example.org]
mode: audit
agents:
  - name: research
    id: {RESEARCH}
    pathways:
      - name: docs-mcp   # the docs server
        destinations: ["mcp.internal:8080"]
        upstream: {{ tls: false }}
{mcp}      - name: other
        destinations: ["other.internal:8080"]
        upstream: {{ tls: false }}
        mcp: {{ tools: [x] }}
"#
        )
    }

    fn line(method: &str, tool: Option<&str>, decision: &str) -> String {
        let mut v = serde_json::json!({
            "ts": "2026-05-01T10:00:00.000Z",
            "source_spiffe_id": RESEARCH,
            "kind": "http",
            "method": "POST",
            "host": "mcp.internal",
            "port": 8080,
            "path": "/mcp",
            "decision": decision,
            "enforced": false,
            "reason": "x",
            "mcp_method": method,
        });
        if let Some(t) = tool {
            v["mcp_tool"] = t.into();
        }
        v.to_string()
    }

    fn run(mcp: &str, lines: &[String]) -> crate::suggest::Suggestion {
        let mut agg = Aggregator::new(Options::default());
        for l in lines {
            let e: AuditEntry<'_> = serde_json::from_str(l).unwrap();
            agg.add(&e).unwrap();
        }
        let text = policy(mcp);
        suggest(
            agg,
            Some(Current {
                text: &text,
                origin: "policy.yaml",
            }),
        )
        .unwrap()
    }

    fn observed() -> Vec<String> {
        vec![
            line("initialize", None, "allow"),
            line("tools/list", None, "allow"),
            line("tools/call", Some("search_docs"), "allow"),
            line("tools/call", Some("read_file"), "deny"),
            line("tools/call", Some("read_file"), "deny"),
            line("tools/call", Some("write_file"), "deny"),
        ]
    }

    fn tools_of(s: &crate::suggest::Suggestion) -> Vec<String> {
        let p = Policy::from_yaml_str(&s.policy_yaml, "s.yaml").unwrap();
        let pw = p.pathways().find(|p| p.name == "docs-mcp").unwrap();
        pw.mcp
            .as_ref()
            .unwrap()
            .tools
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect()
    }

    #[test]
    fn proposes_observed_tools_for_each_list_style() {
        for mcp in [
            "        mcp: { tools: [search_docs] }\n",
            "        mcp:\n          tools: [\"search_docs\"]   # reviewed\n",
            "        mcp:\n          tools:\n            - search_docs\n          resources: [\"docs://*\"]\n",
            "        mcp:\n          tools: []\n",
        ] {
            let s = run(mcp, &observed());
            // Listed tools stay first; the added ones follow in name order.
            let want = if mcp.contains("search_docs") {
                vec!["search_docs", "read_file", "write_file"]
            } else {
                vec!["read_file", "search_docs", "write_file"]
            };
            assert_eq!(tools_of(&s), want, "{mcp}\n{}", s.policy_yaml);
            assert!(!s.unchanged);
            // The rest of the text is kept, comments included.
            assert!(s.policy_yaml.contains("# the docs server"), "{}", s.policy_yaml);
            assert!(s.policy_yaml.contains("mcp: { tools: [x] }"), "{}", s.policy_yaml);
            assert!(
                s.summary.contains("pathway \"docs-mcp\": mcp.tools + read_file")
                    && s.summary.contains("write_file ("),
                "{}",
                s.summary
            );
            // Each observed tool is pinned by a test that passes on the suggestion.
            assert!(s.tests_yaml.contains("mcp: { tool: \"write_file\" }"), "{}", s.tests_yaml);
        }
    }

    #[test]
    fn tools_already_listed_or_refused_by_when_are_left_alone() {
        let s = run("        mcp: { tools: [\"*\"] }\n", &observed());
        assert!(s.unchanged, "{}", s.policy_yaml);
        let when = "        mcp: { tools: [search_docs] }\n        when: 'request.mcp.tool != \"write_file\"'\n";
        let s = run(when, &observed());
        // Listed, as called; the operator's `when` still has the last word.
        assert_eq!(tools_of(&s), ["search_docs", "read_file", "write_file"]);
        assert!(
            s.summary
                .contains("tools/call \"write_file\" stays denied (pathway condition not met)"),
            "{}",
            s.summary
        );
        // A list this edit cannot place is reported, not guessed.
        let s = run("        mcp: {}\n", &observed());
        assert!(s.unchanged, "{}", s.policy_yaml);
        assert!(s.summary.contains("add by hand"), "{}", s.summary);
    }
}
