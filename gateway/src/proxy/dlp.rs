//! Egress DLP on L7 pathways (`inspect:`): request bodies are read whole (bounded,
//! decoded) and scanned before anything is forwarded; responses are scanned as they
//! stream, in bounded memory. What the scanner finds is counted per detector on the
//! audit line and the span, never the matched text.
//!
//! Fail closed: a request body larger than the pathway's limit is 413, one in a coding
//! the gateway cannot decode 415; a response under inspection that cannot be decoded
//! is cut and the audit line says so.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use egress_policy::dlp::{BodyFormat, Findings, Literals, StreamScanner};
use egress_policy::inspect::{DlpAction, Inspect, Scan, DEFAULT_INSPECT_BODY_LIMIT};
use egress_policy::{Mode, Pathway};
use http::header::{self, HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::encoding::{self, Bounded, Coding, Decoder};
use super::exchange::{DlpReport, Exchange};
use super::guard::{Question, Verdict};
use super::refusal::Refusal;
use super::request_body::ReqBody;
use super::{PeerIdentity, Proxy};
use crate::audit::DlpFinding;

/// A response chunk that decodes to more than this is not inspected: the stream is cut
/// (a compression bomb must not make the gateway buffer it).
const MAX_DECODED_CHUNK: usize = 16 * 1024 * 1024;

pub const REQUEST: &str = "request";
pub const RESPONSE: &str = "response";

/// The body's format for the scanner, from `Content-Type`.
pub fn body_format(headers: &HeaderMap) -> BodyFormat {
    BodyFormat::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )
}

/// Findings as audit entries.
pub fn audit_entries(
    findings: &Findings,
    direction: &'static str,
    action: DlpAction,
) -> Vec<DlpFinding> {
    findings
        .iter()
        .map(|(detector, count)| DlpFinding {
            detector: detector.to_owned(),
            direction,
            action: action.as_str(),
            count,
        })
        .collect()
}

/// The detectors named in a refusal: `openai_api_key, email`.
fn named(findings: &Findings) -> String {
    findings
        .iter()
        .map(|(d, _)| d)
        .collect::<Vec<_>>()
        .join(", ")
}

/// DLP of the request phase: reads the body (bounded by the pathway's `max_request_body_bytes`
/// or [`egress_policy::inspect::DEFAULT_INSPECT_BODY_LIMIT`]), decodes it, scans it
/// and applies the action. Returns the body to forward (redacted ones decoded, without
/// `Content-Encoding`) and the decoded text for the guard.
async fn scan_request(
    ex: &mut Exchange,
    inspect: &Inspect,
    limit: u64,
    literals: &Literals,
    pathway: &str,
    headers: &mut HeaderMap,
    body: ReqBody,
) -> Result<(Bytes, Bytes), (Refusal, Option<Bytes>)> {
    let body = body.buffer(headers, limit).await.map_err(|r| (r, None))?;
    let ReqBody::Buffered(raw) = body else {
        return Err((
            Refusal::BadRequest("cannot read the request body".into()),
            None,
        ));
    };
    // The decoded text is what is scanned (and what the guard reads); without a
    // content coding it is the body itself, not a copy.
    let text = match super::llm::decoded_request_body(headers, &raw, limit) {
        Ok(std::borrow::Cow::Borrowed(_)) => raw.clone(),
        Ok(std::borrow::Cow::Owned(decoded)) => Bytes::from(decoded),
        Err(refusal) => return Err((refusal, None)),
    };
    let Some(scan) = &inspect.request else {
        return Ok((raw, text));
    };
    let format = body_format(headers);
    match scan.action {
        DlpAction::Redact => {
            let (out, findings) = scan.scanner.redact(&text, format, literals);
            if findings.is_empty() {
                return Ok((raw, text));
            }
            ex.add_dlp(audit_entries(&findings, REQUEST, scan.action));
            // What is forwarded is the redacted decoded text.
            let out = Bytes::from(out);
            headers.remove(header::CONTENT_ENCODING);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            Ok((out.clone(), out))
        }
        DlpAction::Deny | DlpAction::Audit => {
            let findings = scan.scanner.scan(&text, format, literals);
            if findings.is_empty() {
                return Ok((raw, text));
            }
            ex.add_dlp(audit_entries(&findings, REQUEST, scan.action));
            if scan.action == DlpAction::Deny {
                let refusal = Refusal::Denied {
                    reason: format!(
                        "request body contains {} (inspect.request of pathway `{pathway}` denies it)",
                        named(&findings)
                    ),
                    rule: None,
                    code: "dlp_request_finding",
                };
                return Err((refusal, Some(raw)));
            }
            Ok((raw, text))
        }
    }
}

impl Proxy {
    /// Request phase of `inspect` on the pathway that allowed the request: DLP on the
    /// body, then the guard. Returns the body to forward.
    pub(super) async fn inspect_request(
        &self,
        ex: &mut Exchange,
        peer: &PeerIdentity,
        pathway: &Pathway,
        headers: &mut HeaderMap,
        body: ReqBody,
    ) -> Result<ReqBody, Refusal> {
        let Some(inspect) = &pathway.inspect else {
            return Ok(body);
        };
        // `mode: audit` logs what `deny` would have refused and forwards it.
        let enforce = self.policy.current().mode() == Mode::Enforce;
        match self
            .inspect_request_enforced(ex, peer, pathway, inspect, headers, body)
            .await
        {
            Err((Refusal::Denied { reason, .. }, Some(body))) if !enforce => {
                ex.would_deny(&reason);
                Ok(ReqBody::Buffered(body))
            }
            Err((refusal, _)) => Err(refusal),
            Ok(body) => Ok(body),
        }
    }

    /// The request phase as `mode: enforce` applies it; a denial comes with the body
    /// that would have been forwarded.
    async fn inspect_request_enforced(
        &self,
        ex: &mut Exchange,
        peer: &PeerIdentity,
        pathway: &Pathway,
        inspect: &Inspect,
        headers: &mut HeaderMap,
        body: ReqBody,
    ) -> Result<ReqBody, (Refusal, Option<Bytes>)> {
        if inspect.request.is_none() && inspect.guard.is_none() {
            return Ok(body);
        }
        let limit = pathway
            .limits
            .max_request_body_bytes
            .unwrap_or(DEFAULT_INSPECT_BODY_LIMIT);
        let literals = self.secrets.literals();
        let (body, text) =
            scan_request(ex, inspect, limit, &literals, &pathway.name, headers, body).await?;
        let Some(guard) = &inspect.guard else {
            return Ok(ReqBody::Buffered(body));
        };
        let prompt = super::guard::prompt_text(&text);
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let verdict = self
            .guard
            .ask(
                guard,
                &Question {
                    source: peer.spiffe_id.as_str(),
                    pathway: &pathway.name,
                    direction: REQUEST,
                    content_type,
                    text: &prompt,
                },
            )
            .await;
        ex.set_guard(verdict.outcome());
        let unavailable = |why: String| {
            if guard.allow_on_error {
                tracing::warn!(pathway = %pathway.name, error = %why, "guard unavailable; forwarding (on_error: allow)");
                Ok(())
            } else {
                Err(Refusal::Denied {
                    reason: format!(
                        "{why}; inspect.guard of pathway `{}` denies on error",
                        pathway.name
                    ),
                    rule: None,
                    code: "guard_unavailable",
                })
            }
        };
        match verdict {
            Verdict::Allow => Ok(()),
            Verdict::Deny(reason) => Err(Refusal::Denied {
                reason: format!(
                    "the guard of pathway `{}` denied the request: {reason}",
                    pathway.name
                ),
                rule: None,
                code: "guard_denied",
            }),
            Verdict::Timeout => unavailable(format!(
                "the guard did not answer within {:?}",
                guard.timeout
            )),
            Verdict::Error(e) => unavailable(e),
        }
        .map_err(|refusal| (refusal, Some(body.clone())))?;
        Ok(ReqBody::Buffered(body))
    }
}

/// How the response is inspected, decided from its headers before its body is read.
pub enum ResponseInspection {
    /// Read whole (bounded), scanned, then answered: a `deny` on a response that is
    /// not an event stream, so a finding can still be a 403.
    Buffer { coding: Coding },
    /// Scanned as it streams; decoded from `coding` first.
    Stream { coding: Coding },
}

/// Response phase, headers: fixes the headers for a body that will be rewritten
/// (decoded, possibly redacted) and says how to read it. `Err`: the response cannot be
/// inspected (a coding the gateway does not decode).
pub fn plan_response(scan: &Scan, headers: &mut HeaderMap) -> Result<ResponseInspection, Refusal> {
    let coding = Coding::of(headers).map_err(|e| {
        Refusal::UpstreamUnreachable(format!("the response cannot be inspected: {e}"))
    })?;
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"));
    if scan.action == DlpAction::Deny && !sse {
        return Ok(ResponseInspection::Buffer { coding });
    }
    // The agent gets the decoded (and, redacting, rewritten) bytes.
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::CONTENT_ENCODING);
    Ok(ResponseInspection::Stream { coding })
}

/// Reads a whole response under a `deny` scan: `Ok(body)` to pass on unchanged, or the
/// refusal (403 for a finding, 502 for a body too large or undecodable to inspect).
pub async fn buffer_response(
    ex: &mut Exchange,
    scan: &Scan,
    literals: &Literals,
    coding: Coding,
    format: BodyFormat,
    pathway: &Pathway,
    body: Incoming,
) -> Result<Bytes, Refusal> {
    let limit = pathway
        .limits
        .max_request_body_bytes
        .unwrap_or(DEFAULT_INSPECT_BODY_LIMIT);
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    let raw = match http_body_util::Limited::new(body, cap).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Refusal::UpstreamUnreachable(format!(
                "the response is larger than {limit} bytes and cannot be inspected"
            )))
        }
        Err(e) => {
            return Err(Refusal::UpstreamUnreachable(format!(
                "cannot read the response: {e}"
            )))
        }
    };
    let decoded = encoding::decode_all(coding, &raw, limit).map_err(|e| {
        Refusal::UpstreamUnreachable(format!("the response cannot be inspected: {e}"))
    })?;
    let findings = scan.scanner.scan(&decoded, format, literals);
    if !findings.is_empty() {
        ex.add_dlp(audit_entries(&findings, RESPONSE, scan.action));
        return Err(Refusal::Denied {
            reason: format!(
                "response body contains {} (inspect.response of pathway `{}` denies it)",
                named(&findings),
                pathway.name
            ),
            rule: None,
            code: "dlp_response_finding",
        });
    }
    Ok(raw)
}

pin_project_lite::pin_project! {
    /// A response body scanned as it streams: decoded, passed through the stream
    /// scanner (which holds back a bounded tail so a match across chunks is whole),
    /// redacted when the action is `redact`. A `deny` finding in an event stream ends
    /// it with an SSE `error` event naming the detector.
    pub struct InspectedBody<B> {
        #[pin]
        inner: B,
        decoder: Option<Decoder<Bounded>>,
        scanner: StreamScanner,
        action: DlpAction,
        report: Arc<DlpReport>,
        pathway: String,
        trace_id: String,
        trailers: Option<Frame<Bytes>>,
        done: bool,
    }
}

impl<B> InspectedBody<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: B,
        coding: Coding,
        scan: &Scan,
        format: BodyFormat,
        literals: Arc<Literals>,
        report: Arc<DlpReport>,
        pathway: String,
        trace_id: String,
    ) -> Self {
        let decoder = (coding != Coding::Identity)
            .then(|| Decoder::new(coding, Bounded::new(MAX_DECODED_CHUNK)));
        InspectedBody {
            inner,
            decoder,
            // A `deny` scanner redacts too, so the bytes before the cut never
            // carry what it found.
            scanner: scan
                .scanner
                .stream(format, literals, scan.action != DlpAction::Audit),
            action: scan.action,
            report,
            pathway,
            trace_id,
            trailers: None,
            done: false,
        }
    }
}

/// Decoded bytes of one chunk; `None` when the stream cannot be decoded.
fn decode(decoder: &mut Option<Decoder<Bounded>>, data: &[u8], last: bool) -> Option<Vec<u8>> {
    let Some(d) = decoder else {
        return Some(data.to_vec());
    };
    d.write(data);
    let ok = !last || d.finish();
    let sink = d.sink_mut()?;
    if sink.over || !ok {
        return None;
    }
    Some(std::mem::take(&mut sink.out))
}

impl<B> Body for InspectedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(this.trailers.take().map(Ok));
            }
            let (plain, last) = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => (decode(this.decoder, &data, false), false),
                    Err(trailers) => {
                        *this.trailers = Some(trailers);
                        (decode(this.decoder, &[], true), true)
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => (decode(this.decoder, &[], true), true),
            };
            let Some(plain) = plain else {
                // Fail closed: what cannot be decoded cannot be inspected.
                *this.done = true;
                this.report.cut(
                    false,
                    "the response could not be decoded for inspection".into(),
                );
                *this.trailers = None;
                return Poll::Ready(None);
            };
            let (mut out, findings) = this.scanner.push(&plain);
            let (tail, more) = if last {
                this.scanner.finish()
            } else {
                (Vec::new(), Findings::default())
            };
            out.extend_from_slice(&tail);
            let mut findings = findings;
            findings.merge(&more);
            if last {
                *this.done = true;
            }
            if !findings.is_empty() {
                this.report
                    .add(audit_entries(&findings, RESPONSE, *this.action));
                if *this.action == DlpAction::Deny {
                    // Only event streams are inspected this way under `deny`: earlier
                    // chunks went out (scanned clean); the agent's SDK sees an error event.
                    let reason = format!(
                        "response body contains {} (inspect.response of pathway `{}` denies it)",
                        named(&findings),
                        this.pathway
                    );
                    this.report.cut(true, reason.clone());
                    *this.done = true;
                    *this.trailers = None;
                    let event = serde_json::json!({"error": {
                        "type": "egress_denied",
                        "code": "dlp_response_finding",
                        "message": reason,
                        "trace_id": this.trace_id,
                    }});
                    // The stream ends at the chunk the finding was made in.
                    let bytes = format!("\n\nevent: error\ndata: {event}\n\n");
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))));
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
