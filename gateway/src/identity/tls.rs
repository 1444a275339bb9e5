//! rustls configurations that always present the current SVID.

use std::sync::Arc;

use egress_policy::SpiffeId;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use super::{
    crypto_provider, AcceptedTrustDomains, IdentitySource, SpiffeClientVerifier,
    SpiffeServerVerifier,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot build TLS configuration: {0}")]
    Build(#[from] rustls::Error),
}

#[derive(Debug)]
struct CurrentSvid(IdentitySource);

impl ResolvesServerCert for CurrentSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|m| m.certified_key.clone())
    }
}

impl ResolvesClientCert for CurrentSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|m| m.certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.current().is_some()
    }
}

/// The mTLS listener's configuration: requires a client SVID of an accepted trust domain.
///
/// Session resumption is off: rustls does not re-run the client verifier on a resumed
/// handshake, so a resumed session could outlive its SVID or a bundle change.
pub fn server_config(
    identity: &IdentitySource,
    accepted: AcceptedTrustDomains,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeClientVerifier::new(
        identity.clone(),
        accepted,
        provider.clone(),
    ));
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentSvid(identity.clone())));
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration that presents the current SVID and accepts only `expected`
/// as the server (east-west upstreams, and the sidecar's hop to the gateway).
pub fn client_config_for_peer(
    identity: &IdentitySource,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        identity.clone(),
        expected,
        provider.clone(),
    ));
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentSvid(identity.clone())));
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
