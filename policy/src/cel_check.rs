//! Load-time checks of a parsed CEL expression, for what CEL itself only reports when
//! the expression runs (and the policy then turns into a silent deny or non-match):
//!
//! - a function the standard library does not have (`request.host.endswith(..)`);
//! - a `matches()` regex literal that does not compile;
//! - a comprehension (`all`, `exists`, `exists_one`, `map`, `filter`) whose work has no
//!   small bound: the `cel` crate (0.15) has no evaluation budget, so the bound is
//!   static. Each comprehension's range is estimated (a list or map literal: its
//!   length; a request attribute such as `request.headers`: [`ATTRIBUTE_RANGE`]; a
//!   `map`/`filter` result: its own range; `a + b`: the sum; anything else:
//!   [`UNKNOWN_RANGE`]) and nested ranges multiply. More than [`MAX_ITERATIONS`] in
//!   one expression is a load error, so neither the gateway nor `policy explain` ever
//!   runs an expression of unbounded cost.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cel::common::ast::{EntryExpr, Expr, LiteralValue};
use cel::parser::Expression;
use cel::{Context, ExecutionError, Program};

/// The most comprehension iterations one expression may need, at the estimate above.
pub const MAX_ITERATIONS: u64 = 20_000;
/// The estimated size of a map or list read from the request (the gateway's HTTP
/// parser takes at most 100 headers).
pub const ATTRIBUTE_RANGE: u64 = 100;
/// The estimated size of a list or map CEL computes some other way.
pub const UNKNOWN_RANGE: u64 = 1_000;

/// What a check found; the caller words it into a load error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finding {
    UnknownFunction(String),
    BadRegex { pattern: String, message: String },
    TooExpensive { iterations: u64 },
}

/// Every finding in `program`, in a stable order (unknown functions, regexes, cost).
pub(crate) fn check(program: &Program) -> Vec<Finding> {
    let mut calls = Vec::new();
    let mut regexes = Vec::new();
    walk(program.expression(), &mut |e| {
        if let Expr::Call(c) = &e.expr {
            if is_identifier(&c.func_name) {
                calls.push((c.func_name.clone(), c.target.is_some()));
            }
            if c.func_name == "matches" {
                let pattern = if c.target.is_some() {
                    c.args.first()
                } else {
                    c.args.get(1)
                };
                if let Some(Expr::Literal(LiteralValue::String(s))) = pattern.map(|p| &p.expr) {
                    regexes.push(s.inner().to_string());
                }
            }
        }
    });
    let mut out = Vec::new();
    calls.sort();
    calls.dedup();
    for (name, member) in calls {
        if !function_exists(&name, member) {
            out.push(Finding::UnknownFunction(name));
        }
    }
    for pattern in regexes {
        if let Err(e) = regex::Regex::new(&pattern) {
            out.push(Finding::BadRegex {
                message: e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
                pattern,
            });
        }
    }
    let iterations = work(program.expression(), 1);
    if iterations > MAX_ITERATIONS {
        out.push(Finding::TooExpensive { iterations });
    }
    out
}

fn is_identifier(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Calls `f` on `e` and every expression below it.
fn walk(e: &Expression, f: &mut impl FnMut(&Expression)) {
    f(e);
    match &e.expr {
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                walk(t, f);
            }
            for a in &c.args {
                walk(a, f);
            }
        }
        Expr::Comprehension(c) => {
            for part in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                walk(part, f);
            }
        }
        Expr::List(l) => {
            for x in &l.elements {
                walk(x, f);
            }
        }
        Expr::Map(m) => m.entries.iter().for_each(|en| walk_entry(&en.expr, f)),
        Expr::Struct(s) => s.entries.iter().for_each(|en| walk_entry(&en.expr, f)),
        Expr::Select(s) => walk(&s.operand, f),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn walk_entry(e: &EntryExpr, f: &mut impl FnMut(&Expression)) {
    match e {
        EntryExpr::MapEntry(m) => {
            walk(&m.key, f);
            walk(&m.value, f);
        }
        EntryExpr::StructField(s) => walk(&s.value, f),
    }
}

/// An upper estimate of how many elements `e` has when a comprehension ranges over it.
fn range_size(e: &Expression) -> u64 {
    match &e.expr {
        Expr::List(l) => l.elements.len() as u64,
        Expr::Map(m) => m.entries.len() as u64,
        Expr::Ident(_) | Expr::Select(_) => ATTRIBUTE_RANGE,
        // `map` and `filter` produce at most one element per element of their range.
        Expr::Comprehension(c) => range_size(&c.iter_range),
        Expr::Call(c) if c.func_name == "_+_" => {
            c.args.iter().map(range_size).fold(0, u64::saturating_add)
        }
        Expr::Call(c) if c.func_name == "_?_:_" => {
            c.args.iter().skip(1).map(range_size).max().unwrap_or(0)
        }
        _ => UNKNOWN_RANGE,
    }
}

/// Comprehension iterations `e` needs when it is evaluated `times` times.
fn work(e: &Expression, times: u64) -> u64 {
    match &e.expr {
        Expr::Comprehension(c) => {
            let n = range_size(&c.iter_range);
            let inner = times.saturating_mul(n);
            [
                work(&c.iter_range, times),
                work(&c.accu_init, times),
                inner,
                work(&c.loop_cond, inner),
                work(&c.loop_step, inner),
                work(&c.result, times),
            ]
            .into_iter()
            .fold(0, u64::saturating_add)
        }
        _ => {
            let mut total = 0u64;
            let mut children = Vec::new();
            match &e.expr {
                Expr::Call(c) => {
                    children.extend(c.target.as_deref());
                    children.extend(c.args.iter());
                }
                Expr::List(l) => children.extend(l.elements.iter()),
                Expr::Map(m) => {
                    for en in &m.entries {
                        if let EntryExpr::MapEntry(me) = &en.expr {
                            children.push(&me.key);
                            children.push(&me.value);
                        }
                    }
                }
                Expr::Struct(s) => {
                    for en in &s.entries {
                        if let EntryExpr::StructField(sf) = &en.expr {
                            children.push(&sf.value);
                        }
                    }
                }
                Expr::Select(s) => children.push(&s.operand),
                _ => {}
            }
            for c in children {
                total = total.saturating_add(work(c, times));
            }
            total
        }
    }
}

/// Whether the standard environment has a function (`member`: called as `x.name()`).
/// Asked once per name: a call with no arguments is either an undeclared reference
/// (unknown) or some other error (known, wrong arguments).
fn function_exists(name: &str, member: bool) -> bool {
    static CACHE: OnceLock<Mutex<HashMap<(String, bool), bool>>> = OnceLock::new();
    static CONTEXT: OnceLock<Context<'static, 'static>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(known) = cache
        .lock()
        .ok()
        .and_then(|c| c.get(&(name.to_string(), member)).copied())
    {
        return known;
    }
    let probe = if member {
        format!("null.{name}()")
    } else {
        format!("{name}()")
    };
    let known = match Program::compile(&probe) {
        // Not a plain call (a reserved word): leave it to CEL.
        Err(_) => true,
        Ok(p) => {
            let context = CONTEXT.get_or_init(Context::default);
            !matches!(p.execute(context), Err(ExecutionError::UndeclaredReference(n)) if n.as_str() == name)
        }
    };
    if let Ok(mut c) = cache.lock() {
        c.insert((name.to_string(), member), known);
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(src: &str) -> Vec<Finding> {
        check(&Program::compile(src).unwrap())
    }

    #[test]
    fn standard_functions_are_known_and_misspelt_ones_are_not() {
        for ok in [
            r#"request.host.endsWith("x") && request.path.startsWith("/") && request.path.contains("a")"#,
            r#"size(request.headers) < 10 && int("1") == 1 && string(1) == "1""#,
            r#"request.host.matches("^a.*$") && matches(request.host, "b")"#,
            r#"request.headers.exists(k, k.startsWith("x-")) && has(request.llm)"#,
            r#"now > timestamp("2020-01-01T00:00:00Z") && duration("1s") > duration("0s")"#,
        ] {
            assert_eq!(findings(ok), vec![], "{ok}");
        }
        assert_eq!(
            findings(r#"request.host.endswith("x")"#),
            vec![Finding::UnknownFunction("endswith".into())]
        );
        assert_eq!(
            findings(r#"lower(request.host) == "x""#),
            vec![Finding::UnknownFunction("lower".into())]
        );
    }

    #[test]
    fn invalid_regex_literals_are_found() {
        let f = findings(r#"request.path.matches("(unclosed")"#);
        assert!(
            matches!(&f[..], [Finding::BadRegex { pattern, .. }] if pattern == "(unclosed"),
            "{f:?}"
        );
        let f = findings(r#"matches(request.path, "[z-a]")"#);
        assert!(matches!(&f[..], [Finding::BadRegex { .. }]), "{f:?}");
    }

    #[test]
    fn comprehension_work_is_bounded() {
        assert_eq!(
            findings(r#"request.headers.exists(k, request.headers.exists(j, k == j))"#),
            vec![],
            "two nested header loops: 100 x 100"
        );
        let ten = "[0,1,2,3,4,5,6,7,8,9]";
        let nested = format!(
            "{ten}.all(a, {ten}.all(b, {ten}.all(c, {ten}.all(d, {ten}.all(e, a + b + c + d + e >= 0)))))"
        );
        assert!(matches!(
            &findings(&nested)[..],
            [Finding::TooExpensive { iterations }] if *iterations > 100_000
        ));
        assert_eq!(
            findings(&format!("{ten}.all(a, {ten}.all(b, a + b >= 0))")),
            vec![]
        );
    }
}
