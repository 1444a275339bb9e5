//! One request or tunnel from start to finish: what the audit line and span will say.
//!
//! Dropping an unfinished `Exchange` still writes its audit line, so an aborted request
//! (client gone, task cancelled) is never missing from the log.

use std::sync::Arc;
use std::time::Instant;

use egress_policy::Decision;

use http::HeaderMap;
use opentelemetry::KeyValue;

use crate::audit::{now_rfc3339, AuditLog, AuditRecord};
use crate::telemetry::{RequestSpan, Telemetry, TraceContext};

use super::refusal::Refusal;
use super::PeerIdentity;

pub struct Exchange {
    started: Instant,
    audit: AuditLog,
    telemetry: Arc<Telemetry>,
    span: Option<RequestSpan>,
    pub trace: TraceContext,
    record: Option<AuditRecord>,
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
            audit,
            telemetry: telemetry.clone(),
            span: Some(span),
            trace,
            record: Some(record),
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
        let r = self.rec();
        r.decision = if d.allowed { "allow" } else { "deny" };
        r.enforced = d.allowed || d.enforced;
        r.agent = d.agent.clone();
        r.pathway = d.pathway.as_ref().map(|p| p.name.clone());
        r.rule = d.rule.clone();
        r.reason = d.reason.to_string();
        r.dry_run_rules = d.dry_run_rules.clone();
    }

    /// The OpenAI-compatible request's `model` (audit `llm_model`, span `gen_ai.request.model`).
    pub fn set_llm_model(&mut self, model: Option<&str>) {
        self.rec().llm_model = model.map(str::to_string);
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
            let elapsed = self.started.elapsed();
            record.duration_ms = elapsed.as_millis() as u64;
            if let Some(mut span) = self.span.take() {
                span.set(span_attributes(&record));
                span.end(record.status, record.error.as_deref());
            }
            self.telemetry
                .metrics
                .record(&record, elapsed.as_secs_f64());
            self.audit.record(record);
        }
    }
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

/// OpenTelemetry HTTP semantic-convention attributes plus the gateway's own.
fn span_attributes(r: &AuditRecord) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("http.request.method", r.method.clone()),
        KeyValue::new("server.address", r.host.clone()),
        KeyValue::new("server.port", i64::from(r.port)),
        KeyValue::new("client.address", r.source_address.clone()),
        KeyValue::new("http.response.status_code", i64::from(r.status)),
        KeyValue::new("spiffe.peer_id", r.source_spiffe_id.clone()),
        KeyValue::new("egress.kind", r.kind),
        KeyValue::new("egress.decision", r.decision),
        KeyValue::new("egress.enforced", r.enforced),
        KeyValue::new("egress.rule", r.rule.clone().unwrap_or_default()),
        KeyValue::new("egress.pathway", r.pathway.clone().unwrap_or_default()),
        KeyValue::new("egress.agent", r.agent.clone().unwrap_or_default()),
        KeyValue::new("egress.reason", r.reason.clone()),
        KeyValue::new("egress.bytes_sent", r.bytes_sent as i64),
        KeyValue::new("egress.bytes_received", r.bytes_received as i64),
    ];
    if r.kind == "http" {
        attrs.push(KeyValue::new(
            "url.full",
            format!("http://{}:{}{}", r.host, r.port, r.path),
        ));
        attrs.push(KeyValue::new("url.path", r.path.clone()));
    }
    if let Some(ip) = &r.resolved_ip {
        attrs.push(KeyValue::new("network.peer.address", ip.clone()));
    }
    if let Some(model) = &r.llm_model {
        attrs.push(KeyValue::new("gen_ai.request.model", model.clone()));
    }
    if let Some(limit) = &r.limit {
        attrs.push(KeyValue::new("egress.limit", limit.clone()));
    }
    if let Some(e) = &r.error {
        attrs.push(KeyValue::new("error.type", e.clone()));
    }
    attrs
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
