//! An in-memory test CA that mints X.509-SVIDs (and ordinary server certificates).
//!
//! SVIDs follow the X.509-SVID spec as the `spiffe` crate enforces it: leaf CA=false,
//! digitalSignature, exactly one `spiffe://` URI SAN; like SPIRE's, they carry both the
//! serverAuth and clientAuth extended key usages.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

pub struct TestCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    /// Intermediates between a minted leaf and the root, nearest the leaf first.
    intermediates: Vec<CertificateDer<'static>>,
}

/// What to put in a minted certificate; everything optional.
#[derive(Debug, Clone, Default)]
pub struct SvidOptions {
    /// The URI SAN; `None` mints a certificate without a SPIFFE ID.
    pub spiffe_id: Option<String>,
    pub extra_uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub not_before: Option<OffsetDateTime>,
    pub not_after: Option<OffsetDateTime>,
    /// Lifetime from now when `not_after` is not given (default one hour).
    pub ttl: Option<Duration>,
}

/// A certificate chain (leaf first) and its PKCS#8 key.
#[derive(Debug)]
pub struct Svid {
    pub spiffe_id: Option<String>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            spiffe_id: self.spiffe_id.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Svid {
    pub fn cert_pem(&self) -> String {
        self.cert_chain
            .iter()
            .map(|c| pem("CERTIFICATE", c))
            .collect()
    }

    pub fn key_pem(&self) -> String {
        pem("PRIVATE KEY", self.key.secret_pkcs8_der())
    }

    pub fn clone_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Writes `<stem>.crt` and `<stem>.key` into `dir`.
    pub fn write_pem_files(&self, dir: &Path, stem: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, self.cert_pem())?;
        std::fs::write(&key, self.key_pem())?;
        Ok((cert, key))
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

impl TestCa {
    /// A self-signed root for `trust_domain`. Each call makes a new key, so two CAs for
    /// the same trust domain do not trust each other's certificates.
    pub fn new(trust_domain: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate CA key");
        let params = Self::ca_params(trust_domain, &format!("test CA for {trust_domain}"));
        let cert = params.self_signed(&key).expect("self-sign CA");
        let root = cert.der().clone();
        let root_pem = cert.pem();
        TestCa {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            root,
            root_pem,
            intermediates: vec![],
        }
    }

    /// A CA signed by this one (same root, same trust domain): its SVIDs carry the chain
    /// `[leaf, intermediate.., ]` as SPIRE's do under an upstream authority.
    pub fn intermediate(&self) -> TestCa {
        let key = KeyPair::generate().expect("generate intermediate key");
        let depth = self.intermediates.len() + 1;
        let params = Self::ca_params(
            &self.trust_domain,
            &format!("test intermediate {depth} for {}", self.trust_domain),
        );
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate");
        let mut intermediates = vec![cert.der().clone()];
        intermediates.extend(self.intermediates.iter().cloned());
        TestCa {
            trust_domain: self.trust_domain.clone(),
            issuer: Issuer::new(params, key),
            root: self.root.clone(),
            root_pem: self.root_pem.clone(),
            intermediates,
        }
    }

    /// Intermediates a minted leaf chains through (empty for a root CA).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    fn ca_params(trust_domain: &str, common_name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "egress-gateway tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        if let Ok(uri) = format!("spiffe://{trust_domain}").try_into() {
            params.subject_alt_names = vec![SanType::URI(uri)];
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(30);
        params.use_authority_key_identifier_extension = true;
        params
    }

    /// This CA's own certificate (its chain up to, not including, the root) and its key
    /// as PEM files: what an operator gives the gateway as `interception.ca_cert`/`ca_key`.
    pub fn write_signing_files(
        &self,
        dir: &Path,
        stem: &str,
    ) -> std::io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        let chain = if self.intermediates.is_empty() {
            self.root_pem.clone()
        } else {
            self.intermediates
                .iter()
                .map(|c| pem("CERTIFICATE", c))
                .collect::<String>()
        };
        std::fs::write(&cert, chain)?;
        std::fs::write(&key, self.issuer.key().serialize_pem())?;
        Ok((cert, key))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_cert(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// A valid X.509-SVID for `spiffe_id`, valid for one hour.
    pub fn mint_svid(&self, spiffe_id: &str) -> Svid {
        self.mint(SvidOptions {
            spiffe_id: Some(spiffe_id.to_string()),
            ..Default::default()
        })
    }

    /// An ordinary TLS server certificate (DNS and IP SANs, no SPIFFE ID).
    pub fn mint_server_cert(&self, names: &[&str]) -> Svid {
        let mut opts = SvidOptions::default();
        for n in names {
            match n.parse::<IpAddr>() {
                Ok(ip) => opts.ip_addresses.push(ip),
                Err(_) => opts.dns_names.push((*n).to_string()),
            }
        }
        self.mint(opts)
    }

    pub fn mint(&self, opts: SvidOptions) -> Svid {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            opts.spiffe_id
                .clone()
                .or_else(|| opts.dns_names.first().cloned())
                .unwrap_or_else(|| "test leaf".into()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut sans = Vec::new();
        for uri in opts.spiffe_id.iter().chain(opts.extra_uris.iter()) {
            sans.push(SanType::URI(uri.clone().try_into().expect("ASCII URI")));
        }
        for dns in &opts.dns_names {
            sans.push(SanType::DnsName(
                dns.clone().try_into().expect("ASCII DNS name"),
            ));
        }
        for ip in &opts.ip_addresses {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        let now = OffsetDateTime::now_utc();
        params.not_before = opts.not_before.unwrap_or(now - time::Duration::minutes(5));
        params.not_after = opts.not_after.unwrap_or_else(|| {
            let ttl = opts.ttl.unwrap_or(Duration::from_secs(3600));
            now + time::Duration::try_from(ttl).unwrap_or(time::Duration::HOUR)
        });
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign leaf certificate");
        let mut cert_chain = vec![cert.der().clone()];
        cert_chain.extend(self.intermediates.iter().cloned());
        Svid {
            spiffe_id: opts.spiffe_id,
            cert_chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }
}

/// Parses PEM certificates (for tests that read files back).
pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}
