//! Egress DLP: finds secrets, PII and operator-defined patterns in HTTP
//! bodies, and redacts them.
//!
//! Bodies are matched through a decoded view (JSON string escapes and
//! percent-encoding undone) so that an escaped secret is still found, and
//! redaction replaces the raw bytes behind each match, keeping a JSON body
//! JSON and a form a form. Pure and synchronous: callers decode
//! `Content-Encoding` first.
//!
//! ```
//! use egress_policy::dlp::{BodyFormat, DetectorSet, Literals, Scanner};
//! let scanner = Scanner::new(&[DetectorSet::Secrets], &[]).unwrap();
//! let body = br#"{"note":"key AKIAIOSFODNN7EXAMPLE"}"#;
//! let (redacted, findings) = scanner.redact(body, BodyFormat::Json, &Literals::empty());
//! assert_eq!(findings.first(), Some("aws_access_key_id"));
//! assert_eq!(redacted, br#"{"note":"key [REDACTED:aws_access_key_id]"}"#);
//! ```

mod detectors;
mod engine;
mod literals;
mod normalize;
mod stream;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use literals::Literals;
pub use stream::{StreamScanner, WINDOW};

use engine::Engine;
use normalize::View;

/// What every redacted span starts with; the detector name and `]` follow.
pub const REDACTED_PREFIX: &str = "[REDACTED:";

/// A built-in set of detectors named in policy: `secrets` or `pii`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DetectorSet {
    Secrets,
    Pii,
}

impl DetectorSet {
    pub const ALL: [DetectorSet; 2] = [DetectorSet::Secrets, DetectorSet::Pii];

    pub fn as_str(self) -> &'static str {
        match self {
            DetectorSet::Secrets => "secrets",
            DetectorSet::Pii => "pii",
        }
    }
}

impl fmt::Display for DetectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DetectorSet {
    type Err = DlpError;

    fn from_str(s: &str) -> Result<DetectorSet, DlpError> {
        DetectorSet::ALL
            .into_iter()
            .find(|set| set.as_str() == s)
            .ok_or_else(|| DlpError::UnknownDetectorSet(s.to_owned()))
    }
}

/// An operator-defined pattern; its matches are reported under `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub name: String,
    pub regex: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    #[error("unknown detector set {0:?} (valid: secrets, pii)")]
    UnknownDetectorSet(String),
    #[error("pattern {name:?}: {reason}")]
    BadPattern { name: String, reason: String },
    #[error("pattern name {0:?} is the name of a built-in detector")]
    ReservedName(String),
    #[error("pattern name {0:?} is used more than once")]
    DuplicateName(String),
    #[error("pattern name is empty")]
    EmptyName,
    /// Names end up inside `[REDACTED:<name>]` in JSON and form bodies.
    #[error(
        "pattern name {0:?} may only hold ASCII letters, digits, '_', '-' and '.' (at most 64)"
    )]
    BadName(String),
}

/// How the body is to be read, from its Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// JSON, NDJSON and server-sent events: string escapes are decoded.
    Json,
    /// `application/x-www-form-urlencoded`: percent-encoding and `+`.
    Form,
    /// Anything else; escapes are decoded too, as they are cheap to undo.
    Text,
}

impl BodyFormat {
    pub fn from_content_type(ct: Option<&str>) -> BodyFormat {
        let Some(ct) = ct else {
            return BodyFormat::Text;
        };
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json"
            | "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/json-seq"
            | "text/event-stream" => BodyFormat::Json,
            "application/x-www-form-urlencoded" => BodyFormat::Form,
            e if e.ends_with("+json") => BodyFormat::Json,
            _ => BodyFormat::Text,
        }
    }
}

/// Counts per detector name, sorted by name. Never holds matched text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    counts: BTreeMap<Arc<str>, u32>,
}

impl Findings {
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.counts.iter().map(|(k, v)| (&**k, *v))
    }

    pub fn total(&self) -> u32 {
        self.counts.values().fold(0u32, |a, v| a.saturating_add(*v))
    }

    pub fn merge(&mut self, other: &Findings) {
        for (name, n) in &other.counts {
            self.add_n(name, *n);
        }
    }

    /// The first detector by name.
    pub fn first(&self) -> Option<&str> {
        self.counts.keys().next().map(|k| &**k)
    }

    /// How many times `detector` was found.
    pub fn get(&self, detector: &str) -> u32 {
        self.counts.get(detector).copied().unwrap_or(0)
    }

    pub(crate) fn add(&mut self, name: &Arc<str>) {
        self.add_n(name, 1);
    }

    fn add_n(&mut self, name: &Arc<str>, n: u32) {
        match self.counts.get_mut(&**name) {
            Some(c) => *c = c.saturating_add(n),
            None => {
                self.counts.insert(Arc::clone(name), n);
            }
        }
    }
}

/// A compiled scanner: cheap to clone, shareable across threads.
#[derive(Clone)]
pub struct Scanner {
    engine: Arc<Engine>,
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field("detectors", &self.detector_names())
            .finish()
    }
}

impl Scanner {
    pub fn new(sets: &[DetectorSet], patterns: &[Pattern]) -> Result<Scanner, DlpError> {
        Ok(Scanner {
            engine: Arc::new(Engine::new(sets, patterns)?),
        })
    }

    /// Every detector name this scanner can report.
    pub fn detector_names(&self) -> Vec<&str> {
        self.engine.names().iter().map(|n| &**n).collect()
    }

    pub fn scan(&self, body: &[u8], format: BodyFormat, literals: &Literals) -> Findings {
        let view = View::new(body, format);
        let found = self.engine.find(body, &view, 0, true, body.len(), literals);
        let mut findings = Findings::default();
        for hit in &found.hits {
            findings.add(self.engine.name(hit.det));
        }
        findings
    }

    /// The body with every finding replaced by `[REDACTED:<detector>]`, and
    /// the findings.
    pub fn redact(
        &self,
        body: &[u8],
        format: BodyFormat,
        literals: &Literals,
    ) -> (Vec<u8>, Findings) {
        let view = View::new(body, format);
        let found = self.engine.find(body, &view, 0, true, body.len(), literals);
        let mut findings = Findings::default();
        for hit in &found.hits {
            findings.add(self.engine.name(hit.det));
        }
        if found.hits.is_empty() {
            return (body.to_vec(), findings);
        }
        let mut out = Vec::with_capacity(body.len());
        self.engine
            .write_redacted(&mut out, body, 0, body.len(), &found.hits, format);
        (out, findings)
    }

    /// Scans a body that arrives in chunks (a streamed response, SSE), in
    /// bounded memory: at most [`WINDOW`] bytes are held besides the chunk.
    pub fn stream(
        &self,
        format: BodyFormat,
        literals: Arc<Literals>,
        redact: bool,
    ) -> StreamScanner {
        StreamScanner::new(Arc::clone(&self.engine), format, literals, redact)
    }
}
