//! Inserting suggested pathways and agents into the operator's policy text,
//! so comments and layout survive and the review diff shows only additions.
//!
//! Works on block-style YAML (what the examples and most operators write).
//! The result is loaded and compared with the intended structure afterwards;
//! anything this editor cannot place is an error, never a silent misplacement.

use std::collections::BTreeMap;

use crate::decision::Mode;
use crate::model::PolicyFile;

#[derive(Debug, thiserror::Error)]
#[error("cannot edit the policy in place at line {line}: {why} (write `agents` and `pathways` in block style)")]
pub struct EditError {
    pub line: usize,
    pub why: String,
}

/// Text to insert: rendered items, each line without the base indentation.
pub struct Insertions<'a> {
    /// (agent index in the file, rendered pathway items at indent 0).
    pub pathways: Vec<(usize, &'a str)>,
    /// Rendered agent items at indent 0.
    pub agents: &'a str,
    pub mode: Option<Mode>,
}

struct Lines<'a> {
    lines: Vec<&'a str>,
    /// Inserted after the line at this index (`usize::MAX`: before the first line).
    after: BTreeMap<usize, Vec<String>>,
    replace: BTreeMap<usize, String>,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start_matches(' ').len()
}

fn is_content(l: &str) -> bool {
    let t = l.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// The value after `key:` on a line, without a trailing comment.
fn value_after<'l>(l: &'l str, key: &str) -> Option<&'l str> {
    let rest = l.trim_start().strip_prefix(key)?.strip_prefix(':')?;
    let v = match rest.find(" #") {
        Some(i) => &rest[..i],
        None => rest,
    };
    Some(v.trim())
}

fn reindent(block: &str, by: usize) -> Vec<String> {
    let pad = " ".repeat(by);
    block
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect()
}

impl Lines<'_> {
    /// Index of the last content line in `from..to`, or `from - 1` semantics via `fallback`.
    fn last_content(&self, from: usize, to: usize, fallback: usize) -> usize {
        (from..to)
            .rev()
            .find(|&i| is_content(self.lines[i]))
            .unwrap_or(fallback)
    }

    /// First content line at or after `from` with indentation below `col`.
    fn block_end(&self, from: usize, col: usize) -> usize {
        (from..self.lines.len())
            .find(|&i| is_content(self.lines[i]) && indent(self.lines[i]) < col)
            .unwrap_or(self.lines.len())
    }

    fn insert(&mut self, after: usize, lines: Vec<String>) {
        self.after.entry(after).or_default().extend(lines);
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Some(v) = self.after.get(&usize::MAX) {
            for l in v {
                out.push_str(l);
                out.push('\n');
            }
        }
        for (i, l) in self.lines.iter().enumerate() {
            match self.replace.get(&i) {
                Some(r) => out.push_str(r),
                None => out.push_str(l),
            }
            out.push('\n');
            if let Some(v) = self.after.get(&i) {
                for l in v {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

pub fn edit(text: &str, file: &PolicyFile, ins: &Insertions<'_>) -> Result<String, EditError> {
    let mut t = Lines {
        lines: text.lines().collect(),
        after: BTreeMap::new(),
        replace: BTreeMap::new(),
    };
    let err = |line: usize, why: &str| EditError {
        line: line + 1,
        why: why.to_owned(),
    };
    for (idx, block) in &ins.pathways {
        let Some(agent) = file.agents.get(*idx) else {
            return Err(err(0, "unknown agent"));
        };
        let first = agent.name.line.min(agent.id.line) as usize;
        if first == 0 || first > t.lines.len() {
            return Err(err(0, "agent position unknown"));
        }
        let start = first - 1;
        let line = t.lines[start];
        let after_dash = line.trim_start().strip_prefix("- ");
        let (dash_line, key_col) = match after_dash {
            Some(rest) => (start, line.len() - rest.trim_start().len()),
            None => {
                // The name/id is not the item's first key: find the dash above.
                let col = indent(line);
                let d = (0..start)
                    .rev()
                    .find(|&i| {
                        let l = t.lines[i];
                        is_content(l)
                            && l.trim_start().starts_with("- ")
                            && l.len() - l.trim_start()[2..].trim_start().len() == col
                    })
                    .ok_or_else(|| err(start, "agent item not found"))?;
                (d, col)
            }
        };
        let end = t.block_end(dash_line + 1, key_col);
        let key_text = |i: usize| -> Option<&str> {
            let l = t.lines[i];
            if i == dash_line {
                l.trim_start().strip_prefix("- ").map(str::trim_start)
            } else if indent(l) == key_col {
                Some(l.trim_start())
            } else {
                None
            }
        };
        let pw = (dash_line..end)
            .find(|&i| key_text(i).is_some_and(|k| value_after(k, "pathways").is_some()));
        match pw {
            None => {
                let at = t.last_content(dash_line, end, dash_line);
                let mut v = reindent("pathways:", key_col);
                v.extend(reindent(block, key_col + 2));
                t.insert(at, v);
            }
            Some(p) => {
                let pl = t.lines[p];
                let value = key_text(p)
                    .and_then(|k| value_after(k, "pathways"))
                    .unwrap_or("");
                match value {
                    "" => {
                        // Items may sit at the key's own column (`- ` under `pathways:`).
                        let first_item = (p + 1..end).find(|&i| is_content(t.lines[i]));
                        let item_col = first_item
                            .filter(|&i| t.lines[i].trim_start().starts_with("- "))
                            .map(|i| indent(t.lines[i]))
                            .unwrap_or(key_col + 2);
                        let pend = (p + 1..end)
                            .find(|&i| {
                                let l = t.lines[i];
                                is_content(l)
                                    && (indent(l) < item_col
                                        || (indent(l) == item_col
                                            && !l.trim_start().starts_with("- ")))
                            })
                            .unwrap_or(end);
                        let at = t.last_content(p, pend, p);
                        t.insert(at, reindent(block, item_col));
                    }
                    "[]" => {
                        let prefix = &pl[..pl.len() - pl.trim_start().len()];
                        let head = pl
                            .trim_start()
                            .strip_prefix("- ")
                            .map(|_| "- ")
                            .unwrap_or("");
                        t.replace.insert(p, format!("{prefix}{head}pathways:"));
                        t.insert(p, reindent(block, key_col + 2));
                    }
                    _ => return Err(err(p, "flow-style pathways list")),
                }
            }
        }
    }
    if !ins.agents.is_empty() {
        let top = (0..t.lines.len())
            .find(|&i| indent(t.lines[i]) == 0 && value_after(t.lines[i], "agents").is_some());
        match top {
            None => {
                let last = t.lines.len().checked_sub(1).unwrap_or(usize::MAX);
                let mut v = vec!["agents:".to_owned()];
                v.extend(reindent(ins.agents, 2));
                t.insert(last, v);
            }
            Some(a) => match value_after(t.lines[a], "agents").unwrap_or("") {
                "" => {
                    let first_item = (a + 1..t.lines.len()).find(|&i| is_content(t.lines[i]));
                    let item_col = first_item
                        .filter(|&i| t.lines[i].trim_start().starts_with("- "))
                        .map(|i| indent(t.lines[i]))
                        .unwrap_or(2);
                    let aend = (a + 1..t.lines.len())
                        .find(|&i| {
                            let l = t.lines[i];
                            is_content(l)
                                && (indent(l) < item_col
                                    || (indent(l) == item_col && !l.trim_start().starts_with("- ")))
                        })
                        .unwrap_or(t.lines.len());
                    let at = t.last_content(a, aend, a);
                    t.insert(at, reindent(ins.agents, item_col));
                }
                "[]" => {
                    t.replace.insert(a, "agents:".to_owned());
                    t.insert(a, reindent(ins.agents, 2));
                }
                _ => return Err(err(a, "flow-style agents list")),
            },
        }
    }
    if let Some(mode) = ins.mode {
        let m = (0..t.lines.len())
            .find(|&i| indent(t.lines[i]) == 0 && value_after(t.lines[i], "mode").is_some());
        match m {
            Some(i) => {
                t.replace.insert(i, format!("mode: {mode}"));
            }
            None => {
                let v = (0..t.lines.len())
                    .find(|&i| {
                        indent(t.lines[i]) == 0 && value_after(t.lines[i], "version").is_some()
                    })
                    .ok_or_else(|| err(0, "no top-level `version:` line to put `mode:` after"))?;
                t.insert(v, vec![format!("mode: {mode}")]);
            }
        }
    }
    Ok(t.render())
}
