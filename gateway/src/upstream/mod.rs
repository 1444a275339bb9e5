//! What the gateway does on the upstream side of an L7 pathway: TLS or SPIFFE mTLS
//! origination (`tls`) and credential injection (`secrets`).

pub mod secrets;
pub mod tls;

use egress_policy::Policy;

pub use secrets::{SecretError, Secrets};
pub use tls::{OriginationError, ProfileKey, UpstreamTls};

/// An L7 pathway that cannot be used until a file it names is readable again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnavailablePathway {
    pub agent: String,
    pub pathway: String,
    /// Which file and what is wrong with it (for the log; never sent to agents).
    pub reason: String,
}

/// Checks everything an L7 pathway needs from the filesystem: every `secret_file` is
/// readable and non-empty, every `ca_file` holds certificates. A pathway that fails
/// is out of service on its own (its requests get `503`), so one missing credential
/// never takes every agent's egress down, and none is forwarded without its
/// credential or with an unusable trust anchor.
///
/// Every file is read off the runtime, bounded in size and time ([`crate::files`]): a
/// FIFO or a device where a file should be is an error naming it, never a stall.
pub async fn check_policy_files(policy: &Policy, secrets: &Secrets) -> Vec<UnavailablePathway> {
    let mut out = Vec::new();
    for pathway in policy.pathways() {
        let Some(up) = &pathway.upstream else {
            continue;
        };
        let mut problems = Vec::new();
        for (header, secret) in &up.inject_headers {
            if let Err(e) = secrets.load(&secret.secret_file).await {
                problems.push(format!("inject_headers.{header}: {e}"));
            }
        }
        if let Some(ca) = &up.ca_file {
            if let Err(e) = tls::read_ca_file(ca).await {
                problems.push(format!("upstream.ca_file: {e}"));
            }
        }
        if !problems.is_empty() {
            out.push(UnavailablePathway {
                agent: pathway.agent.clone(),
                pathway: pathway.name.clone(),
                reason: problems.join("; "),
            });
        }
    }
    out
}

/// Pathways whose files name something that does not load, exported as
/// `egress_pathway_unavailable{agent,pathway}` (0 or 1 for every L7 pathway with files)
/// and logged when that changes.
pub struct Availability {
    secrets: Secrets,
    gauge: prometheus_client::metrics::family::Family<
        crate::metrics::PathwayLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    last: std::sync::Mutex<std::collections::BTreeMap<(String, String), Option<String>>>,
}

impl Availability {
    pub fn new(
        secrets: Secrets,
        gauge: prometheus_client::metrics::family::Family<
            crate::metrics::PathwayLabels,
            prometheus_client::metrics::gauge::Gauge,
        >,
    ) -> Self {
        Availability {
            secrets,
            gauge,
            last: Default::default(),
        }
    }

    /// Re-checks `policy`'s files and updates the gauge; logs each pathway that went
    /// out of or back into service.
    pub async fn check(&self, policy: &Policy) {
        let unavailable = check_policy_files(policy, &self.secrets).await;
        let mut now = std::collections::BTreeMap::new();
        for p in policy.pathways() {
            let Some(up) = &p.upstream else { continue };
            if up.inject_headers.is_empty() && up.ca_file.is_none() {
                continue;
            }
            let why = unavailable
                .iter()
                .find(|u| u.agent == p.agent && u.pathway == p.name)
                .map(|u| u.reason.clone());
            now.insert((p.agent.clone(), p.name.clone()), why);
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        for ((agent, pathway), why) in &now {
            let labels = crate::metrics::PathwayLabels {
                agent: agent.clone(),
                pathway: pathway.clone(),
            };
            self.gauge
                .get_or_create(&labels)
                .set(i64::from(why.is_some()));
            let before = last.get(&(agent.clone(), pathway.clone()));
            match (before, why) {
                (Some(Some(_)), Some(_)) => {}
                (_, Some(why)) => {
                    tracing::error!(%agent, %pathway, reason = %why, "pathway unavailable: its requests get 503 until the file is readable")
                }
                (Some(Some(_)), None) => {
                    tracing::info!(%agent, %pathway, "pathway available again")
                }
                _ => {}
            }
        }
        for key in last.keys() {
            if !now.contains_key(key) {
                self.gauge.remove(&crate::metrics::PathwayLabels {
                    agent: key.0.clone(),
                    pathway: key.1.clone(),
                });
            }
        }
        *last = now;
    }
}
