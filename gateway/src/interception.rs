//! The interception CA: signs the per-host leaf certificates the gateway presents to
//! agents when it terminates their TLS for a destination an L7 pathway names.
//!
//! Both files are checked at start-up (readable, a CA certificate that may sign, a key
//! that matches it) and re-read when they change (a Kubernetes Secret update); a change
//! that does not check out is logged and the previous CA stays in force. The key never
//! reaches a log, an error message or a metric.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus_client::metrics::counter::Counter;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Interception;
use crate::files::{read_file_blocking, FileError, FileKind, FileStamp};
use crate::identity::crypto_provider;

/// How often a new tunnel may look at the files' metadata for a change.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// Leaves start a little in the past, for agents whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum InterceptionError {
    #[error("interception.{key}: {source}")]
    Read {
        key: &'static str,
        source: FileError,
    },
    #[error("interception.ca_cert {}: no PEM certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("interception.ca_cert {}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error(
        "interception.ca_key {}: no usable PEM private key (PKCS#8, SEC1 or PKCS#1; ECDSA P-256/P-384 or RSA)",
        path.display()
    )]
    BadKey { path: PathBuf },
    #[error("interception.ca_key {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("cannot sign a leaf certificate for {host}: {reason}")]
    Mint { host: String, reason: String },
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    std::fs::metadata(path).map(|m| FileStamp::of(&m))
}

/// Reads a small regular file; a FIFO, a device or a directory is refused before it is
/// opened, so a wrong path cannot wedge the gateway.
fn read_pem_file(
    key: &'static str,
    path: &Path,
) -> Result<(FileStamp, Vec<u8>), InterceptionError> {
    let err = |source: FileError| InterceptionError::Read { key, source };
    let st = stamp(path).map_err(|source| {
        err(FileError::Io {
            kind: FileKind::InterceptionCa,
            path: path.to_owned(),
            source,
        })
    })?;
    let bytes = read_file_blocking(path, FileKind::InterceptionCa).map_err(err)?;
    Ok((st, bytes))
}

/// One loaded version of the CA files.
struct Loaded {
    stamps: (FileStamp, FileStamp),
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate and any further certificates of its file (an intermediate's
    /// chain), sent after each leaf.
    chain: Vec<CertificateDer<'static>>,
    /// The certificate file as PEM, served at `/interception-ca.pem`.
    pem: String,
    not_after: SystemTime,
    generation: u64,
}

/// A leaf for one host and when to replace it.
struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: SystemTime,
    generation: u64,
}

/// The loaded CA, its leaf cache and the watch on its files.
pub struct InterceptionCa {
    settings: Interception,
    current: ArcSwap<Loaded>,
    leaves: DashMap<String, Leaf>,
    last_check: Mutex<Instant>,
    /// The file versions that last failed to load, so a bad update is logged once.
    rejected: Mutex<Option<(Option<FileStamp>, Option<FileStamp>)>>,
    mints: Counter,
}

impl std::fmt::Debug for InterceptionCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterceptionCa")
            .field("ca_cert", &self.settings.ca_cert)
            .field("leaves", &self.leaves.len())
            .finish_non_exhaustive()
    }
}

impl InterceptionCa {
    /// Loads and checks both files; an error names the file and what is wrong.
    pub fn load(settings: Interception, mints: Counter) -> Result<Self, InterceptionError> {
        let loaded = load(&settings, 0)?;
        let remaining = loaded
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if remaining < settings.leaf_ttl {
            tracing::warn!(
                ca_cert = %settings.ca_cert.display(),
                remaining = ?remaining,
                leaf_ttl = ?settings.leaf_ttl,
                "interception CA expires before leaf_ttl; leaves end with the CA"
            );
        }
        Ok(InterceptionCa {
            settings,
            current: ArcSwap::from_pointee(loaded),
            leaves: DashMap::new(),
            last_check: Mutex::new(Instant::now()),
            rejected: Mutex::new(None),
            mints,
        })
    }

    /// The CA certificate file as PEM (what agents must trust).
    pub fn certificate_pem(&self) -> String {
        self.refresh_if_changed();
        self.current.load().pem.clone()
    }

    /// The TLS configuration for an agent's tunnel to `host`: a leaf for exactly that
    /// name, minted on first use and reused until 80 % of its life has passed. The
    /// caller has already checked that the agent's policy names the host.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, InterceptionError> {
        self.refresh_if_changed();
        let ca = self.current.load_full();
        let now = SystemTime::now();
        if let Some(leaf) = self.leaves.get(host) {
            if leaf.generation == ca.generation && now < leaf.renew_at {
                return Ok(leaf.config.clone());
            }
        }
        // Minted outside the map's lock; two tunnels racing for a new host may both
        // mint, which costs a signature, not correctness.
        let (config, renew_at) = self.mint(&ca, host, now)?;
        self.leaves.insert(
            host.to_string(),
            Leaf {
                config: config.clone(),
                renew_at,
                generation: ca.generation,
            },
        );
        Ok(config)
    }

    fn mint(
        &self,
        ca: &Loaded,
        host: &str,
        now: SystemTime,
    ) -> Result<(Arc<ServerConfig>, SystemTime), InterceptionError> {
        let fail = |reason: String| InterceptionError::Mint {
            host: host.to_string(),
            reason,
        };
        let not_before = now - BACKDATE;
        let not_after = (now + self.settings.leaf_ttl).min(ca.not_after);
        if not_after <= now {
            return Err(fail("the interception CA has expired".into()));
        }
        let mut params =
            CertificateParams::new(vec![host.to_string()]).map_err(|e| fail(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(e.to_string()))?;
        let cert = params
            .signed_by(&key, &ca.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(ca.chain.iter().cloned());
        let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| fail(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| fail(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        self.mints.inc();
        let life = not_after.duration_since(now).unwrap_or_default();
        Ok((Arc::new(config), now + life.mul_f64(0.8)))
    }

    /// Re-reads the files when their metadata changed (checked at most once a second).
    /// A change that does not load is logged once; the previous CA stays in force.
    fn refresh_if_changed(&self) {
        {
            let Ok(mut last) = self.last_check.lock() else {
                return;
            };
            if last.elapsed() < RECHECK_EVERY {
                return;
            }
            *last = Instant::now();
        }
        let now = (
            stamp(&self.settings.ca_cert).ok(),
            stamp(&self.settings.ca_key).ok(),
        );
        let current = self.current.load();
        if now == (Some(current.stamps.0), Some(current.stamps.1)) {
            return;
        }
        if let Ok(rejected) = self.rejected.lock() {
            if *rejected == Some(now) {
                return;
            }
        }
        match load(&self.settings, current.generation + 1) {
            Ok(loaded) => {
                tracing::info!(ca_cert = %self.settings.ca_cert.display(), "interception CA reloaded");
                self.current.store(Arc::new(loaded));
                self.leaves.clear();
                if let Ok(mut rejected) = self.rejected.lock() {
                    *rejected = None;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "interception CA update rejected; the previous CA stays in force");
                if let Ok(mut rejected) = self.rejected.lock() {
                    *rejected = Some(now);
                }
            }
        }
    }
}

fn load(settings: &Interception, generation: u64) -> Result<Loaded, InterceptionError> {
    let cert_path = &settings.ca_cert;
    let key_path = &settings.ca_key;
    let (cert_stamp, cert_pem) = read_pem_file("ca_cert", cert_path)?;
    let (key_stamp, key_pem) = read_pem_file("ca_key", key_path)?;
    let bad_cert = |reason: String| InterceptionError::BadCertificate {
        path: cert_path.clone(),
        reason,
    };

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad_cert(format!("not PEM: {e}")))?;
    let Some(ca_der) = chain.first() else {
        return Err(InterceptionError::NoCertificate {
            path: cert_path.clone(),
        });
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| bad_cert(format!("not an X.509 certificate: {e}")))?;
    let is_ca = parsed
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(bad_cert(
            "not a CA certificate (basicConstraints CA:TRUE is required)".into(),
        ));
    }
    if let Ok(Some(ku)) = parsed.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(bad_cert(
                "its keyUsage does not allow signing certificates (keyCertSign)".into(),
            ));
        }
    }
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
    if not_after <= SystemTime::now() {
        return Err(bad_cert(format!(
            "expired ({})",
            parsed.validity().not_after
        )));
    }

    let bad_key = || InterceptionError::BadKey {
        path: key_path.clone(),
    };
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| bad_key())?;
    let key = KeyPair::try_from(&key_der).map_err(|_| bad_key())?;
    if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
        return Err(InterceptionError::KeyMismatch {
            key: key_path.clone(),
            cert: cert_path.clone(),
        });
    }
    let issuer = Issuer::from_ca_cert_der(ca_der, key).map_err(|e| bad_cert(e.to_string()))?;
    // Re-encoded from the parsed certificates: whatever else the file holds (a key
    // pasted into the same file) is never published.
    let pem = chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect::<String>();
    Ok(Loaded {
        stamps: (cert_stamp, key_stamp),
        issuer,
        chain,
        pem,
        not_after,
        generation,
    })
}
