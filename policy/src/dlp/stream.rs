//! Scanning a body that arrives in chunks, in bounded memory.
//!
//! The scanner keeps the unsettled tail of the body: a little context before
//! the first unsettled offset, then everything after it. Each push rescans
//! that tail; matches are settled once enough bytes follow them, and each is
//! reported (and redacted) exactly once because later scans start after it.

use std::sync::Arc;

use super::detectors::{pem_block_end, BlockEnd};
use super::engine::{Engine, LOOKAHEAD};
use super::normalize::View;
use super::{BodyFormat, Findings, Literals};

/// The most bytes a stream scanner holds between pushes.
pub const WINDOW: usize = 16 * 1024;

/// Bytes kept before the first unsettled offset, for word boundaries and
/// validators that look behind a match (and escapes cut by the trim).
const CONTEXT: usize = 64;

/// A candidate that has not matched yet may start this far back: room for
/// the longest built-in prefix (a fine-grained GitHub token is 93 bytes, an
/// e-mail local part 64) with its escapes. Redacted output lags the input by
/// this much, so it is kept small; secret_file encodings and operator
/// patterns raise it (up to half the window).
const MIN_HOLD: usize = 256;
const OPERATOR_HOLD: usize = 1024;

/// Passing through, output does not wait for scans, so the tail is only
/// rescanned once this many new bytes have come in.
const SCAN_STEP: usize = 4096;
/// Redacting, a rescan per tiny chunk (SSE events) would cost more than it
/// saves in latency.
const REDACT_SCAN_STEP: usize = 64;

pub struct StreamScanner {
    engine: Arc<Engine>,
    format: BodyFormat,
    literals: Arc<Literals>,
    redact: bool,
    hold: usize,
    buf: Vec<u8>,
    /// Offset in `buf` before which every match is settled.
    scan_from: usize,
    /// Redacting: offset in `buf` up to which output was produced.
    emitted: usize,
    /// Inside a private-key block: offset in `buf` to resume looking for
    /// its end. The block's bytes are dropped when redacting.
    block: Option<usize>,
}

impl std::fmt::Debug for StreamScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamScanner")
            .field("redact", &self.redact)
            .field("held", &self.buf.len())
            .field("in_private_key", &self.block.is_some())
            .finish()
    }
}

impl StreamScanner {
    pub(crate) fn new(
        engine: Arc<Engine>,
        format: BodyFormat,
        literals: Arc<Literals>,
        redact: bool,
    ) -> StreamScanner {
        let min_hold = if engine.has_operator_patterns() {
            OPERATOR_HOLD
        } else {
            MIN_HOLD
        };
        let hold = (literals.max_len() + LOOKAHEAD + CONTEXT).clamp(min_hold, WINDOW / 2);
        StreamScanner {
            engine,
            format,
            literals,
            redact,
            hold,
            buf: Vec::new(),
            scan_from: 0,
            emitted: 0,
            block: None,
        }
    }

    /// Feeds the next chunk; returns the bytes that may be emitted now
    /// (redacted when redacting; otherwise the input passed through
    /// unchanged) and the findings settled by this call.
    pub fn push(&mut self, chunk: &[u8]) -> (Vec<u8>, Findings) {
        let mut out = Vec::new();
        if !self.redact {
            out.extend_from_slice(chunk);
        }
        self.buf.extend_from_slice(chunk);
        let findings = self.advance(false, &mut out);
        (out, findings)
    }

    /// End of body: everything still held back, scanned.
    pub fn finish(&mut self) -> (Vec<u8>, Findings) {
        let mut out = Vec::new();
        let findings = self.advance(true, &mut out);
        self.buf.clear();
        self.scan_from = 0;
        self.emitted = 0;
        self.block = None;
        (out, findings)
    }

    /// Bytes currently held back (for memory accounting).
    pub fn held_bytes(&self) -> usize {
        self.buf.len()
    }

    fn advance(&mut self, eof: bool, out: &mut Vec<u8>) -> Findings {
        let mut findings = Findings::default();
        loop {
            if let Some(resume) = self.block {
                match pem_block_end(&self.buf, resume, eof) {
                    BlockEnd::Closed(end) => {
                        self.block = None;
                        self.scan_from = end;
                        self.emitted = end;
                    }
                    BlockEnd::Open(resume) => {
                        self.block = Some(resume);
                        self.scan_from = resume;
                        self.emitted = resume;
                        break;
                    }
                }
            }
            let unsettled = self.buf.len() - self.scan_from;
            let step = if self.redact {
                REDACT_SCAN_STEP
            } else {
                SCAN_STEP
            };
            if !eof && unsettled < self.hold + step {
                break;
            }
            let view = View::new(&self.buf, self.format);
            let hold_limit = self.buf.len().saturating_sub(self.hold);
            let found = self.engine.find(
                &self.buf,
                &view,
                self.scan_from,
                eof,
                hold_limit,
                &self.literals,
            );
            for hit in &found.hits {
                findings.add(self.engine.name(hit.det));
            }
            if let Some((start, resume)) = found.open_block {
                if let Some(pk) = self.engine.private_key() {
                    findings.add(self.engine.name(pk));
                    if self.redact {
                        self.engine.write_redacted(
                            out,
                            &self.buf,
                            self.emitted,
                            start,
                            &found.hits,
                            self.format,
                        );
                        self.engine.write_marker(
                            out,
                            &self.buf,
                            start,
                            self.buf.len(),
                            pk,
                            self.format,
                        );
                    }
                }
                self.block = Some(resume);
                self.emitted = resume;
                self.scan_from = resume;
                continue;
            }
            let mut next = found.next_from;
            if self.redact {
                self.engine.write_redacted(
                    out,
                    &self.buf,
                    self.emitted,
                    next,
                    &found.hits,
                    self.format,
                );
                self.emitted = next;
            }
            // A candidate still growing after a whole window (a run of token
            // characters that long is no real credential) is given up on, to
            // keep memory bounded; when redacting, what was held of it goes.
            if !eof && self.buf.len() - next + CONTEXT > WINDOW {
                let forced = self.buf.len() - self.hold;
                if self.redact {
                    match found.pending {
                        Some((start, det)) if start >= next && start < forced => {
                            out.extend_from_slice(&self.buf[next..start]);
                            self.engine.write_marker(
                                out,
                                &self.buf,
                                start,
                                forced,
                                det,
                                self.format,
                            );
                            findings.add(self.engine.name(det));
                        }
                        _ => out.extend_from_slice(&self.buf[next..forced]),
                    }
                    self.emitted = forced;
                }
                next = forced;
            }
            self.scan_from = next;
            if !self.redact {
                self.emitted = next;
            }
            break;
        }
        self.trim();
        findings
    }

    /// Drops bytes no later scan needs.
    fn trim(&mut self) {
        let keep = self.scan_from.min(self.emitted).saturating_sub(CONTEXT);
        if keep == 0 {
            return;
        }
        self.buf.drain(..keep);
        self.scan_from -= keep;
        self.emitted -= keep;
        if let Some(b) = &mut self.block {
            *b -= keep;
        }
    }
}
