//! Load errors. Every message names the file, where possible the line, the
//! rule/agent/pathway and the offending value.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The YAML does not parse or does not fit the schema.
    #[error("{}: {field}{message}", Loc(origin, *line, *column))]
    Yaml {
        origin: String,
        line: Option<u64>,
        column: Option<u64>,
        /// Field path, e.g. `agents[0].pathways[1].destinations[0]`; may be empty.
        field: String,
        message: String,
    },
    /// Parsed, but a value is not valid.
    #[error("{}: {context}: {message}", Loc(origin, *line, None))]
    Invalid {
        origin: String,
        line: Option<u64>,
        /// e.g. `agent "research-agent", pathway "wikipedia"`.
        context: String,
        message: String,
    },
    /// Several validation errors, in file order.
    #[error("{}", Joined(.0))]
    Many(Vec<PolicyError>),
}

impl PolicyError {
    /// The individual errors (one, or each of `Many`).
    pub fn errors(&self) -> Vec<&PolicyError> {
        match self {
            PolicyError::Many(v) => v.iter().collect(),
            e => vec![e],
        }
    }
}

struct Loc<'a>(&'a str, Option<u64>, Option<u64>);

impl fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)?;
        match (self.1, self.2) {
            (Some(l), Some(c)) if l > 0 => write!(f, ":{l}:{c}"),
            (Some(l), _) if l > 0 => write!(f, ":{l}"),
            _ => Ok(()),
        }
    }
}

struct Joined<'a>(&'a [PolicyError]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
