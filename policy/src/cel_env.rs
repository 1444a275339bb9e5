//! CEL: compile once at load, evaluate against lazily built attributes.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cel::{Context, Program, Value};

use crate::request::Request;

/// The top-level variables PRODUCT.md documents; anything else is a load error.
const VARIABLES: [&str; 3] = ["source", "request", "now"];

pub(crate) struct CelExpr {
    source: String,
    program: Program,
    uses_request: bool,
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
        Ok(CelExpr {
            uses_request: refs.has_variable("request"),
            source: src.into(),
            program,
        })
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
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

/// Attribute values for one evaluation, built on first use so decisions that
/// touch no CEL never pay for them.
pub(crate) struct Activation<'a> {
    root: &'a Context<'static, 'static>,
    req: &'a Request<'a>,
    host: &'a str,
    scope: OnceCell<Context<'a, 'static>>,
}

pub(crate) type CelResult = Result<bool, String>;

impl<'a> Activation<'a> {
    /// `host` is the normalized request host.
    pub(crate) fn new(
        root: &'a Context<'static, 'static>,
        req: &'a Request<'a>,
        host: &'a str,
    ) -> Self {
        Activation {
            root,
            req,
            host,
            scope: OnceCell::new(),
        }
    }

    fn scope(&self) -> &Context<'a, 'static> {
        self.scope.get_or_init(|| {
            let mut c = self.root.new_inner_scope();
            c.add_variable_from_value("source", source_value(self.req));
            c.add_variable_from_value("request", request_value(self.req, self.host, None));
            c.add_variable_from_value("now", now_value(self.req.now));
            c
        })
    }

    /// Runs `expr`; `Ok(bool)` or the reason it could not decide. `llm_model`
    /// is set only for pathways that list `models`, which alone see `request.llm`.
    pub(crate) fn eval(&self, expr: &CelExpr, llm_model: Option<&str>) -> CelResult {
        let scope = self.scope();
        let result = match llm_model {
            Some(model) if expr.uses_request => {
                let mut inner = scope.new_inner_scope();
                inner.add_variable_from_value(
                    "request",
                    request_value(self.req, self.host, Some(model)),
                );
                expr.program.execute(&inner)
            }
            _ => expr.program.execute(scope),
        };
        match result {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("evaluated to {:?}, not a bool", other.type_of())),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn s(v: &str) -> Value {
    Value::String(Arc::new(v.to_owned()))
}

fn source_value(req: &Request<'_>) -> Value {
    let mut m: HashMap<&str, Value> = HashMap::with_capacity(4);
    m.insert("spiffe_id", s(req.source.as_str()));
    m.insert("trust_domain", s(req.source.trust_domain()));
    m.insert("path", s(req.source.path()));
    if let Some(a) = req.source_address {
        m.insert("address", s(&a.to_string()));
    }
    Value::from(m)
}

fn request_value(req: &Request<'_>, host: &str, llm_model: Option<&str>) -> Value {
    let mut headers: HashMap<String, Value> = HashMap::with_capacity(req.headers.len());
    for (k, v) in req.headers {
        let k = k.to_ascii_lowercase();
        match headers.get_mut(&k) {
            Some(Value::String(existing)) => {
                let joined = format!("{existing}, {v}");
                *existing = Arc::new(joined);
            }
            _ => {
                headers.insert(k, s(v));
            }
        }
    }
    let mut m: HashMap<&str, Value> = HashMap::with_capacity(9);
    m.insert("kind", s(req.kind.as_str()));
    m.insert("method", s(&req.method.to_ascii_uppercase()));
    m.insert("host", s(host));
    m.insert("port", Value::Int(i64::from(req.port)));
    m.insert("path", s(req.path));
    m.insert("query", s(req.query));
    m.insert("headers", Value::from(headers));
    if let Some(model) = llm_model {
        let mut llm: HashMap<&str, Value> = HashMap::with_capacity(1);
        llm.insert("model", s(model));
        m.insert("llm", Value::from(llm));
    }
    Value::from(m)
}

fn now_value(now: SystemTime) -> Value {
    let (secs, nanos) = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => (-(e.duration().as_secs() as i64), 0),
    };
    let ts = chrono::DateTime::from_timestamp(secs, nanos).unwrap_or_default();
    Value::Timestamp(ts.fixed_offset())
}
