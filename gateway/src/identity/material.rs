//! One generation of identity material, converted once into what rustls needs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use egress_policy::SpiffeId;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;

use super::crypto_provider;

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("no usable SVID: {0}")]
    NoSvid(String),
    #[error("no trust bundles: {0}")]
    NoBundles(String),
    #[error("the SVID's private key is unusable: {0}")]
    Key(rustls::Error),
    #[error("the SVID's certificate is unusable: {0}")]
    Certificate(String),
    #[error("no trust bundle could be turned into a root store ({0})")]
    NoRoots(String),
}

/// Why a peer certificate carries no usable SPIFFE ID.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PeerIdError {
    #[error("certificate cannot be parsed")]
    Unparsable,
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    TooManyUris(usize),
    #[error("URI SAN `{0}` is not a valid SPIFFE ID")]
    InvalidSpiffeId(String),
}

/// The SVID to present and the bundles to verify peers with.
pub struct Material {
    pub spiffe_id: SpiffeId,
    pub certified_key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub generation: u64,
    /// Trust domain name -> verifiers built from its bundle.
    bundles: HashMap<String, Bundle>,
}

struct Bundle {
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &self.not_after)
            .field("generation", &self.generation)
            .field("trust_domains", &self.trust_domains())
            .finish()
    }
}

impl Material {
    pub fn from_source(source: &X509Source, generation: u64) -> Result<Self, MaterialError> {
        let svid = source
            .svid()
            .map_err(|e| MaterialError::NoSvid(e.to_string()))?;
        let bundle_set = source
            .bundle_set()
            .map_err(|e| MaterialError::NoBundles(e.to_string()))?;
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec());
        let bundles = bundle_set
            .iter()
            .map(|(td, bundle)| {
                let cas = bundle
                    .authorities()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                    .collect();
                (td.to_string(), cas)
            })
            .collect();
        Self::from_parts(chain, key, bundles, generation)
    }

    /// Builds material from DER parts: the leaf-first chain, its PKCS#8 key and the CA
    /// certificates of every trust domain (own and federated).
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
        bundles: Vec<(String, Vec<CertificateDer<'static>>)>,
        generation: u64,
    ) -> Result<Self, MaterialError> {
        let leaf = chain
            .first()
            .ok_or_else(|| MaterialError::Certificate("empty chain".into()))?;
        let spiffe_id =
            peer_spiffe_id(leaf).map_err(|e| MaterialError::Certificate(e.to_string()))?;
        let (not_before, not_after) = validity(leaf)?;
        let provider = crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key))
            .map_err(MaterialError::Key)?;
        let certified_key = Arc::new(CertifiedKey::new(chain, signing_key));

        let mut out = HashMap::new();
        let mut last_error = String::from("the bundle set is empty");
        for (td, cas) in bundles {
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(cas);
            if added == 0 {
                last_error = format!("trust domain {td}: no parsable CA certificate");
                tracing::warn!(trust_domain = %td, "bundle has no usable CA certificate");
                continue;
            }
            let roots = Arc::new(roots);
            match WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
            {
                Ok(client_verifier) => {
                    out.insert(
                        td,
                        Bundle {
                            roots,
                            client_verifier,
                        },
                    );
                }
                Err(e) => {
                    last_error = format!("trust domain {td}: {e}");
                    tracing::warn!(trust_domain = %td, error = %e, "cannot use bundle");
                }
            }
        }
        if out.is_empty() {
            return Err(MaterialError::NoRoots(last_error));
        }
        Ok(Material {
            spiffe_id,
            certified_key,
            not_before,
            not_after,
            generation,
            bundles: out,
        })
    }

    pub fn trust_domains(&self) -> Vec<&str> {
        let mut tds: Vec<&str> = self.bundles.keys().map(String::as_str).collect();
        tds.sort_unstable();
        tds
    }

    pub(crate) fn client_verifier(
        &self,
        trust_domain: &str,
    ) -> Option<&Arc<dyn ClientCertVerifier>> {
        self.bundles.get(trust_domain).map(|b| &b.client_verifier)
    }

    pub(crate) fn roots(&self, trust_domain: &str) -> Option<&Arc<RootCertStore>> {
        self.bundles.get(trust_domain).map(|b| &b.roots)
    }

    /// Time left until the SVID expires (zero once expired).
    pub fn time_to_expiry(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

pub(crate) fn validity(
    leaf: &CertificateDer<'_>,
) -> Result<(SystemTime, SystemTime), MaterialError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| MaterialError::Certificate(e.to_string()))?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    };
    Ok((
        to_time(cert.validity().not_before),
        to_time(cert.validity().not_after),
    ))
}

/// The SPIFFE ID of a certificate: its one and only URI SAN.
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| PeerIdError::Unparsable)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| PeerIdError::Unparsable)?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(PeerIdError::NoSpiffeId),
        [uri] => {
            if !uri.starts_with("spiffe://") {
                return Err(PeerIdError::NoSpiffeId);
            }
            uri.parse::<SpiffeId>()
                .map_err(|_| PeerIdError::InvalidSpiffeId((*uri).to_string()))
        }
        many => Err(PeerIdError::TooManyUris(many.len())),
    }
}
