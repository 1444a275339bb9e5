//! Agent `id` patterns: an exact SPIFFE ID, or one with `*` / `**` path segments.
//!
//! - `*` matches exactly one path segment.
//! - `**` matches one or more segments and may only be the last segment.
//! - Wildcards are whole segments (`sa-*` is an error); the trust domain is never wildcarded.

use std::fmt;

use crate::spiffe_id::{is_path_char, split_id, SpiffeId, SpiffeIdError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    Exact(SpiffeId),
    Pattern(Pattern),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    trust_domain: String,
    segments: Vec<Segment>,
    /// Ends in `**`.
    rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdPatternError {
    #[error(transparent)]
    Id(#[from] SpiffeIdError),
    #[error("`**` may only be the last path segment")]
    DoubleStarNotLast,
    #[error("segment {0:?} mixes a wildcard with text; `*` and `**` must be whole segments")]
    PartialWildcard(String),
}

impl IdPattern {
    pub fn parse(s: &str) -> Result<IdPattern, IdPatternError> {
        if !s.contains('*') {
            return Ok(IdPattern::Exact(s.parse()?));
        }
        let (td, path) = split_id(s)?;
        let raw: Vec<&str> = path[1..].split('/').collect();
        let mut segments = Vec::with_capacity(raw.len());
        let mut rest = false;
        for (i, seg) in raw.iter().enumerate() {
            match *seg {
                "" => return Err(SpiffeIdError::EmptySegment.into()),
                "." | ".." => return Err(SpiffeIdError::DotSegment.into()),
                "*" => segments.push(Segment::Any),
                "**" if i + 1 == raw.len() => rest = true,
                "**" => return Err(IdPatternError::DoubleStarNotLast),
                s if s.contains('*') => return Err(IdPatternError::PartialWildcard(s.into())),
                s => {
                    if let Some(c) = s.chars().find(|c| !is_path_char(*c)) {
                        return Err(SpiffeIdError::PathChar(c).into());
                    }
                    segments.push(Segment::Literal(s.into()));
                }
            }
        }
        Ok(IdPattern::Pattern(Pattern {
            source: s.into(),
            trust_domain: td.into(),
            segments,
            rest,
        }))
    }

    pub fn trust_domain(&self) -> &str {
        match self {
            IdPattern::Exact(id) => id.trust_domain(),
            IdPattern::Pattern(p) => &p.trust_domain,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            IdPattern::Exact(id) => id.as_str(),
            IdPattern::Pattern(p) => &p.source,
        }
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdPattern::Exact(e) => e == id,
            IdPattern::Pattern(p) => p.matches(id),
        }
    }
}

impl Pattern {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if id.trust_domain() != self.trust_domain {
            return false;
        }
        let mut segs = id.segments();
        for want in &self.segments {
            match (want, segs.next()) {
                (_, None) => return false,
                (Segment::Any, Some(_)) => {}
                (Segment::Literal(l), Some(got)) if l == got => {}
                (Segment::Literal(_), Some(_)) => return false,
            }
        }
        let remaining = segs.count();
        if self.rest {
            remaining >= 1
        } else {
            remaining == 0
        }
    }

    /// `spiffe://td` plus the literal segments before the first wildcard: the
    /// key of the prefix index, so only patterns sharing a prefix with the
    /// peer's ID are tried.
    pub(crate) fn literal_prefix(&self) -> String {
        let mut key = format!("spiffe://{}", self.trust_domain);
        for seg in &self.segments {
            match seg {
                Segment::Literal(l) => {
                    key.push('/');
                    key.push_str(l);
                }
                Segment::Any => break,
            }
        }
        key
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn single_star_is_one_segment() {
        let p = IdPattern::parse("spiffe://example.org/ns/*/sa/research").unwrap();
        assert!(p.matches(&id("spiffe://example.org/ns/ai/sa/research")));
        assert!(!p.matches(&id("spiffe://example.org/ns/a/b/sa/research")));
        assert!(!p.matches(&id("spiffe://example.org/ns/sa/research")));
        assert!(!p.matches(&id("spiffe://other.org/ns/ai/sa/research")));
        let tail = IdPattern::parse("spiffe://example.org/ns/ai/sa/*").unwrap();
        assert!(tail.matches(&id("spiffe://example.org/ns/ai/sa/x")));
        assert!(!tail.matches(&id("spiffe://example.org/ns/ai/sa/x/y")));
        assert!(!tail.matches(&id("spiffe://example.org/ns/ai/sa")));
    }

    #[test]
    fn double_star_is_one_or_more_trailing_segments() {
        let p = IdPattern::parse("spiffe://example.org/ns/ai/**").unwrap();
        assert!(p.matches(&id("spiffe://example.org/ns/ai/sa")));
        assert!(p.matches(&id("spiffe://example.org/ns/ai/sa/x/y")));
        assert!(!p.matches(&id("spiffe://example.org/ns/ai")));
        assert!(!p.matches(&id("spiffe://example.org/ns/aix/sa")));
        let all = IdPattern::parse("spiffe://example.org/**").unwrap();
        assert!(all.matches(&id("spiffe://example.org/x")));
        assert!(!all.matches(&id("spiffe://example.com/x")));
    }

    #[test]
    fn rejects_bad_patterns() {
        assert_eq!(
            IdPattern::parse("spiffe://example.org/**/sa/x").unwrap_err(),
            IdPatternError::DoubleStarNotLast
        );
        assert_eq!(
            IdPattern::parse("spiffe://example.org/sa-*").unwrap_err(),
            IdPatternError::PartialWildcard("sa-*".into())
        );
        assert!(IdPattern::parse("spiffe://*.example.org/x").is_err());
        assert!(IdPattern::parse("spiffe://example.org/*//x").is_err());
        assert!(IdPattern::parse("spiffe://example.org").is_err());
    }

    #[test]
    fn literal_prefix() {
        let IdPattern::Pattern(p) = IdPattern::parse("spiffe://e.org/ns/ai/*/x").unwrap() else {
            panic!()
        };
        assert_eq!(p.literal_prefix(), "spiffe://e.org/ns/ai");
    }

    fn seg() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,4}"
    }

    proptest! {
        #[test]
        fn star_matches_exactly_one_segment(segs in prop::collection::vec(seg(), 1..6), pick in 0usize..6) {
            let pick = pick % segs.len();
            let idv = id(&format!("spiffe://example.org/{}", segs.join("/")));
            let mut pat: Vec<String> = segs.clone();
            pat[pick] = "*".into();
            let p = IdPattern::parse(&format!("spiffe://example.org/{}", pat.join("/"))).unwrap();
            prop_assert!(p.matches(&idv));
            // one segment more or less never matches a `*`-only pattern
            let longer = id(&format!("spiffe://example.org/{}/extra", segs.join("/")));
            prop_assert!(!p.matches(&longer));
        }

        #[test]
        fn double_star_matches_any_nonempty_tail(prefix in prop::collection::vec(seg(), 0..4), tail in prop::collection::vec(seg(), 0..4)) {
            let pat = if prefix.is_empty() { "spiffe://example.org/**".to_string() } else { format!("spiffe://example.org/{}/**", prefix.join("/")) };
            let p = IdPattern::parse(&pat).unwrap();
            let mut all = prefix.clone();
            all.extend(tail.iter().cloned());
            if all.is_empty() { return Ok(()); }
            let idv = id(&format!("spiffe://example.org/{}", all.join("/")));
            prop_assert_eq!(p.matches(&idv), !tail.is_empty());
        }

        #[test]
        fn exact_matches_only_itself(a in prop::collection::vec(seg(), 1..4), b in prop::collection::vec(seg(), 1..4)) {
            let ida = id(&format!("spiffe://example.org/{}", a.join("/")));
            let idb = id(&format!("spiffe://example.org/{}", b.join("/")));
            let p = IdPattern::parse(ida.as_str()).unwrap();
            prop_assert_eq!(p.matches(&idb), a == b);
        }
    }
}
