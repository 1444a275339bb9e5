//! Whether a request's decision can depend on its LLM model, so the gateway knows to
//! read the body before evaluating (two-phase evaluation for `models`).

use crate::host::normalize_host;
use crate::percent::percent_decode;
use crate::policy::Policy;
use crate::request::{Request, RequestKind};

/// The body bound when a pathway lists `models` but sets no `max_request_body_bytes`.
pub const DEFAULT_MODEL_BODY_LIMIT: u64 = 1024 * 1024;

/// The model a Gemini-style path names: the segment after the last `/models/`, up to
/// the `:` that starts the method (`/v1beta/models/gemini-2.0-flash:generateContent`,
/// Vertex AI's `.../publishers/google/models/gemini-2.0-flash:streamGenerateContent`),
/// percent-decoded. That is the model such an upstream runs, whatever the body says.
pub fn model_from_path(path: &str) -> Option<String> {
    let (_, rest) = path.rsplit_once("/models/")?;
    let (model, method) = rest.split_once(':')?;
    if model.is_empty() || method.is_empty() || model.contains('/') {
        return None;
    }
    // A malformed escape or a result that is not UTF-8 names no model.
    let decoded = String::from_utf8(percent_decode(model)?).ok()?;
    (!decoded.is_empty()).then_some(decoded)
}

impl Policy {
    /// For an HTTP request, the body bound to read the model under when some pathway
    /// of a matching agent lists this destination and method and has `models`: the
    /// largest `max_request_body_bytes` among them (default 1 MiB). `None`: no
    /// pathway looks at the model, so the body need not be read.
    ///
    /// Pure, and independent of `when` and deny rules: a `Some` only means the model
    /// might matter; [`Policy::evaluate`] still decides.
    pub fn llm_model_body_limit(&self, req: &Request<'_>) -> Option<u64> {
        if req.kind != RequestKind::Http
            || !self
                .trust_domains
                .iter()
                .any(|t| t == req.source.trust_domain())
        {
            return None;
        }
        let host = normalize_host(req.host)?;
        let mut agents = Vec::new();
        self.agent_index.candidates(req.source, &mut agents);
        let mut limit: Option<u64> = None;
        let mut cands = Vec::new();
        for agent in agents.into_iter().map(|i| &self.agents[i]) {
            if !agent.id.matches(req.source) {
                continue;
            }
            cands.clear();
            agent.dests.candidates(&host, req.port, &mut cands);
            for &i in &cands {
                let p = &agent.pathways[i];
                if p.models.is_some()
                    && p.allows_method(req.method)
                    && p.destinations.iter().any(|d| d.matches(&host, req.port))
                {
                    let l = p
                        .limits
                        .max_request_body_bytes
                        .unwrap_or(DEFAULT_MODEL_BODY_LIMIT);
                    limit = Some(limit.map_or(l, |m| m.max(l)));
                }
            }
        }
        limit
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use crate::*;

    const POLICY: &str = r#"
version: 1
trust_domains: [example.org]
agents:
  - name: a
    id: spiffe://example.org/a
    pathways:
      - name: plain
        destinations: ["example.com:80"]
      - name: llm
        destinations: ["api.openai.com:443"]
        methods: [POST]
        models: ["gpt-4o*"]
        limits: { max_request_body_bytes: 4096 }
        upstream: { tls: true }
      - name: llm-default
        destinations: ["llm.example:443"]
        models: [m]
        upstream: { tls: true }
"#;

    fn limit(id: &str, method: &str, host: &str, port: u16) -> Option<u64> {
        let p = Policy::from_yaml_str(POLICY, "p.yaml").unwrap();
        let source: SpiffeId = id.parse().unwrap();
        let req = Request {
            source: &source,
            source_address: None,
            kind: RequestKind::Http,
            method,
            host,
            port,
            path: "/v1/chat/completions",
            query: "",
            headers: HeaderView::empty(),
            llm_model: None,
            now: SystemTime::now(),
        };
        p.llm_model_body_limit(&req)
    }

    #[test]
    fn gemini_paths_name_their_model() {
        use crate::llm_model::model_from_path;
        assert_eq!(
            model_from_path("/v1beta/models/gemini-2.0-flash:generateContent").as_deref(),
            Some("gemini-2.0-flash")
        );
        assert_eq!(
            model_from_path(
                "/v1/projects/p/locations/us/publishers/google/models/gemini-pro:streamGenerateContent"
            )
            .as_deref(),
            Some("gemini-pro")
        );
        assert_eq!(
            model_from_path("/v1beta/models/gemini%2Dpro:generateContent").as_deref(),
            Some("gemini-pro")
        );
        assert_eq!(model_from_path("/v1/chat/completions"), None);
        assert_eq!(model_from_path("/v1beta/models/gemini-pro"), None);
        assert_eq!(model_from_path("/v1beta/models/:generateContent"), None);
        assert_eq!(model_from_path("/v1beta/models/a%zz:generateContent"), None);
    }

    #[test]
    fn only_pathways_with_models_want_the_body() {
        let a = "spiffe://example.org/a";
        assert_eq!(limit(a, "POST", "api.openai.com", 443), Some(4096));
        assert_eq!(limit(a, "POST", "API.OpenAI.com.", 443), Some(4096));
        assert_eq!(limit(a, "GET", "api.openai.com", 443), None, "method");
        assert_eq!(limit(a, "POST", "api.openai.com", 8443), None, "port");
        assert_eq!(limit(a, "POST", "example.com", 80), None, "no models");
        assert_eq!(
            limit(a, "GET", "llm.example", 443),
            Some(DEFAULT_MODEL_BODY_LIMIT)
        );
        assert_eq!(
            limit("spiffe://example.org/b", "POST", "api.openai.com", 443),
            None
        );
        assert_eq!(
            limit("spiffe://other.org/a", "POST", "api.openai.com", 443),
            None
        );
    }
}
