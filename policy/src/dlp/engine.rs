//! Compiled detectors and the matching core shared by whole-body scans and
//! the stream scanner: candidates from every detector, validated, mapped to
//! raw spans and reduced to non-overlapping hits.

use std::cmp::Reverse;
use std::sync::Arc;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use super::detectors::{
    number_starts, pem_block_end, BlockEnd, Search, Validator, ANCHORED_SPAN, BUILTINS,
    PRIVATE_KEY, SECRET_FILE,
};
use super::normalize::View;
use super::{BodyFormat, DetectorSet, DlpError, Literals, Pattern, REDACTED_PREFIX};

/// Raw bytes a match must end before the end of the buffer to be final in a
/// stream: room for the validators' look-ahead and a whole escape after it
/// (`\ud83d\ude00` is 12 bytes).
pub(crate) const LOOKAHEAD: usize = 32;

/// Compiled-program limits for operator patterns, so one pattern cannot
/// make compile time or memory explode.
const OPERATOR_SIZE_LIMIT: usize = 1 << 20;
/// The lazy DFA of the combined set needs room for many states on dense
/// inputs (base64); when its cache thrashes it falls back to a slow engine.
const DFA_SIZE_LIMIT: usize = 8 << 20;

struct Detector {
    regex: Regex,
    /// For [`Search::DigitRun`] and [`Search::Iban`]: the pattern anchored.
    anchored: Option<Regex>,
    validate: Option<Validator>,
    search: Search,
}

pub(crate) struct Engine {
    /// Indexed by detector id; `secret_file` has a name but no regex.
    names: Vec<Arc<str>>,
    detectors: Vec<Option<Detector>>,
    /// One pass over the body tells which detectors can match at all.
    builtin_set: Option<(RegexSet, Vec<usize>)>,
    /// Detectors searched on their own ([`Search::Direct`]).
    direct: Vec<usize>,
    /// Detectors tried only where a number starts.
    anchored: Vec<usize>,
    /// The fewest digits a run needs for any anchored digit detector.
    min_run_digits: usize,
    /// Kept apart: operator patterns may use Unicode classes that would
    /// slow the built-in set down.
    operator_set: Option<(RegexSet, Vec<usize>)>,
    secret_file: Option<usize>,
    private_key: Option<usize>,
}

/// A settled match: raw span and detector id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hit {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) det: usize,
}

pub(crate) struct Found {
    /// Sorted, non-overlapping.
    pub(crate) hits: Vec<Hit>,
    /// A private-key block that had not ended by the end of the buffer:
    /// its start and where to resume looking for its end.
    pub(crate) open_block: Option<(usize, usize)>,
    /// The earliest candidate that reached into the last bytes of the
    /// buffer and must wait for more: raw start and detector.
    pub(crate) pending: Option<(usize, usize)>,
    /// Matches starting before this raw offset are settled.
    pub(crate) next_from: usize,
}

struct Candidate {
    start: usize,
    end: usize,
    det: usize,
    /// For an unfinished private-key block: where to resume.
    open: Option<usize>,
}

impl Engine {
    pub(crate) fn new(sets: &[DetectorSet], patterns: &[Pattern]) -> Result<Engine, DlpError> {
        let mut names: Vec<Arc<str>> = Vec::new();
        let mut detectors = Vec::new();
        let mut builtin_regexes = Vec::new();
        let mut builtin_ids = Vec::new();
        let mut private_key = None;
        let mut secret_file = None;
        let mut direct = Vec::new();
        let mut anchored_ids = Vec::new();
        let mut min_run_digits = usize::MAX;
        let compile = |name: &str, pattern: &str| {
            RegexBuilder::new(pattern)
                .dfa_size_limit(DFA_SIZE_LIMIT)
                .build()
                .map_err(|e| DlpError::BadPattern {
                    name: name.to_owned(),
                    reason: e.to_string(),
                })
        };
        for set in DetectorSet::ALL {
            if !sets.contains(&set) {
                continue;
            }
            for b in BUILTINS.iter().filter(|b| b.set == set) {
                let regex = compile(b.name, b.regex)?;
                let id = names.len();
                if b.name == PRIVATE_KEY {
                    private_key = Some(id);
                }
                let anchored = match b.search {
                    Search::Set => {
                        builtin_regexes.push(b.regex);
                        builtin_ids.push(id);
                        None
                    }
                    Search::Direct => {
                        direct.push(id);
                        None
                    }
                    Search::DigitRun {
                        min_digits,
                        anchored,
                    } => {
                        min_run_digits = min_run_digits.min(min_digits);
                        anchored_ids.push(id);
                        Some(compile(b.name, anchored)?)
                    }
                    Search::Iban { anchored } => {
                        anchored_ids.push(id);
                        Some(compile(b.name, anchored)?)
                    }
                };
                names.push(Arc::from(b.name));
                detectors.push(Some(Detector {
                    regex,
                    anchored,
                    validate: b.validate,
                    search: b.search,
                }));
            }
            if set == DetectorSet::Secrets {
                secret_file = Some(names.len());
                names.push(Arc::from(SECRET_FILE));
                detectors.push(None);
            }
        }
        let builtin_set = if builtin_regexes.is_empty() {
            None
        } else {
            let set = RegexSetBuilder::new(&builtin_regexes)
                .dfa_size_limit(DFA_SIZE_LIMIT)
                .build()
                .map_err(|e| DlpError::BadPattern {
                    name: "built-in set".to_owned(),
                    reason: e.to_string(),
                })?;
            Some((set, builtin_ids))
        };

        let mut operator_regexes = Vec::new();
        let mut operator_ids = Vec::new();
        for p in patterns {
            check_name(&p.name, &names)?;
            let bad = |reason: String| DlpError::BadPattern {
                name: p.name.clone(),
                reason,
            };
            let regex = RegexBuilder::new(&p.regex)
                .size_limit(OPERATOR_SIZE_LIMIT)
                .dfa_size_limit(DFA_SIZE_LIMIT)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            if regex.is_match(b"") {
                return Err(bad("matches the empty string".to_owned()));
            }
            let id = names.len();
            names.push(Arc::from(p.name.as_str()));
            detectors.push(Some(Detector {
                regex,
                anchored: None,
                validate: None,
                search: Search::Set,
            }));
            operator_regexes.push(p.regex.as_str());
            operator_ids.push(id);
        }
        let operator_set = if operator_regexes.is_empty() {
            None
        } else {
            let set = RegexSetBuilder::new(&operator_regexes)
                .size_limit(OPERATOR_SIZE_LIMIT.saturating_mul(operator_regexes.len()))
                .dfa_size_limit(DFA_SIZE_LIMIT)
                .build()
                .map_err(|e| DlpError::BadPattern {
                    name: patterns
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    reason: e.to_string(),
                })?;
            Some((set, operator_ids))
        };
        Ok(Engine {
            names,
            detectors,
            builtin_set,
            direct,
            anchored: anchored_ids,
            min_run_digits,
            operator_set,
            secret_file,
            private_key,
        })
    }

    pub(crate) fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    pub(crate) fn has_operator_patterns(&self) -> bool {
        self.operator_set.is_some()
    }

    pub(crate) fn private_key(&self) -> Option<usize> {
        self.private_key
    }

    pub(crate) fn name(&self, det: usize) -> &Arc<str> {
        &self.names[det]
    }

    /// Finds the hits starting at or after raw offset `from` (earlier bytes
    /// are context only). Unless `eof`, candidates too close to the end of
    /// `raw` are left pending, and no hit may start at or after `hold_limit`.
    pub(crate) fn find(
        &self,
        raw: &[u8],
        view: &View<'_>,
        from: usize,
        eof: bool,
        hold_limit: usize,
        literals: &Literals,
    ) -> Found {
        let v = view.bytes();
        let vfrom = view.view_offset(from);
        let mut c = Collector {
            raw,
            view,
            eof,
            edge: if eof {
                usize::MAX
            } else {
                raw.len().saturating_sub(LOOKAHEAD)
            },
            cands: Vec::new(),
            pending: None,
            private_key: self.private_key,
        };

        let mut unanchored = self.direct.clone();
        for (set, ids) in [&self.builtin_set, &self.operator_set]
            .into_iter()
            .flatten()
        {
            unanchored.extend(set.matches_at(v, vfrom).iter().map(|idx| ids[idx]));
        }
        for det in unanchored {
            let Some(d) = &self.detectors[det] else {
                continue;
            };
            let mut at = vfrom;
            while at <= v.len() {
                let Some(m) = d.regex.find_at(v, at) else {
                    break;
                };
                if m.start() == m.end() {
                    at = m.end() + 1;
                    continue;
                }
                at = m.end();
                if !c.consider(det, d, m.start(), m.end()) {
                    break;
                }
            }
        }

        if !self.anchored.is_empty() {
            let starts = number_starts(v, vfrom, self.min_run_digits);
            for &det in &self.anchored {
                let Some(d) = &self.detectors[det] else {
                    continue;
                };
                let Some(anchored) = &d.anchored else {
                    continue;
                };
                let positions: Box<dyn Iterator<Item = usize> + '_> = match d.search {
                    Search::DigitRun { min_digits, .. } => Box::new(
                        starts
                            .digit_runs
                            .iter()
                            .filter(move |(_, n)| *n >= min_digits)
                            .map(|(p, _)| *p),
                    ),
                    _ => Box::new(starts.ibans.iter().copied()),
                };
                // Trying each possible start in order and skipping those
                // inside the previous match is what `find_iter` would do.
                let mut next = 0;
                for p in positions {
                    if p < next {
                        continue;
                    }
                    let end = v.len().min(p + ANCHORED_SPAN);
                    let Some(m) = anchored.find(&v[p..end]) else {
                        continue;
                    };
                    next = p + m.end();
                    if !c.consider(det, d, p, p + m.end()) {
                        break;
                    }
                }
            }
        }
        let edge = c.edge;
        let Collector {
            mut cands,
            mut pending,
            ..
        } = c;
        let mut note_pending = |start: usize, det: usize| {
            if pending.is_none_or(|(s, _)| start < s) {
                pending = Some((start, det));
            }
        };

        if let Some(det) = self.secret_file {
            let mut add = |rs: usize, re: usize| {
                if re > edge {
                    note_pending(rs, det);
                } else {
                    cands.push(Candidate {
                        start: rs,
                        end: re,
                        det,
                        open: None,
                    });
                }
            };
            literals.find(v, vfrom, |s, e| {
                let (rs, re) = view.raw_span(s, e);
                add(rs, re);
            });
            // Decoding would have altered a value holding `\`, `%` or `+`.
            if view.is_decoded() && literals.needs_raw() {
                literals.find(raw, from, &mut add);
            }
        }

        resolve(cands, from, raw.len(), eof, hold_limit, pending)
    }

    /// Writes `raw[from..to]` with each hit (all inside it) replaced by its
    /// marker.
    pub(crate) fn write_redacted(
        &self,
        out: &mut Vec<u8>,
        raw: &[u8],
        from: usize,
        to: usize,
        hits: &[Hit],
        format: BodyFormat,
    ) {
        let mut pos = from;
        for h in hits {
            out.extend_from_slice(&raw[pos..h.start]);
            self.write_marker(out, raw, h.start, h.end, h.det, format);
            pos = h.end;
        }
        out.extend_from_slice(&raw[pos..to]);
    }

    pub(crate) fn write_marker(
        &self,
        out: &mut Vec<u8>,
        raw: &[u8],
        start: usize,
        end: usize,
        det: usize,
        format: BodyFormat,
    ) {
        // A card number written as a bare JSON number becomes a string, or
        // the marker would break the document.
        let quote = format == BodyFormat::Json && is_bare_json_number(raw, start, end);
        if quote {
            out.push(b'"');
        }
        out.extend_from_slice(REDACTED_PREFIX.as_bytes());
        out.extend_from_slice(self.names[det].as_bytes());
        out.push(b']');
        if quote {
            out.push(b'"');
        }
    }
}

/// Turns regex matches into validated candidates with raw spans.
struct Collector<'r, 'v> {
    raw: &'r [u8],
    view: &'v View<'r>,
    eof: bool,
    /// Unless at end of body, a match ending past this raw offset may still
    /// grow: it is pending.
    edge: usize,
    cands: Vec<Candidate>,
    pending: Option<(usize, usize)>,
    private_key: Option<usize>,
}

impl Collector<'_, '_> {
    /// Considers the match `view[start..end]` of detector `det`; false when
    /// it is pending, so later matches of the same detector must wait too.
    fn consider(&mut self, det: usize, d: &Detector, start: usize, end: usize) -> bool {
        let v = self.view.bytes();
        let (rs, re) = self.view.raw_span(start, end);
        if re > self.edge {
            if self.pending.is_none_or(|(s, _)| rs < s) {
                self.pending = Some((rs, det));
            }
            return false;
        }
        let vend = match d.validate {
            Some(f) => match f(v, start, end) {
                Some(e) => e,
                None => return true,
            },
            None => end,
        };
        let (rs, re) = self.view.raw_span(start, vend);
        if Some(det) == self.private_key {
            // The header is the finding; the block is what goes.
            match pem_block_end(self.raw, re, self.eof) {
                BlockEnd::Closed(e) => self.cands.push(Candidate {
                    start: rs,
                    end: e,
                    det,
                    open: None,
                }),
                BlockEnd::Open(resume) => self.cands.push(Candidate {
                    start: rs,
                    end: self.raw.len(),
                    det,
                    open: Some(resume),
                }),
            }
        } else {
            self.cands.push(Candidate {
                start: rs,
                end: re,
                det,
                open: None,
            });
        }
        true
    }
}

fn check_name(name: &str, taken: &[Arc<str>]) -> Result<(), DlpError> {
    if name.is_empty() {
        return Err(DlpError::EmptyName);
    }
    if BUILTINS.iter().any(|b| b.name == name) || name == SECRET_FILE {
        return Err(DlpError::ReservedName(name.to_owned()));
    }
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(DlpError::BadName(name.to_owned()));
    }
    if taken.iter().any(|t| &**t == name) {
        return Err(DlpError::DuplicateName(name.to_owned()));
    }
    Ok(())
}

fn is_bare_json_number(raw: &[u8], start: usize, end: usize) -> bool {
    if !raw[start..end].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let before = raw[..start].iter().rev().find(|b| !b.is_ascii_whitespace());
    let after = raw[end..].iter().find(|b| !b.is_ascii_whitespace());
    matches!(before, Some(b':' | b'[' | b',')) && matches!(after, None | Some(b',' | b']' | b'}'))
}

/// Greedy, leftmost-longest: keeps candidates that do not overlap an earlier
/// kept one, and stops where a pending candidate could still change that.
fn resolve(
    mut cands: Vec<Candidate>,
    from: usize,
    len: usize,
    eof: bool,
    hold_limit: usize,
    pending: Option<(usize, usize)>,
) -> Found {
    cands.sort_by_key(|c| (c.start, Reverse(c.end), c.det));
    let pending_start = pending.map_or(usize::MAX, |(s, _)| s);
    let mut limit = if eof {
        usize::MAX
    } else {
        pending_start.min(hold_limit)
    };
    let mut hits = Vec::new();
    let mut last_end = from;
    let mut open_block = None;
    for c in cands {
        if c.start >= limit {
            break;
        }
        if c.start < last_end {
            continue;
        }
        if let Some(resume) = c.open {
            // Everything after the header belongs to the block, pending
            // candidates included.
            open_block = Some((c.start, resume));
            last_end = len;
            break;
        }
        if c.end > pending_start {
            limit = c.start;
            break;
        }
        last_end = c.end;
        hits.push(Hit {
            start: c.start,
            end: c.end,
            det: c.det,
        });
    }
    let next_from = if eof || open_block.is_some() {
        len
    } else {
        last_end.max(limit.min(len))
    };
    Found {
        hits,
        open_block,
        pending: if open_block.is_some() { None } else { pending },
        next_from,
    }
}
