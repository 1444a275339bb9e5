//! `inspect:` compiled: the DLP scanners of each direction and the guard classifier.
//! Scanning itself is [`crate::dlp`]; the gateway reads bodies and applies the action.

use std::time::Duration;

use crate::dlp::{DetectorSet, Pattern, Scanner};
use crate::model::{DlpActionSpec, GuardOnErrorSpec, InspectSpec, ScanSpec};

/// Default time the gateway waits for the guard's answer.
pub const DEFAULT_GUARD_TIMEOUT: Duration = Duration::from_millis(500);
/// How much of a body is read for inspection when the pathway sets no
/// `max_request_body_bytes`; larger bodies are refused (413), never forwarded unscanned.
pub const DEFAULT_INSPECT_BODY_LIMIT: u64 = 8 * 1024 * 1024;

/// A pathway's `inspect`.
#[derive(Debug, Clone)]
pub struct Inspect {
    pub request: Option<Scan>,
    pub response: Option<Scan>,
    pub guard: Option<Guard>,
}

/// Detectors of one direction and what a finding does.
#[derive(Clone)]
pub struct Scan {
    pub scanner: Scanner,
    pub action: DlpAction,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("detectors", &self.scanner.detector_names())
            .field("action", &self.action)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlpAction {
    /// 403 naming the detector; nothing is forwarded.
    Deny,
    /// Each finding replaced by `[REDACTED:<detector>]`.
    Redact,
    /// Forwarded as it is; the finding is logged.
    Audit,
}

impl DlpAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DlpAction::Deny => "deny",
            DlpAction::Redact => "redact",
            DlpAction::Audit => "audit",
        }
    }
}

/// The external classifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// `http://host:port/path`.
    pub url: String,
    pub timeout: Duration,
    /// What a timeout or an error means: `true` forwards, `false` denies.
    pub allow_on_error: bool,
}

/// Compiles `inspect`; each problem is returned as (line, message naming the key).
pub(crate) fn compile(spec: InspectSpec) -> Result<Inspect, Vec<(u64, String)>> {
    let mut errs = Vec::new();
    let mut scan = |key: &str, s: Option<ScanSpec>| -> Option<Scan> {
        let s = s?;
        let mut sets = Vec::new();
        for d in &s.detectors {
            match d.value.parse::<DetectorSet>() {
                Ok(set) => sets.push(set),
                Err(e) => errs.push((d.line, format!("inspect.{key}.detectors: {e}"))),
            }
        }
        if s.detectors.is_empty() && s.patterns.is_empty() {
            errs.push((
                s.action.line,
                format!("inspect.{key}: list `detectors` (secrets, pii) or `patterns`"),
            ));
            return None;
        }
        let line = s
            .patterns
            .first()
            .map(|p| p.name.line)
            .unwrap_or(s.action.line);
        let patterns: Vec<Pattern> = s
            .patterns
            .into_iter()
            .map(|p| Pattern {
                name: p.name.value,
                regex: p.regex.value,
            })
            .collect();
        let scanner = match Scanner::new(&sets, &patterns) {
            Ok(s) => s,
            Err(e) => {
                errs.push((line, format!("inspect.{key}.patterns: {e}")));
                return None;
            }
        };
        Some(Scan {
            scanner,
            action: match s.action.value {
                DlpActionSpec::Deny => DlpAction::Deny,
                DlpActionSpec::Redact => DlpAction::Redact,
                DlpActionSpec::Audit => DlpAction::Audit,
            },
        })
    };
    let request = scan("request", spec.request);
    let response = scan("response", spec.response);
    let guard = spec.guard.and_then(|g| {
        let url_ok = g
            .url
            .value
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|authority| match authority.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
                None => !authority.is_empty() && !authority.contains('@'),
            });
        if !url_ok {
            errs.push((
                g.url.line,
                format!(
                    "inspect.guard.url {:?} must be http://host:port/path (a classifier beside the gateway)",
                    g.url.value
                ),
            ));
            return None;
        }
        let timeout = match g.timeout {
            None => DEFAULT_GUARD_TIMEOUT,
            Some(t) => match humantime::parse_duration(&t.value) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    errs.push((
                        t.line,
                        format!(
                            "inspect.guard.timeout {:?} is not a duration like 500ms or 2s",
                            t.value
                        ),
                    ));
                    return None;
                }
            },
        };
        Some(Guard {
            url: g.url.value,
            timeout,
            allow_on_error: g.on_error == Some(GuardOnErrorSpec::Allow),
        })
    });
    if !errs.is_empty() {
        return Err(errs);
    }
    if request.is_none() && response.is_none() && guard.is_none() {
        return Err(vec![(
            0,
            "inspect: set `request`, `response` or `guard` (an empty `inspect` checks nothing)"
                .into(),
        )]);
    }
    Ok(Inspect {
        request,
        response,
        guard,
    })
}

#[cfg(test)]
mod tests {
    use crate::Policy;

    fn load(inspect: &str, upstream: bool) -> Result<Policy, String> {
        let upstream = if upstream {
            "        upstream: { tls: false }\n"
        } else {
            ""
        };
        let yaml = format!(
            "version: 1\ntrust_domains: [example.org]\nagents:\n  - name: a\n    id: spiffe://example.org/a\n    pathways:\n      - name: llm\n        destinations: [\"api.example.com:443\"]\n{upstream}        inspect:\n{inspect}"
        );
        Policy::from_yaml_str(&yaml, "policy.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_inspect_compiles_with_defaults() {
        let p = load(
            "          request: { detectors: [secrets, pii], patterns: [{ name: codename, regex: '(?i)blue[- ]falcon' }], action: deny }\n          response: { detectors: [pii], action: redact }\n          guard: { url: \"http://guard.egress-gateway.svc:8080/v1/classify\" }\n",
            true,
        )
        .unwrap();
        let pathway = p.pathways().next().unwrap();
        let i = pathway.inspect.as_ref().unwrap();
        let req = i.request.as_ref().unwrap();
        assert_eq!(req.action, super::DlpAction::Deny);
        assert!(req.scanner.detector_names().contains(&"codename"));
        assert!(req.scanner.detector_names().contains(&"openai_api_key"));
        let g = i.guard.as_ref().unwrap();
        assert_eq!(g.timeout, super::DEFAULT_GUARD_TIMEOUT);
        assert!(!g.allow_on_error);
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let e = load(
            "          request: { detectors: [secrets, passwords], action: deny }\n",
            true,
        )
        .unwrap_err();
        assert!(
            e.contains("inspect.request.detectors") && e.contains("passwords"),
            "{e}"
        );
        let e = load(
            "          request: { patterns: [{ name: bad, regex: '(unclosed' }], action: redact }\n",
            true,
        )
        .unwrap_err();
        assert!(
            e.contains("inspect.request.patterns") && e.contains("bad"),
            "{e}"
        );
        let e = load(
            "          response: { detectors: [pii], action: block }\n",
            true,
        )
        .unwrap_err();
        assert!(e.contains("action"), "{e}");
        let e = load(
            "          guard: { url: \"https://guard:8443/x\", timeout: soon }\n",
            true,
        )
        .unwrap_err();
        assert!(e.contains("inspect.guard.url"), "{e}");
        let e = load(
            "          guard: { url: \"http://guard:8080/x\", timeout: soon }\n",
            true,
        )
        .unwrap_err();
        assert!(
            e.contains("inspect.guard.timeout") && e.contains("soon"),
            "{e}"
        );
        let e = load("          request: { action: audit }\n", true).unwrap_err();
        assert!(e.contains("inspect.request"), "{e}");
    }

    #[test]
    fn inspect_on_a_pathway_that_cannot_see_bodies_is_refused() {
        let e = load(
            "          request: { detectors: [secrets], action: deny }\n",
            false,
        )
        .unwrap_err();
        assert!(e.contains("`inspect` needs `upstream`"), "{e}");
    }
}
