//! Runs the real gateway server code in-process on ephemeral ports, with a fake
//! Workload API as its identity provider, for end-to-end tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use egress_gateway::config::{GatewayConfig, Overrides};
use egress_gateway::proxy::Resolve;
use egress_gateway::server::{self, Dependencies, RunningGateway};
use rustls_pki_types::CertificateDer;

use crate::agent::AgentClient;
use crate::ca::TestCa;
use crate::workload_api::{FakeWorkloadApi, WorkloadIdentity};

/// The gateway's SPIFFE ID in every test and in the demo.
pub const GATEWAY_ID: &str = "spiffe://example.org/ns/egress-gateway/sa/egress-gateway";

/// Environment with nothing set: tests never read the real process environment.
struct NoEnv;
impl egress_gateway::config::Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// A running in-process gateway and the files it uses.
pub struct TestGateway {
    gateway: Option<RunningGateway>,
    dir: tempfile::TempDir,
    audit_path: PathBuf,
    policy_path: PathBuf,
}

/// Options beyond the policy and the Workload API endpoint.
#[derive(Default)]
pub struct GatewayOptions {
    /// Extra top-level YAML appended to gateway.yaml (e.g. `timeouts: {...}`).
    pub extra_config: String,
    pub resolver: Option<Arc<dyn Resolve>>,
    /// `telemetry.otlp_endpoint` (e.g. an `OtlpReceiver`'s endpoint).
    pub otlp_endpoint: Option<String>,
    /// `telemetry.otlp_protocol` (`grpc`, the default, or `http/protobuf`).
    pub otlp_protocol: Option<String>,
    /// More keys of the `telemetry:` block, one `key: value` per line.
    pub telemetry_extra: Vec<String>,
    /// `identity.spiffe_id`: which SVID is the gateway's when the Workload API serves
    /// several (real SPIRE, with every entry registered for this uid).
    pub identity_spiffe_id: Option<String>,
}

impl TestGateway {
    pub async fn start(policy_yaml: &str, workload_api: &str) -> anyhow::Result<Self> {
        Self::start_with(policy_yaml, workload_api, GatewayOptions::default()).await
    }

    pub async fn start_with(
        policy_yaml: &str,
        workload_api: &str,
        opts: GatewayOptions,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let policy_path = dir.path().join("policy.yaml");
        let audit_path = dir.path().join("audit.log");
        std::fs::write(&policy_path, policy_yaml)?;
        let config_path = dir.path().join("gateway.yaml");
        let has_timeouts = opts.extra_config.contains("timeouts:");
        let config = format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nidentity:\n  workload_api: {workload_api}\n  startup_timeout: 20s\n{}policy: {}\ntelemetry:\n  audit_log: {}\n{}{}{}shutdown_grace: 5s\n{}\n",
            opts.identity_spiffe_id
                .as_ref()
                .map(|id| format!("  spiffe_id: {id}\n"))
                .unwrap_or_default(),
            policy_path.display(),
            audit_path.display(),
            opts.otlp_endpoint
                .as_ref()
                .map(|e| format!("  otlp_endpoint: {e}\n"))
                .unwrap_or_default(),
            opts.otlp_protocol
                .as_ref()
                .map(|p| format!("  otlp_protocol: {p}\n"))
                .into_iter()
                .chain(opts.telemetry_extra.iter().map(|l| format!("  {l}\n")))
                .collect::<String>(),
            if has_timeouts { "" } else { "timeouts: { handshake: 5s, request_header: 5s, connect: 5s, idle: 60s }\n" },
            opts.extra_config,
        );
        std::fs::write(&config_path, &config)?;
        let cfg = GatewayConfig::load(&config_path, &Overrides::default(), &NoEnv)
            .context("test gateway config")?;
        let deps = match opts.resolver {
            Some(resolver) => Dependencies { resolver },
            None => Dependencies::default(),
        };
        let gateway = server::start_with(cfg, deps)
            .await
            .context("starting the gateway")?;
        Ok(TestGateway {
            gateway: Some(gateway),
            dir,
            audit_path,
            policy_path,
        })
    }

    fn running(&self) -> &RunningGateway {
        // Only `shutdown` takes it, and that consumes self.
        self.gateway.as_ref().expect("gateway is running")
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.running().proxy_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.running().admin_addr()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn policy_path(&self) -> &Path {
        &self.policy_path
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    pub fn gateway(&self) -> &RunningGateway {
        self.running()
    }

    /// The Prometheus exposition from the admin listener's `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        admin_get(self.admin_addr(), "/metrics")
            .await
            .map(|(_, body)| body)
    }

    /// Every audit line written so far, parsed.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        read_audit(&self.audit_path)
    }

    /// Waits until at least `n` audit lines exist (lines are written when a request or
    /// tunnel ends, which can be just after the client saw its response).
    pub async fn wait_for_audit(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.audit_lines();
            if lines.len() >= n || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown; returns the audit log as it stands afterwards (the files are
    /// removed with the gateway's temporary directory).
    pub async fn shutdown(mut self) -> Vec<serde_json::Value> {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
        self.audit_lines()
    }
}

/// `GET path` on an admin listener: (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn read_audit(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A trust domain with a CA, a fake Workload API serving the gateway's SVID, and the
/// gateway itself: what most end-to-end tests need.
pub struct World {
    pub ca: TestCa,
    pub api: FakeWorkloadApi,
    pub gateway: TestGateway,
}

impl World {
    pub async fn start(policy_yaml: &str) -> anyhow::Result<World> {
        Self::start_with(policy_yaml, GatewayOptions::default()).await
    }

    pub async fn start_with(policy_yaml: &str, opts: GatewayOptions) -> anyhow::Result<World> {
        let ca = TestCa::new("example.org");
        let api = FakeWorkloadApi::start_in_tempdir(gateway_identity(&ca)).await?;
        let gateway = TestGateway::start_with(policy_yaml, &api.endpoint(), opts).await?;
        Ok(World { ca, api, gateway })
    }

    /// A fresh SVID for the gateway, pushed through the Workload API (rotation).
    pub fn rotate_gateway_svid(&self) {
        self.api.update(gateway_identity(&self.ca));
    }

    /// An agent client with an SVID for `spiffe_id`, verifying the gateway's SPIFFE ID.
    pub fn agent(&self, spiffe_id: &str) -> anyhow::Result<AgentClient> {
        Ok(AgentClient::new(
            &self.ca.mint_svid(spiffe_id),
            &[self.ca.root_cert()],
            self.gateway.proxy_addr(),
        )?
        .expect_gateway_id(GATEWAY_ID))
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.ca.root_cert()]
    }

    pub async fn shutdown(self) {
        self.gateway.shutdown().await;
        self.api.shutdown().await;
    }
}

/// The gateway's SVID (with `localhost`/`127.0.0.1` SANs so stock proxy clients such as
/// curl can verify it by name too) and its trust bundle.
pub fn gateway_identity(ca: &TestCa) -> WorkloadIdentity {
    let svid = ca.mint(crate::ca::SvidOptions {
        spiffe_id: Some(GATEWAY_ID.to_string()),
        dns_names: vec!["localhost".into()],
        ip_addresses: vec!["127.0.0.1".parse().expect("literal address")],
        ..Default::default()
    });
    WorkloadIdentity {
        svids: vec![svid],
        bundle: vec![ca.root_cert()],
        federated_bundles: vec![],
    }
}
