//! One request or tunnel from start to finish: what the audit line and span will say.
//!
//! Dropping an unfinished `Exchange` still writes its audit line, so an aborted request
//! (client gone, task cancelled) is never missing from the log.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use egress_policy::Decision;

use http::HeaderMap;

use crate::audit::{merge_dlp, now_rfc3339, AuditLog, AuditRecord, DlpFinding};
use crate::telemetry::{Attributes, RequestSpan, Telemetry, TraceContext};

use super::llm::{Accounting, Provider};
use super::refusal::Refusal;
use super::PeerIdentity;

pub struct Exchange {
    started: Instant,
    /// The agent's address, for the span's `client.*` (the line has it as text).
    peer_address: std::net::SocketAddr,
    audit: AuditLog,
    telemetry: Arc<Telemetry>,
    span: Option<RequestSpan>,
    pub trace: TraceContext,
    record: Option<AuditRecord>,
    /// Budgets to charge when the exchange ends, and the LLM usage read on the way.
    llm: Option<Accounting>,
    /// The other JSON-RPC messages of an MCP batch: decision and `mcp_*` fields of a
    /// line each, written with this exchange's.
    mcp_lines: Vec<AuditRecord>,
    /// What response inspection found while the body streamed.
    dlp_report: Option<Arc<DlpReport>>,
}

/// The `mcp_*` fields of one audit line.
#[derive(Debug, Clone, Default)]
pub struct McpFields {
    pub method: Option<String>,
    pub tool: Option<String>,
    pub request_id: Option<String>,
    pub tool_label: Option<String>,
}

impl Exchange {
    /// Starts the span (child of the agent's `traceparent`) and the audit record.
    pub fn begin(
        audit: AuditLog,
        telemetry: &Arc<Telemetry>,
        peer: &PeerIdentity,
        kind: &'static str,
        method: &str,
        headers: &HeaderMap,
    ) -> Self {
        let span = telemetry.start_span(method, TraceContext::parent_from_headers(headers));
        let trace = span.ctx;
        let record = AuditRecord {
            ts: now_rfc3339(),
            trace_id: trace.trace_id_hex(),
            span_id: trace.span_id_hex(),
            source_spiffe_id: peer.spiffe_id.to_string(),
            source_address: peer.address.to_string(),
            kind,
            method: method.to_string(),
            decision: "deny",
            enforced: true,
            ..Default::default()
        };
        Exchange {
            started: Instant::now(),
            peer_address: peer.address,
            audit,
            telemetry: telemetry.clone(),
            span: Some(span),
            trace,
            record: Some(record),
            llm: None,
            mcp_lines: Vec::new(),
            dlp_report: None,
        }
    }

    fn rec(&mut self) -> &mut AuditRecord {
        // `record` is only taken by `write`, which consumes or drops self.
        self.record.get_or_insert_with(AuditRecord::default)
    }

    pub fn set_target(&mut self, host: &str, port: u16, path: &str) {
        let r = self.rec();
        r.host = host.to_string();
        r.port = port;
        r.path = path.to_string();
    }

    pub fn set_decision(&mut self, d: &Decision) {
        apply_decision(self.rec(), d);
    }

    /// The JSON-RPC message this line is about (MCP pathways).
    pub fn set_mcp(&mut self, m: McpFields) {
        apply_mcp(self.rec(), m);
    }

    /// Another JSON-RPC message of the same request (a batch): its own audit line with
    /// its own decision, written when this exchange's is.
    pub fn add_mcp_line(&mut self, d: &Decision, m: McpFields) {
        let mut line = AuditRecord::default();
        apply_decision(&mut line, d);
        apply_mcp(&mut line, m);
        self.mcp_lines.push(line);
    }

    /// The OpenAI-compatible request's `model` (audit `llm_model`, span `gen_ai.request.model`).
    pub fn set_llm_model(&mut self, model: Option<&str>) {
        self.rec().llm_model = model.map(str::to_string);
    }

    /// The API family of an LLM request (audit `llm_provider`, span `gen_ai.system`).
    pub fn set_llm_provider(&mut self, provider: Option<Provider>) {
        self.rec().llm_provider = provider.map(Provider::system);
    }

    /// Charges the admitted request's budgets when the exchange ends, however it ends.
    pub fn attach_accounting(&mut self, accounting: Accounting) {
        self.llm = Some(accounting);
    }

    pub fn accounting_mut(&mut self) -> Option<&mut Accounting> {
        self.llm.as_mut()
    }

    /// Marks a request read inside intercepted TLS (audit `tls_intercepted`).
    /// Request-phase DLP findings.
    pub fn add_dlp(&mut self, entries: Vec<DlpFinding>) {
        merge_dlp(&mut self.rec().dlp, entries);
    }

    /// A denial `mode: audit` does not enforce: logged as `deny`, `enforced: false`.
    pub fn would_deny(&mut self, reason: &str) {
        let r = self.rec();
        r.decision = "deny";
        r.enforced = false;
        r.reason = reason.to_string();
    }

    /// The guard classifier's verdict.
    pub fn set_guard(&mut self, outcome: &'static str) {
        self.rec().guard = Some(outcome);
    }

    /// Where the streaming response's inspection reports, read when the line is written.
    pub fn dlp_report(&mut self) -> Arc<DlpReport> {
        self.dlp_report.get_or_insert_with(Arc::default).clone()
    }

    pub fn set_intercepted(&mut self) {
        self.rec().tls_intercepted = true;
    }

    /// Ends without an audit line or span: an intercepted tunnel whose requests each
    /// had their own.
    pub fn discard(mut self) {
        self.record = None;
        if let Some(span) = self.span.take() {
            span.discard();
        }
    }

    pub fn set_resolved(&mut self, ip: std::net::IpAddr) {
        self.rec().resolved_ip = Some(ip.to_string());
    }

    pub fn trace_id(&self) -> String {
        self.trace.trace_id_hex()
    }

    /// Records a refusal (403/429/413/400/502/504) and writes the line.
    pub fn refuse(mut self, refusal: &Refusal) {
        let r = self.rec();
        if refusal.is_denial() {
            r.decision = "deny";
            r.enforced = true;
            if let Some(rule) = refusal.rule() {
                r.rule = Some(rule.to_string());
            }
            r.reason = refusal.reason().to_string();
        } else {
            r.error = Some(refusal.reason().to_string());
        }
        r.limit = refusal.limit().map(str::to_string);
        r.status = refusal.status().as_u16();
        self.write();
    }

    /// Writes the line for a tunnel refused after it opened (its ClientHello failed the
    /// SNI check): a denial with its reason; `status` is what the CONNECT got.
    pub fn deny_after_open(mut self, status: u16, bytes: &ByteCounts, reason: String) {
        let r = self.rec();
        r.decision = "deny";
        r.enforced = true;
        r.reason = reason;
        r.status = status;
        r.bytes_sent = bytes.sent();
        r.bytes_received = bytes.received();
        self.write();
    }

    /// Writes the line for a request that was served.
    pub fn finish(mut self, status: u16, bytes: &ByteCounts, error: Option<String>) {
        let r = self.rec();
        r.status = status;
        r.bytes_sent = bytes.sent();
        r.bytes_received = bytes.received();
        if error.is_some() {
            r.error = error;
        }
        self.write();
    }

    /// Ends the span, counts the metrics and writes the audit line: the three always
    /// describe the same request.
    fn write(&mut self) {
        if let Some(mut record) = self.record.take() {
            if let Some(accounting) = self.llm.take() {
                accounting.finish(&mut record);
            }
            if let Some(report) = self.dlp_report.take() {
                report.apply(&mut record);
            }
            let elapsed = self.started.elapsed();
            record.duration_ms = elapsed.as_millis() as u64;
            if let Some(span) = self.span.take().filter(RequestSpan::is_recorded) {
                let attributes = span_attributes(&record, self.peer_address);
                self.telemetry
                    .end_span(span, &attributes, record.status, record.error.as_deref());
            }
            self.telemetry
                .metrics
                .record(&record, elapsed.as_secs_f64());
            // Batch messages share the request's line but for their own decision; the
            // bytes are counted once, on the request's line.
            for m in std::mem::take(&mut self.mcp_lines) {
                let mut line = record.clone();
                line.decision = m.decision;
                line.enforced = m.enforced;
                line.agent = m.agent;
                line.pathway = m.pathway;
                line.rule = m.rule;
                line.reason = m.reason;
                line.dry_run_rules = m.dry_run_rules;
                apply_mcp(
                    &mut line,
                    McpFields {
                        method: m.mcp_method,
                        tool: m.mcp_tool,
                        request_id: m.mcp_request_id,
                        tool_label: m.mcp_tool_label,
                    },
                );
                line.bytes_sent = 0;
                line.bytes_received = 0;
                self.telemetry.metrics.record_mcp(&line);
                self.audit.record(line);
            }
            self.audit.record(record);
        }
    }
}

/// What inspecting a streamed response found, shared between the body that scans it
/// and the exchange, which writes the line when the body ends.
#[derive(Debug, Default)]
pub struct DlpReport {
    inner: Mutex<ReportInner>,
}

#[derive(Debug, Default)]
struct ReportInner {
    entries: Vec<DlpFinding>,
    /// The stream was cut: by a `deny` finding (`true`) or because it could not be read.
    cut: Option<(bool, String)>,
}

impl DlpReport {
    pub fn add(&self, entries: Vec<DlpFinding>) {
        if let Ok(mut g) = self.inner.lock() {
            merge_dlp(&mut g.entries, entries);
        }
    }

    pub fn cut(&self, denied: bool, reason: String) {
        if let Ok(mut g) = self.inner.lock() {
            g.cut.get_or_insert((denied, reason));
        }
    }

    /// Puts the response's findings on the line; a cut stream is a denial (a finding
    /// the pathway denies) or an error.
    fn apply(&self, record: &mut AuditRecord) {
        let Ok(mut g) = self.inner.lock() else {
            return;
        };
        merge_dlp(&mut record.dlp, std::mem::take(&mut g.entries));
        match g.cut.take() {
            Some((true, reason)) => {
                record.decision = "deny";
                record.enforced = true;
                record.error = Some(format!("response cut: {reason}"));
                record.reason = reason;
            }
            Some((false, reason)) => record.error = Some(format!("response cut: {reason}")),
            None => {}
        }
    }
}

fn apply_decision(r: &mut AuditRecord, d: &Decision) {
    r.decision = if d.allowed { "allow" } else { "deny" };
    r.enforced = d.allowed || d.enforced;
    r.agent = d.agent.clone();
    r.pathway = d.pathway.as_ref().map(|p| p.name.clone());
    r.rule = d.rule.clone();
    r.reason = d.reason.to_string();
    r.dry_run_rules = d.dry_run_rules.clone();
}

fn apply_mcp(r: &mut AuditRecord, m: McpFields) {
    r.mcp_method = m.method;
    r.mcp_tool = m.tool;
    r.mcp_request_id = m.request_id;
    r.mcp_tool_label = m.tool_label;
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.record.is_some() {
            let r = self.rec();
            if r.error.is_none() {
                r.error = Some("request abandoned before completion".into());
            }
            if r.status == 0 {
                r.status = 499;
            }
            self.write();
        }
    }
}

/// OpenTelemetry HTTP semantic-convention attributes plus the gateway's own, encoded
/// from the record as they are read.
fn span_attributes(r: &AuditRecord, agent: std::net::SocketAddr) -> Attributes {
    let mut a = Attributes::for_span();
    a.str("http.request.method", &r.method);
    a.str("server.address", &r.host);
    a.int("server.port", i64::from(r.port));
    a.int("http.response.status_code", i64::from(r.status));
    a.str("spiffe.peer_id", &r.source_spiffe_id);
    a.str("egress.kind", r.kind);
    a.str("egress.decision", r.decision);
    a.bool("egress.enforced", r.enforced);
    a.str("egress.rule", r.rule.as_deref().unwrap_or_default());
    a.str("egress.pathway", r.pathway.as_deref().unwrap_or_default());
    a.str("egress.agent", r.agent.as_deref().unwrap_or_default());
    a.str("egress.reason", &r.reason);
    a.int("egress.bytes_sent", r.bytes_sent as i64);
    a.int("egress.bytes_received", r.bytes_received as i64);
    if r.tls_intercepted {
        a.bool("egress.tls_intercepted", true);
    }
    if r.kind == "http" {
        let scheme = if r.tls_intercepted { "https" } else { "http" };
        let mut port = [0; 5];
        a.parts(
            "url.full",
            &[
                scheme,
                "://",
                &r.host,
                ":",
                decimal(r.port, &mut port),
                &r.path,
            ],
        );
        a.str("url.path", &r.path);
    }
    // The agent is the client: its IP and port apart, as the semantic conventions
    // name them (`client.address` never carries a port).
    a.str("client.address", &agent.ip().to_string());
    a.int("client.port", i64::from(agent.port()));
    // The destination is `server.*` (the host the agent asked for); the address the
    // gateway connected to for it is `network.peer.*`.
    if let Some(ip) = &r.resolved_ip {
        a.str("network.peer.address", ip);
    }
    // The findings as `detector/direction/action=count`, never the matched text.
    if !r.dlp.is_empty() {
        let findings: Vec<String> = r
            .dlp
            .iter()
            .map(|f| format!("{}/{}/{}={}", f.detector, f.direction, f.action, f.count))
            .collect();
        a.str("egress.dlp", &findings.join(","));
    }
    if let Some(verdict) = r.guard {
        a.str("egress.guard", verdict);
    }
    // OpenTelemetry GenAI semantic conventions.
    if let Some(method) = &r.mcp_method {
        a.str("mcp.method.name", method);
    }
    if let Some(tool) = &r.mcp_tool {
        a.str("mcp.tool.name", tool);
    }
    if let Some(id) = &r.mcp_request_id {
        a.str("jsonrpc.request.id", id);
    }
    if let Some(system) = r.llm_provider {
        a.str("gen_ai.system", system);
    }
    if let Some(model) = &r.llm_model {
        a.str("gen_ai.request.model", model);
    }
    if let Some(model) = &r.llm_response_model {
        a.str("gen_ai.response.model", model);
    }
    if let Some(n) = r.llm_input_tokens {
        a.int(
            "gen_ai.usage.input_tokens",
            i64::try_from(n).unwrap_or(i64::MAX),
        );
    }
    if let Some(n) = r.llm_output_tokens {
        a.int(
            "gen_ai.usage.output_tokens",
            i64::try_from(n).unwrap_or(i64::MAX),
        );
    }
    if let Some(source) = r.llm_usage_source {
        a.str("egress.llm_usage_source", source);
    }
    if let Some(limit) = &r.limit {
        a.str("egress.limit", limit);
    }
    if let Some(e) = &r.error {
        a.str("error.type", e);
    }
    a
}

/// `n` in decimal, written into `buf`.
fn decimal(mut n: u16, buf: &mut [u8; 5]) -> &str {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only.
    std::str::from_utf8(&buf[start..]).unwrap_or_default()
}

/// Bytes moved through a request or tunnel, updated while it runs.
#[derive(Debug, Default)]
pub struct ByteCounts {
    sent: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
}

impl ByteCounts {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn add_received(&self, n: u64) {
        self.received
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::decimal;

    #[test]
    fn ports_in_decimal() {
        for n in [0u16, 7, 10, 443, 8080, 65535] {
            assert_eq!(decimal(n, &mut [0; 5]), n.to_string());
        }
    }
}
