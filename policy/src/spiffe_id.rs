//! A parsed, validated SPIFFE ID (`spiffe://trust-domain/path`).

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec caps URIs at 2048 bytes.
const MAX_LEN: usize = 2048;

/// A workload identity. Kept as one string so `as_str` and hashing are cheap;
/// the trust domain and path are slices of it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: Box<str>,
    td_end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("must start with `spiffe://`")]
    Scheme,
    #[error("longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("empty trust domain")]
    EmptyTrustDomain,
    #[error(
        "trust domain has invalid character {0:?} (allowed: a-z 0-9 . - _; no port or user info)"
    )]
    TrustDomainChar(char),
    #[error("missing path (a workload ID looks like spiffe://example.org/ns/x/sa/y)")]
    MissingPath,
    #[error("query or fragment not allowed")]
    QueryOrFragment,
    #[error("empty path segment")]
    EmptySegment,
    #[error("`.` and `..` path segments are not allowed")]
    DotSegment,
    #[error("path has invalid character {0:?} (allowed: a-z A-Z 0-9 . - _)")]
    PathChar(char),
}

pub(crate) fn is_trust_domain_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')
}

pub(crate) fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

/// Splits `spiffe://td/rest` into (`td`, `/rest`), checking scheme, length and
/// the trust domain. Shared with ID patterns so both follow the same rules.
pub(crate) fn split_id(s: &str) -> Result<(&str, &str), SpiffeIdError> {
    if s.len() > MAX_LEN {
        return Err(SpiffeIdError::TooLong);
    }
    let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
    if rest.contains(['?', '#']) {
        return Err(SpiffeIdError::QueryOrFragment);
    }
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if let Some(c) = td.chars().find(|c| !is_trust_domain_char(*c)) {
        return Err(SpiffeIdError::TrustDomainChar(c));
    }
    if path.is_empty() {
        return Err(SpiffeIdError::MissingPath);
    }
    Ok((td, path))
}

impl SpiffeId {
    pub fn trust_domain(&self) -> &str {
        &self.full[SCHEME.len()..self.td_end]
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// Path segments, without the leading `/`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path()[1..].split('/')
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (td, path) = split_id(s)?;
        for seg in path[1..].split('/') {
            match seg {
                "" => return Err(SpiffeIdError::EmptySegment),
                "." | ".." => return Err(SpiffeIdError::DotSegment),
                _ => {}
            }
            if let Some(c) = seg.chars().find(|c| !is_path_char(*c)) {
                return Err(SpiffeIdError::PathChar(c));
            }
        }
        Ok(SpiffeId {
            full: s.into(),
            td_end: SCHEME.len() + td.len(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id: SpiffeId = "spiffe://example.org/ns/ai/sa/research".parse().unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/ai/sa/research");
        assert_eq!(id.as_str(), "spiffe://example.org/ns/ai/sa/research");
        assert_eq!(id.to_string(), id.as_str());
        assert_eq!(
            id.segments().collect::<Vec<_>>(),
            ["ns", "ai", "sa", "research"]
        );
    }

    #[test]
    fn rejects_invalid_ids() {
        let cases = [
            ("http://example.org/x", SpiffeIdError::Scheme),
            ("SPIFFE://example.org/x", SpiffeIdError::Scheme),
            ("spiffe:///x", SpiffeIdError::EmptyTrustDomain),
            (
                "spiffe://Example.org/x",
                SpiffeIdError::TrustDomainChar('E'),
            ),
            (
                "spiffe://example.org:443/x",
                SpiffeIdError::TrustDomainChar(':'),
            ),
            (
                "spiffe://u@example.org/x",
                SpiffeIdError::TrustDomainChar('@'),
            ),
            ("spiffe://example.org", SpiffeIdError::MissingPath),
            ("spiffe://example.org/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a//b", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/", SpiffeIdError::EmptySegment),
            ("spiffe://example.org/a/../b", SpiffeIdError::DotSegment),
            ("spiffe://example.org/./b", SpiffeIdError::DotSegment),
            ("spiffe://example.org/a?x=1", SpiffeIdError::QueryOrFragment),
            ("spiffe://example.org/a#f", SpiffeIdError::QueryOrFragment),
            ("spiffe://example.org/a%20b", SpiffeIdError::PathChar('%')),
            ("spiffe://example.org/a*", SpiffeIdError::PathChar('*')),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<SpiffeId>().unwrap_err(), want, "{input}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(2100));
        assert_eq!(
            long.parse::<SpiffeId>().unwrap_err(),
            SpiffeIdError::TooLong
        );
    }
}
