//! Wires the gateway together: policy, audit log, admin, identity, listener, proxy.
//! `egress-gateway run` and the end-to-end tests both start the gateway through here.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditError, AuditLog, AuditWriter};
use crate::config::GatewayConfig;
use crate::health::Health;
use crate::identity::{server_config, IdentityError, IdentitySource, TlsError};
use crate::listener::Listener;
use crate::policy_store::PolicyStore;
use crate::proxy::{Dialer, Proxy, Resolve};
use crate::telemetry::{Telemetry, TelemetryError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("policy: {0}")]
    Policy(#[from] egress_policy::PolicyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Limits(#[from] crate::limits::LimitsError),
    #[error(transparent)]
    Interception(#[from] crate::interception::InterceptionError),
}

/// At every policy load: which L7 pathways' files do not load (those pathways alone are
/// out of service; the policy itself is never rejected for it).
fn availability_check(
    availability: &Arc<crate::upstream::Availability>,
) -> crate::policy_store::LoadCheck {
    let availability = availability.clone();
    Arc::new(move |policy: Arc<egress_policy::Policy>| {
        let availability = availability.clone();
        Box::pin(async move {
            availability.check(&policy).await;
            Ok(())
        })
    })
}

/// How often files of unavailable pathways are looked at again (a Secret mounted late).
const AVAILABILITY_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Things tests replace: the resolver (private and rebinding answers).
pub struct Dependencies {
    pub resolver: Arc<dyn Resolve>,
}

impl Default for Dependencies {
    fn default() -> Self {
        Dependencies {
            // Per name-server query; the dialer bounds the whole lookup by the connect timeout.
            resolver: crate::proxy::dial::default_resolver(std::time::Duration::from_secs(5)),
        }
    }
}

pub struct RunningGateway {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    config: GatewayConfig,
    stop: CancellationToken,
    stop_admin: CancellationToken,
    connections: TaskTracker,
    proxy: Arc<Proxy>,
    health: Arc<Health>,
    audit: AuditLog,
    audit_writer: AuditWriter,
    identity: IdentitySource,
    policy: PolicyStore,
    telemetry: Arc<Telemetry>,
}

pub async fn start(config: GatewayConfig) -> Result<RunningGateway, StartError> {
    start_with(config, Dependencies::default()).await
}

pub async fn start_with(
    config: GatewayConfig,
    deps: Dependencies,
) -> Result<RunningGateway, StartError> {
    let telemetry = Arc::new(Telemetry::new(&config.telemetry)?);
    // Secret and CA files are checked with every load and reload (and again every few
    // seconds): a pathway whose file cannot be read is out of service on its own.
    let secrets = crate::upstream::Secrets::default();
    let availability = Arc::new(crate::upstream::Availability::new(
        secrets.clone(),
        telemetry.metrics.pathway_unavailable.clone(),
    ));
    let policy =
        PolicyStore::load_checked(&config.policy, Some(availability_check(&availability))).await?;
    let limits = Arc::new(crate::limits::Limits::from_config(
        &config.limits_backend,
        config.on_backend_error,
    )?);
    tracing::info!(path = %config.policy.display(), "policy loaded");
    let (audit, audit_writer) =
        AuditLog::open_rotating(&config.telemetry.audit_log, config.telemetry.audit_rotation)
            .await?;
    let reader = limits.clone();
    telemetry.metrics.set_limits_reader(Box::new(move || {
        reader
            .snapshot()
            .into_iter()
            .map(|u| crate::metrics::LimitReading {
                agent: u.agent,
                pathway: u.pathway,
                limit: u.kind,
                used: u.used,
                max: u.limit,
            })
            .collect()
    }));
    let store = policy.clone();
    telemetry
        .metrics
        .set_token_pathways_reader(Box::new(move || {
            let current = store.current();
            current
                .agents()
                .flat_map(|a| {
                    a.pathways
                        .iter()
                        .filter(|p| p.limits.llm_tokens_per_hour.is_some())
                        .map(|p| (a.name.to_string(), p.name.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        }));
    let errors = telemetry.metrics.limits_backend_errors.clone();
    // Both series exist from the start, so `rate()` and alerts see a 0, not nothing.
    for outcome in ["denied", "counted_locally"] {
        errors
            .get_or_create(&crate::metrics::OutcomeLabels { outcome })
            .inc_by(0);
    }
    limits.on_backend_error(Box::new(move |outcome| {
        errors
            .get_or_create(&crate::metrics::OutcomeLabels { outcome })
            .inc();
    }));
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        tracing::info!(%endpoint, protocol = ?config.telemetry.otlp_protocol, "exporting traces with OTLP");
    }

    let interception = match &config.interception {
        None => None,
        Some(settings) => {
            let ca = crate::interception::InterceptionCa::load(
                settings.clone(),
                telemetry.metrics.interception_leaf_mints.clone(),
            )?;
            tracing::info!(ca_cert = %settings.ca_cert.display(), leaf_ttl = ?settings.leaf_ttl, "TLS interception on for L7 pathways' destinations");
            Some(Arc::new(ca))
        }
    };

    let health = Arc::new(Health::default());
    health.set_policy(policy.clone());
    let admin = bind("admin", config.admin).await?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        what: "admin",
        addr: config.admin,
        source,
    })?;
    let stop_admin = CancellationToken::new();
    tokio::spawn(crate::admin::serve(
        admin,
        health.clone(),
        crate::admin::AdminExtras {
            metrics: Some(telemetry.metrics.clone()),
            interception_ca: interception.clone(),
        },
        stop_admin.clone(),
    ));
    tracing::info!(%admin_addr, "admin listener up (/healthz, /readyz, /metrics)");

    let identity = match IdentitySource::connect_as(
        &config.workload_api,
        config.identity_startup_timeout,
        config.identity_spiffe_id.as_ref(),
    )
    .await
    {
        Ok(i) => i,
        Err(e) => {
            stop_admin.cancel();
            return Err(e.into());
        }
    };
    health.set_identity(identity.clone());
    let tls = server_config(&identity, policy.accepted_trust_domains())?;

    let tcp = bind("mTLS proxy", config.listen).await?;
    let proxy_addr = tcp.local_addr().map_err(|source| StartError::Bind {
        what: "mTLS proxy",
        addr: config.listen,
        source,
    })?;
    let dialer = Dialer::new(deps.resolver, config.timeouts.connect);
    let proxy = Arc::new(
        Proxy::new(
            policy.clone(),
            audit.clone(),
            telemetry.clone(),
            dialer,
            config.timeouts.idle,
        )
        .with_client_hello_timeout(config.timeouts.handshake)
        .with_response_timeout(config.timeouts.response)
        .with_global_allow(config.allow_cidrs.clone())
        .with_upstream_pool(config.upstream_pool)
        .with_l7(limits, secrets, identity.clone())
        .with_interception(interception),
    );
    let listener = Listener::new(
        tcp,
        tls,
        proxy.clone(),
        config.timeouts.clone(),
        config.resource_limits.clone(),
        telemetry.metrics.clone(),
    );
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::spawn(listener.run(stop.clone(), connections.clone()));
    {
        // A Secret mounted (or fixed) after start-up brings its pathway back without a
        // reload; the gauge follows.
        let (policy, availability, stop) = (policy.clone(), availability.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(AVAILABILITY_RECHECK);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => availability.check(&policy.current()).await,
                }
            }
        });
    }
    crate::policy_watch::recheck_on_swap(policy.clone(), proxy.registry().clone(), stop.clone());
    // Connections and tunnels end with the certificate that opened them.
    crate::proxy::peer_lifetime::enforce(
        proxy.registry().clone(),
        identity.clone(),
        audit.clone(),
        telemetry.metrics.clone(),
        stop.clone(),
    );
    let watched = {
        let (policy, metrics) = (policy.clone(), telemetry.metrics.clone());
        move || {
            let (policy, metrics) = (policy.clone(), metrics.clone());
            async move {
                match policy.reload_if_changed().await {
                    None => {}
                    Some(Ok(_)) => {
                        metrics.record_policy_reload(true);
                        tracing::info!(path = %policy.path().display(), "policy reloaded (file changed)");
                    }
                    Some(Err(e)) => {
                        metrics.record_policy_reload(false);
                        tracing::error!(error = %e, "policy reload rejected; the previous policy stays in force");
                    }
                }
            }
        }
    };
    if let Err(e) = crate::policy_watch::watch_file(policy.path(), watched, stop.clone()) {
        // SIGHUP still reloads; a missing watcher is not a reason to refuse to serve.
        tracing::warn!(error = %e, "policy file changes will not be picked up automatically");
    }
    tracing::info!(%proxy_addr, spiffe_id = ?identity.current().map(|m| m.spiffe_id.to_string()), "egress gateway listening (mTLS)");

    Ok(RunningGateway {
        proxy_addr,
        admin_addr,
        config,
        stop,
        stop_admin,
        connections,
        proxy,
        health,
        audit,
        audit_writer,
        identity,
        policy,
        telemetry,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

impl RunningGateway {
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn identity(&self) -> &IdentitySource {
        &self.identity
    }

    pub fn policy(&self) -> &PolicyStore {
        &self.policy
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Per-agent, per-pathway limits and their consumption ([`crate::limits::Limits::snapshot`]).
    pub fn limits(&self) -> &Arc<crate::limits::Limits> {
        self.proxy.limits()
    }

    /// Re-reads the policy file; on success it is in force for the next decision.
    ///
    /// The returned future owns what it needs, so a signal handler can spawn it and
    /// keep answering signals (SIGTERM) while files are read; every file read in it is
    /// off the runtime and bounded in time.
    pub fn reload_policy(
        &self,
    ) -> impl std::future::Future<Output = Result<(), egress_policy::PolicyError>> + Send + 'static
    {
        let (policy, metrics) = (self.policy.clone(), self.telemetry.metrics.clone());
        async move {
            match policy.reload().await {
                Ok(_) => {
                    metrics.record_policy_reload(true);
                    tracing::info!(path = %policy.path().display(), "policy reloaded");
                    Ok(())
                }
                Err(e) => {
                    metrics.record_policy_reload(false);
                    tracing::error!(error = %e, "policy reload rejected; the previous policy stays in force");
                    Err(e)
                }
            }
        }
    }

    /// Reopens a file audit log at its path (SIGUSR1: logrotate moved the old file);
    /// every record before this call is in the old file, every one after in the new.
    pub fn reopen_audit_log(
        &self,
    ) -> impl std::future::Future<Output = Result<(), AuditError>> + Send + 'static {
        let audit = self.audit.clone();
        async move { audit.reopen().await }
    }

    /// Stops accepting, lets in-flight requests and tunnels finish until the grace period
    /// ends, closes what is left, and flushes the audit log.
    pub async fn shutdown(self) {
        tracing::info!(grace = ?self.config.shutdown_grace, "shutting down: draining connections and tunnels");
        self.health.set_draining();
        self.stop.cancel();
        self.connections.close();
        self.proxy.tunnels().close();
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            self.connections.wait().await;
            self.proxy.tunnels().wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over; closing remaining tunnels");
            self.proxy.close_tunnels();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.proxy.tunnels().wait(),
            )
            .await;
        }
        self.audit.flush().await;
        self.telemetry.shutdown().await;
        self.stop_admin.cancel();
        self.identity.shutdown().await;
        drop(self.proxy);
        drop(self.audit);
        // Other audit senders live in tasks that have ended by now; don't wait forever.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.audit_writer.close())
            .await;
        tracing::info!("shutdown complete");
    }
}
