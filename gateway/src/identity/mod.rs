//! The gateway's own identity: X.509-SVIDs and trust bundles from the SPIFFE Workload API.
//!
//! `IdentitySource` keeps the latest usable material in an `ArcSwap`. New TLS handshakes
//! read it, so a rotation applies to the next handshake and never touches open
//! connections. The swap happens only once the new material is fully built, so there is
//! no window in which a handshake finds no certificate.

mod failure;
mod material;
mod tls;
mod verifier;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use spiffe::x509_source::SvidPicker;
use spiffe::{SpiffeId, X509Source, X509Svid};
use tokio::sync::watch;

pub use failure::describe_tls_failure;
pub use material::{peer_spiffe_id, Material, MaterialError, PeerIdError};
pub use tls::{client_config_for_peer, server_config, TlsError};
pub use verifier::{PeerCredential, SpiffeClientVerifier, SpiffeRejection, SpiffeServerVerifier};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no X.509-SVID from the Workload API at {endpoint} within {timeout:?}: {cause}. \
         Is the SPIRE agent running, is the socket path right, and is this workload registered?"
    )]
    NoInitialSvid {
        endpoint: String,
        timeout: Duration,
        cause: String,
    },
    #[error("the Workload API at {endpoint} sent unusable material: {source}")]
    Material {
        endpoint: String,
        source: MaterialError,
    },
}

/// Trust domains whose clients the listener accepts; swapped on policy reload.
pub type AcceptedTrustDomains = Arc<ArcSwap<Vec<String>>>;

/// The current SVID and bundles, and who to tell when they change.
#[derive(Clone)]
pub struct IdentitySource {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwapOption<Material>,
    generation: watch::Sender<u64>,
    endpoint: String,
    // Kept so the Workload API stream stays open for the gateway's lifetime.
    source: std::sync::Mutex<Option<X509Source>>,
}

impl IdentitySource {
    /// Connects to the Workload API and waits (bounded) for the first SVID, logging
    /// while it waits so an operator sees why start-up is stuck.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, IdentityError> {
        Self::connect_as(endpoint, timeout, None).await
    }

    /// Like `connect`, but with `spiffe_id` the SVID with that ID is the gateway's,
    /// whatever its place in the Workload API's list; until one is served, this waits
    /// as it would for the first SVID.
    pub async fn connect_as(
        endpoint: &str,
        timeout: Duration,
        spiffe_id: Option<&SpiffeId>,
    ) -> Result<Self, IdentityError> {
        let mut builder = X509Source::builder()
            .endpoint(endpoint)
            .initial_sync_timeout(timeout);
        if let Some(id) = spiffe_id {
            builder = builder.picker(PickById(id.clone()));
        }
        let build = builder.build();
        tokio::pin!(build);
        let started = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.tick().await;
        let source = loop {
            tokio::select! {
                result = &mut build => break result.map_err(|e| IdentityError::NoInitialSvid {
                    endpoint: endpoint.to_string(),
                    timeout,
                    cause: e.to_string(),
                })?,
                _ = tick.tick() => tracing::warn!(
                    endpoint,
                    waited_s = started.elapsed().as_secs(),
                    "still waiting for the first X.509-SVID from the Workload API"
                ),
            }
        };
        let material =
            Material::from_source(&source, 0).map_err(|source| IdentityError::Material {
                endpoint: endpoint.to_string(),
                source,
            })?;
        tracing::info!(
            spiffe_id = %material.spiffe_id,
            expires = %humantime::format_rfc3339_seconds(material.not_after),
            trust_domains = ?material.trust_domains(),
            "received X.509-SVID from the Workload API"
        );
        let this = Self::with_material(endpoint, material);
        this.watch(source);
        Ok(this)
    }

    /// An identity with fixed material: for tests that do not need a Workload API.
    pub fn with_material(endpoint: &str, material: Material) -> Self {
        let (generation, _) = watch::channel(material.generation);
        IdentitySource {
            inner: Arc::new(Inner {
                current: ArcSwapOption::from_pointee(material),
                generation,
                endpoint: endpoint.to_string(),
                source: std::sync::Mutex::new(None),
            }),
        }
    }

    fn watch(&self, source: X509Source) {
        let mut updates = source.updated();
        if let Ok(mut slot) = self.inner.source.lock() {
            *slot = Some(source.clone());
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(seq) = updates.changed().await else {
                    tracing::warn!(endpoint = %this.inner.endpoint, "Workload API source closed; keeping the last SVID");
                    return;
                };
                match Material::from_source(&source, seq) {
                    Ok(material) => {
                        tracing::info!(
                            spiffe_id = %material.spiffe_id,
                            expires = %humantime::format_rfc3339_seconds(material.not_after),
                            generation = seq,
                            "X.509-SVID or bundles rotated"
                        );
                        this.install(material);
                    }
                    // Keep serving with what we have: its expiry bounds how long.
                    Err(e) => {
                        tracing::error!(error = %e, "ignoring unusable Workload API update; keeping the previous SVID")
                    }
                }
            }
        });
    }

    /// Replaces the current material (rotation).
    pub fn install(&self, material: Material) {
        let generation = material.generation;
        self.inner.current.store(Some(Arc::new(material)));
        self.inner.generation.send_replace(generation);
    }

    pub fn current(&self) -> Option<Arc<Material>> {
        self.inner.current.load_full()
    }

    /// True while the current SVID is within its validity period.
    pub fn is_ready(&self) -> bool {
        self.current()
            .is_some_and(|m| m.not_after > SystemTime::now() && m.not_before <= SystemTime::now())
    }

    /// Notified with the material generation on every rotation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// Closes the Workload API stream.
    pub async fn shutdown(&self) {
        let source = self.inner.source.lock().ok().and_then(|mut s| s.take());
        if let Some(source) = source {
            source.shutdown().await;
        }
    }
}

/// Selects the SVID with one SPIFFE ID. No match leaves the source without an identity
/// (it never falls back to another SVID), so the gateway cannot serve as someone else.
struct PickById(SpiffeId);

impl SvidPicker for PickById {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.spiffe_id() == &self.0)
    }
}

/// The crypto provider every TLS config of the gateway uses.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}
