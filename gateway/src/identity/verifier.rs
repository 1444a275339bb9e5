//! SPIFFE certificate verification for rustls, in both directions.
//!
//! X.509-SVIDs carry no DNS name to check; what identifies a peer is its one
//! `spiffe://` URI SAN, and what makes it trusted is a chain to the bundle of that ID's
//! trust domain. Both verifiers read the current bundles on every handshake.

use std::sync::Arc;
use std::time::SystemTime;

use egress_policy::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{peer_spiffe_id, AcceptedTrustDomains, IdentitySource, PeerIdError};

/// Why a peer's certificate was refused, beyond what webpki reports itself.
#[derive(Debug, thiserror::Error)]
pub enum SpiffeRejection {
    #[error("{0}")]
    PeerId(PeerIdError),
    #[error("trust domain `{0}` is not accepted by the policy")]
    TrustDomainNotAccepted(String),
    #[error("no trust bundle for trust domain `{0}`")]
    NoBundle(String),
    #[error("the gateway has no SVID yet")]
    NoLocalIdentity,
    #[error("peer is `{got}`, expected `{expected}`")]
    UnexpectedPeer { got: String, expected: String },
}

/// Handshake signatures are checked with the provider's algorithms, as webpki would.
fn algorithms(provider: &CryptoProvider) -> &rustls::crypto::WebPkiSupportedAlgorithms {
    &provider.signature_verification_algorithms
}

fn reject(r: SpiffeRejection) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(r))))
}

/// Verifies client SVIDs on the gateway's mTLS listener.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    identity: IdentitySource,
    accepted: AcceptedTrustDomains,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySource")
            .field("endpoint", &self.endpoint())
            .finish()
    }
}

impl SpiffeClientVerifier {
    pub fn new(
        identity: IdentitySource,
        accepted: AcceptedTrustDomains,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            identity,
            accepted,
            provider,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = peer_spiffe_id(end_entity).map_err(|e| reject(SpiffeRejection::PeerId(e)))?;
        let td = id.trust_domain();
        if !self.accepted.load().iter().any(|a| a == td) {
            return Err(reject(SpiffeRejection::TrustDomainNotAccepted(td.into())));
        }
        let material = self
            .identity
            .current()
            .ok_or_else(|| reject(SpiffeRejection::NoLocalIdentity))?;
        let verifier = material
            .client_verifier(td)
            .ok_or_else(|| reject(SpiffeRejection::NoBundle(td.into())))?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, algorithms(&self.provider))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, algorithms(&self.provider))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms(&self.provider).supported_schemes()
    }
}

/// Verifies that a server presents exactly one expected SPIFFE ID, chained to the bundle
/// of that ID's trust domain (federated bundles included). The TLS server name is not
/// checked: SVIDs need not carry DNS names.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    identity: IdentitySource,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(
        identity: IdentitySource,
        expected: SpiffeId,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            identity,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = peer_spiffe_id(end_entity).map_err(|e| reject(SpiffeRejection::PeerId(e)))?;
        if id != self.expected {
            return Err(reject(SpiffeRejection::UnexpectedPeer {
                got: id.to_string(),
                expected: self.expected.to_string(),
            }));
        }
        let material = self
            .identity
            .current()
            .ok_or_else(|| reject(SpiffeRejection::NoLocalIdentity))?;
        let roots = material
            .roots(id.trust_domain())
            .ok_or_else(|| reject(SpiffeRejection::NoBundle(id.trust_domain().into())))?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, algorithms(&self.provider))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, algorithms(&self.provider))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms(&self.provider).supported_schemes()
    }
}

/// What a client authenticated with on the mTLS listener, kept while its connection
/// and the tunnels it opened are open: the gateway closes them when the certificate
/// expires and re-verifies the chain when the trust bundles change.
#[derive(Debug, Clone)]
pub struct PeerCredential {
    /// The chain the client presented, leaf first.
    pub chain: Arc<[CertificateDer<'static>]>,
    /// The earliest `notAfter` in that chain: the chain verifies until then at most.
    pub not_after: SystemTime,
}

impl PeerCredential {
    /// From the verified chain of a finished handshake; `None` for an empty or
    /// unparsable one (which the verifier would have refused).
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<Self> {
        let mut not_after: Option<SystemTime> = None;
        for cert in chain {
            let (_, end) = super::material::validity(cert).ok()?;
            not_after = Some(not_after.map_or(end, |n| n.min(end)));
        }
        Some(PeerCredential {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            not_after: not_after?,
        })
    }

    /// Verifies the chain again, now, against the current bundle of its trust domain,
    /// as the listener's verifier did at the handshake.
    pub fn verify(&self, identity: &IdentitySource) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = self
            .chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let id = peer_spiffe_id(leaf).map_err(|e| reject(SpiffeRejection::PeerId(e)))?;
        let td = id.trust_domain();
        let material = identity
            .current()
            .ok_or_else(|| reject(SpiffeRejection::NoLocalIdentity))?;
        let verifier = material
            .client_verifier(td)
            .ok_or_else(|| reject(SpiffeRejection::NoBundle(td.into())))?;
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
    }
}
