//! CEL: compile once at load, evaluate against lazily built attributes.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use cel::common::ast::{EntryExpr, Expr, LiteralValue};
use cel::common::types::{CelInt, CelMap, CelMapKey, CelString, CelTimestamp};
use cel::common::value::Val;
use cel::{Context, IdedExpr, Program, Value};

use crate::mcp::McpCall;
use crate::request::{Request, RequestKind};

/// The top-level variables PRODUCT.md documents; anything else is a load error.
const VARIABLES: [&str; 3] = ["source", "request", "now"];

pub(crate) struct CelExpr {
    source: String,
    program: Program,
    uses_source: bool,
    uses_request: bool,
    uses_now: bool,
    /// Reads `request.mcp`, which only pathways with `mcp` provide.
    uses_mcp: bool,
}

impl fmt::Debug for CelExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CelExpr").field(&self.source).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CelCompileError {
    #[error("CEL syntax error at {line}:{column}: {message}")]
    Syntax {
        line: isize,
        column: isize,
        message: String,
    },
    #[error("unknown variable `{0}` (available: source, request, now)")]
    UnknownVariable(String),
    #[error("empty CEL expression")]
    Empty,
    #[error(
        "unknown function `{0}` (not in the CEL standard library; every call of it would fail)"
    )]
    UnknownFunction(String),
    #[error("invalid regex {pattern:?} in matches(): {message}")]
    BadRegex { pattern: String, message: String },
    #[error(
        "too expensive: its comprehensions may run about {iterations} iterations per evaluation \
         (limit {}); use fewer or smaller nested all/exists/map/filter",
        crate::cel_check::MAX_ITERATIONS
    )]
    TooExpensive { iterations: u64 },
}

impl CelExpr {
    pub(crate) fn compile(src: &str) -> Result<CelExpr, CelCompileError> {
        if src.trim().is_empty() {
            return Err(CelCompileError::Empty);
        }
        let program = Program::compile(src).map_err(|e| match e.errors.first() {
            Some(first) => CelCompileError::Syntax {
                line: first.pos.0,
                column: first.pos.1,
                message: first.msg.clone(),
            },
            None => CelCompileError::Syntax {
                line: 0,
                column: 0,
                message: e.to_string(),
            },
        })?;
        let refs = program.references();
        // Comprehension variables (`exists(h, ...)`) show up as references too;
        // they are single lower-case identifiers that shadow nothing we expose,
        // so only reject names that look like a misspelt top-level attribute.
        for v in refs.variables() {
            if !VARIABLES.contains(&v) && !is_comprehension_var(src, v) {
                return Err(CelCompileError::UnknownVariable(v.into()));
            }
        }
        // The first finding is the error; fixing it shows the next.
        if let Some(finding) = crate::cel_check::check(&program).into_iter().next() {
            use crate::cel_check::Finding;
            return Err(match finding {
                Finding::UnknownFunction(name) => CelCompileError::UnknownFunction(name),
                Finding::BadRegex { pattern, message } => {
                    CelCompileError::BadRegex { pattern, message }
                }
                Finding::TooExpensive { iterations } => {
                    CelCompileError::TooExpensive { iterations }
                }
            });
        }
        Ok(CelExpr {
            uses_mcp: reads_request_field(&program.expression().expr, "mcp"),
            uses_source: refs.has_variable("source"),
            uses_request: refs.has_variable("request"),
            uses_now: refs.has_variable("now"),
            source: src.into(),
            program,
        })
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// True if the expression reads `request.mcp` (as `request.mcp`, `has(request.mcp)`
    /// or `request["mcp"]`).
    pub(crate) fn uses_mcp(&self) -> bool {
        self.uses_mcp
    }
}

/// Whether `e` selects `field` of the `request` variable anywhere.
fn reads_request_field(e: &Expr, field: &str) -> bool {
    let is_request = |x: &IdedExpr| matches!(&x.expr, Expr::Ident(n) if n == "request");
    match e {
        Expr::Select(s) => {
            (s.field == field && is_request(&s.operand))
                || reads_request_field(&s.operand.expr, field)
        }
        Expr::Call(c) => {
            let index = c.func_name == "_[_]"
                && c.args.len() == 2
                && is_request(&c.args[0])
                && matches!(&c.args[1].expr, Expr::Literal(LiteralValue::String(k)) if &**k == field);
            index
                || c.target
                    .as_ref()
                    .is_some_and(|t| reads_request_field(&t.expr, field))
                || c.args.iter().any(|a| reads_request_field(&a.expr, field))
        }
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .iter()
        .any(|x| reads_request_field(&x.expr, field)),
        Expr::List(l) => l
            .elements
            .iter()
            .any(|x| reads_request_field(&x.expr, field)),
        Expr::Map(m) => m.entries.iter().any(|en| entry_reads(&en.expr, field)),
        Expr::Struct(st) => st.entries.iter().any(|en| entry_reads(&en.expr, field)),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => false,
    }
}

fn entry_reads(en: &EntryExpr, field: &str) -> bool {
    match en {
        EntryExpr::StructField(f) => reads_request_field(&f.value.expr, field),
        EntryExpr::MapEntry(m) => {
            reads_request_field(&m.key.expr, field) || reads_request_field(&m.value.expr, field)
        }
    }
}

/// True if `name` is bound by a macro in `src`, e.g. `.exists(name,` or `.map(name,`.
fn is_comprehension_var(src: &str, name: &str) -> bool {
    ["all", "exists", "exists_one", "map", "filter"]
        .iter()
        .any(|m| {
            src.match_indices(&format!("{m}(")).any(|(i, pat)| {
                src[i + pat.len()..]
                    .trim_start()
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.trim_start().starts_with(','))
            })
        })
}

/// The root context with the standard library; built once per policy because
/// `Context::default()` is expensive.
pub(crate) fn root_context() -> Context<'static, 'static> {
    Context::default()
}

/// Which top-level variables any expression of a policy uses, so an
/// evaluation only builds those.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VarSet {
    pub(crate) source: bool,
    pub(crate) request: bool,
    pub(crate) now: bool,
}

impl VarSet {
    pub(crate) fn add(&mut self, e: &CelExpr) {
        self.source |= e.uses_source;
        self.request |= e.uses_request;
        self.now |= e.uses_now;
    }
}

/// Attribute values for one evaluation, built on first use so decisions that
/// touch no CEL never pay for them. Values borrow from the request instead of
/// copying it.
pub(crate) struct Activation<'a> {
    root: &'a Context<'a, 'a>,
    req: &'a Request<'a>,
    host: &'a str,
    vars: VarSet,
    scope: OnceCell<Context<'a, 'a>>,
}

pub(crate) type CelResult = Result<bool, String>;

type Entries<'a> = HashMap<CelMapKey<'a>, Box<dyn Val + 'a>>;

impl<'a> Activation<'a> {
    /// `host` is the normalized request host.
    pub(crate) fn new(
        root: &'a Context<'static, 'static>,
        req: &'a Request<'a>,
        host: &'a str,
        vars: VarSet,
    ) -> Self {
        Activation {
            root,
            req,
            host,
            vars,
            scope: OnceCell::new(),
        }
    }

    fn scope(&self) -> &Context<'a, 'a> {
        self.scope.get_or_init(|| {
            let mut c = self.root.new_inner_scope();
            if self.vars.source {
                c.add_variable_as_val("source", Box::new(source_map(self.req)));
            }
            if self.vars.request {
                c.add_variable_as_val(
                    "request",
                    Box::new(request_map(self.req, self.host, None, None)),
                );
            }
            if self.vars.now {
                c.add_variable_as_val("now", Box::new(now_value(self.req.now)));
            }
            c
        })
    }

    /// Runs `expr`; `Ok(bool)` or the reason it could not decide. `llm_model`
    /// is set only for pathways that list `models`, which alone see `request.llm`;
    /// `mcp` only for pathways with `mcp`, which alone see `request.mcp`.
    pub(crate) fn eval(
        &self,
        expr: &CelExpr,
        llm_model: Option<&str>,
        mcp: Option<&McpCall>,
    ) -> CelResult {
        let scope = self.scope();
        let result = if (llm_model.is_some() || mcp.is_some()) && expr.uses_request {
            let mut inner = scope.new_inner_scope();
            inner.add_variable_as_val(
                "request",
                Box::new(request_map(
                    self.req,
                    self.host,
                    llm_model.map(|m| m.to_owned().into()),
                    mcp,
                )),
            );
            expr.program.execute(&inner)
        } else {
            expr.program.execute(scope)
        };
        match result {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("evaluated to {:?}, not a bool", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn put<'a>(m: &mut Entries<'a>, k: &'static str, v: impl Into<CelString<'a>>) {
    m.insert(CelMapKey::from(k), Box::new(v.into()));
}

fn source_map<'a>(req: &Request<'a>) -> CelMap<'a> {
    let mut m = Entries::with_capacity(4);
    put(&mut m, "spiffe_id", req.source.as_str());
    put(&mut m, "trust_domain", req.source.trust_domain());
    put(&mut m, "path", req.source.path());
    if let Some(a) = req.source_address {
        put(&mut m, "address", a.to_string());
    }
    CelMap::from(m)
}

fn request_map<'a>(
    req: &Request<'a>,
    host: &'a str,
    llm_model: Option<CelString<'a>>,
    mcp: Option<&McpCall>,
) -> CelMap<'a> {
    // Names are lower case and repeats joined already: one view for every caller.
    let mut headers = Entries::with_capacity(req.headers.len());
    for (k, v) in req.headers.iter() {
        headers.insert(CelMapKey::from(k), Box::new(CelString::from(v)));
    }
    let mut m = Entries::with_capacity(8);
    put(&mut m, "kind", req.kind.as_str());
    let method: Cow<'a, str> = match req.kind {
        RequestKind::Connect => Cow::Borrowed("CONNECT"),
        RequestKind::Http if req.method.bytes().any(|b| b.is_ascii_lowercase()) => {
            Cow::Owned(req.method.to_ascii_uppercase())
        }
        RequestKind::Http => Cow::Borrowed(req.method),
    };
    put(&mut m, "method", method);
    put(&mut m, "host", host);
    m.insert(
        CelMapKey::from("port"),
        Box::new(CelInt::from(i64::from(req.port))),
    );
    put(&mut m, "path", req.path);
    put(&mut m, "query", req.query);
    m.insert(CelMapKey::from("headers"), Box::new(CelMap::from(headers)));
    if let Some(model) = llm_model {
        let mut llm = Entries::with_capacity(1);
        put(&mut llm, "model", model);
        m.insert(CelMapKey::from("llm"), Box::new(CelMap::from(llm)));
    }
    if let Some(call) = mcp {
        m.insert(CelMapKey::from("mcp"), Box::new(mcp_map(call)));
    }
    CelMap::from(m)
}

/// `request.mcp`: `method`, `tool` (empty unless `tools/call`) and `arguments` (a map).
fn mcp_map(call: &McpCall) -> CelMap<'static> {
    let mut m = Entries::with_capacity(3);
    put(&mut m, "method", call.method.clone());
    put(&mut m, "tool", call.tool().unwrap_or_default().to_owned());
    // A JSON object always converts; an empty map is the fallback, never a panic.
    let arguments = cel::to_value(&call.arguments)
        .ok()
        .and_then(|v| Box::<dyn Val>::try_from(v).ok())
        .unwrap_or_else(|| Box::new(CelMap::from(Entries::new())));
    m.insert(CelMapKey::from("arguments"), arguments);
    CelMap::from(m)
}

fn now_value(now: SystemTime) -> CelTimestamp {
    let (secs, nanos) = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => (-(e.duration().as_secs() as i64), 0),
    };
    let ts = chrono::DateTime::from_timestamp(secs, nanos).unwrap_or_default();
    CelTimestamp::from(ts.fixed_offset())
}
