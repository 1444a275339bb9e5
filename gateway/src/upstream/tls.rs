//! TLS origination for L7 pathways: public roots (webpki-roots) or the pathway's
//! `ca_file`, with SNI and name verification for the destination host; or SPIFFE mTLS
//! with the gateway's current SVID, accepting only the pathway's `spiffe_id`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use egress_policy::{SpiffeId, Upstream};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::files::{self, FileError, FileKind};
use crate::identity::{client_config_for_peer, crypto_provider, IdentitySource};

#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    /// Missing, not a regular file, over the size cap, or a read that timed out.
    #[error(transparent)]
    CaFile(#[from] FileError),
    #[error("ca_file {}: no usable PEM certificates", path.display())]
    CaEmpty { path: PathBuf },
    #[error("cannot build the upstream TLS configuration: {0}")]
    Build(String),
    #[error("upstream.spiffe_id needs the gateway's own SVID, which is not available")]
    NoIdentity,
}

/// Which verification settings a pooled connection was made with. Part of the pool
/// key, so connections are never shared across different verification settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProfileKey {
    PublicRoots,
    /// The file and the version of it the roots were read from.
    CaFile(PathBuf, Option<SystemTime>, u64),
    Spiffe(String),
}

/// Reads (off the runtime, bounded; see [`crate::files`]) and parses a PEM CA file.
pub async fn read_ca_file(path: &Path) -> Result<RootCertStore, OriginationError> {
    let pem = files::read_file(path, FileKind::CaBundle, files::READ_TIMEOUT).await?;
    parse_ca_pem(path, &pem)
}

/// The trust anchors in a CA file's bytes; none is an error naming the file.
pub fn parse_ca_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, OriginationError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(OriginationError::CaEmpty {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// Client configs per verification profile, built once and reused.
pub struct UpstreamTls {
    identity: Option<IdentitySource>,
    configs: DashMap<ProfileKey, Arc<ClientConfig>>,
}

impl UpstreamTls {
    /// `x-forwarded-client-cert: By=<gateway id>;URI=<agent id>` (Envoy's format) for an
    /// east-west request, so the workload can authorize the calling agent while trusting
    /// only the gateway's SVID; `None` while the gateway has no SVID.
    pub fn forwarded_client_cert(&self, agent: &SpiffeId) -> Option<http::HeaderValue> {
        let gateway = self.identity.as_ref()?.current()?;
        // SPIFFE IDs hold no `;`, `,` or `"`, so neither needs quoting.
        http::HeaderValue::from_str(&format!("By={};URI={agent}", gateway.spiffe_id)).ok()
    }

    pub fn new(identity: Option<IdentitySource>) -> Self {
        UpstreamTls {
            identity,
            configs: DashMap::new(),
        }
    }

    /// The profile for a pathway's `upstream`, or `None` for plain HTTP.
    pub async fn profile(
        &self,
        up: &Upstream,
    ) -> Result<Option<(ProfileKey, Arc<ClientConfig>)>, OriginationError> {
        let key = if let Some(id) = &up.spiffe_id {
            ProfileKey::Spiffe(id.to_string())
        } else if let Some(ca) = &up.ca_file {
            let meta = files::metadata(ca, files::READ_TIMEOUT)
                .await
                .map_err(|source| FileError::Io {
                    kind: FileKind::CaBundle,
                    path: ca.clone(),
                    source,
                })?;
            ProfileKey::CaFile(ca.clone(), meta.modified().ok(), meta.len())
        } else if up.tls {
            ProfileKey::PublicRoots
        } else {
            return Ok(None);
        };
        if let Some(c) = self.configs.get(&key) {
            return Ok(Some((key, c.clone())));
        }
        let config = match (&key, &up.spiffe_id) {
            (ProfileKey::Spiffe(_), Some(id)) => self.spiffe_config(id)?,
            (ProfileKey::CaFile(path, ..), _) => roots_config(read_ca_file(path).await?)?,
            _ => roots_config(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })?,
        };
        if let ProfileKey::CaFile(path, ..) = &key {
            // Older versions of the same file are never used again.
            self.configs
                .retain(|k, _| !matches!(k, ProfileKey::CaFile(p, ..) if p == path));
        }
        self.configs.insert(key.clone(), config.clone());
        Ok(Some((key, config)))
    }

    fn spiffe_config(&self, id: &SpiffeId) -> Result<Arc<ClientConfig>, OriginationError> {
        let identity = self.identity.as_ref().ok_or(OriginationError::NoIdentity)?;
        client_config_for_peer(identity, id.clone())
            .map_err(|e| OriginationError::Build(e.to_string()))
    }
}

fn roots_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, OriginationError> {
    let mut cfg = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| OriginationError::Build(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// SNI and the name verified: the destination host (an IP literal verifies an IP SAN).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .ok()
        .map(|n| n.to_owned())
}
