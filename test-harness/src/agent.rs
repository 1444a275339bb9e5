//! An agent: speaks mTLS to the gateway with its own SVID, sends CONNECT and
//! absolute-form requests, and verifies the gateway by its SPIFFE ID.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::ca::Svid;

pub type GatewayStream = TlsStream<TcpStream>;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Chain to the roots, and (optionally) exactly this SPIFFE ID; no DNS name check.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Option<String>,
    provider: Arc<CryptoProvider>,
}

fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return vec![];
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return vec![];
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if let Some(expected) = &self.expected {
            let uris = uri_sans(end_entity);
            if uris.len() != 1 || &uris[0] != expected {
                // An InvalidCertificate error, so callers see it as a rejected peer cert.
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                        std::io::Error::other(format!(
                            "gateway presented URI SANs {uris:?}, expected {expected}"
                        )),
                    ))),
                ));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why an mTLS handshake with the gateway failed, so negative tests can tell a refusal
/// by the gateway from a gateway the agent did not trust.
#[derive(Debug)]
pub enum AgentError {
    /// TCP connect failed (nothing listening, ...).
    Connect(std::io::Error),
    /// The gateway sent a fatal TLS alert (e.g. our certificate was not acceptable).
    Refused(rustls::AlertDescription),
    /// The gateway closed the connection without an alert.
    Closed,
    /// The agent rejected the gateway's certificate (wrong CA, wrong SPIFFE ID, expired).
    GatewayCertRejected(rustls::Error),
    /// Any other TLS or I/O failure during the handshake.
    Tls(std::io::Error),
    /// No answer within the handshake timeout.
    Timeout,
}

impl AgentError {
    /// The gateway turned us away: an alert or a close without one.
    pub fn is_refused_by_gateway(&self) -> bool {
        matches!(self, AgentError::Refused(_) | AgentError::Closed)
    }

    /// Classifies an I/O error from tokio-rustls, which wraps `rustls::Error`.
    fn from_io(e: std::io::Error) -> AgentError {
        use std::io::ErrorKind;
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return match tls {
                rustls::Error::AlertReceived(alert) => AgentError::Refused(*alert),
                rustls::Error::InvalidCertificate(_) => {
                    AgentError::GatewayCertRejected(tls.clone())
                }
                _ => AgentError::Tls(e),
            };
        }
        match e.kind() {
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                AgentError::Closed
            }
            _ => AgentError::Tls(e),
        }
    }
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Connect(e) => write!(f, "connecting to the gateway: {e}"),
            AgentError::Refused(alert) => {
                write!(f, "the gateway refused the mTLS handshake: alert {alert:?}")
            }
            AgentError::Closed => write!(f, "the gateway closed the connection during mTLS"),
            AgentError::GatewayCertRejected(e) => {
                write!(f, "the gateway's certificate was rejected: {e}")
            }
            AgentError::Tls(e) => write!(f, "mTLS handshake with the gateway failed: {e}"),
            AgentError::Timeout => write!(f, "mTLS handshake with the gateway timed out"),
        }
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AgentError::Connect(e) | AgentError::Tls(e) => Some(e),
            AgentError::GatewayCertRejected(e) => Some(e),
            _ => None,
        }
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's answer to CONNECT; on 2xx, `stream` is the open tunnel.
pub struct TunnelResult {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stream: Option<GatewayStream>,
}

#[derive(Debug, Clone)]
pub struct AgentResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl AgentResponse {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body is not JSON: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
pub struct AgentClient {
    svid: Svid,
    roots: Vec<CertificateDer<'static>>,
    gateway: SocketAddr,
    expected_gateway: Option<String>,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
}

impl AgentClient {
    /// `gateway_roots` are the CAs the gateway's certificate must chain to (for a SPIRE
    /// gateway, the trust bundle). Only the chain is checked until `expect_gateway_id`.
    pub fn new(
        svid: &Svid,
        gateway_roots: &[CertificateDer<'static>],
        gateway_addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        Ok(AgentClient {
            svid: svid.clone(),
            roots: gateway_roots.to_vec(),
            gateway: gateway_addr,
            expected_gateway: None,
            // Only sent as SNI: the verifier checks no DNS name (SVIDs need not carry one).
            server_name: ServerName::try_from("egress-gateway")?,
            config: Arc::new(Self::build(svid, gateway_roots, None)?),
        })
    }

    fn build(
        svid: &Svid,
        roots: &[CertificateDer<'static>],
        expected: Option<String>,
    ) -> anyhow::Result<ClientConfig> {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone())?;
        }
        let provider = provider();
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: Arc::new(store),
            expected,
            provider: provider.clone(),
        });
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(svid.cert_chain.clone(), svid.clone_key())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every connection does a full handshake, so each one exercises the gateway's
        // client-certificate checks (and sees rotated gateway certs).
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(cfg)
    }

    /// Requires the gateway to present exactly this SPIFFE ID (one URI SAN).
    pub fn expect_gateway_id(mut self, spiffe_id: &str) -> Self {
        self.expected_gateway = Some(spiffe_id.to_string());
        // `build` succeeded in `new` with the same inputs, so it cannot fail here.
        if let Ok(cfg) = Self::build(&self.svid, &self.roots, self.expected_gateway.clone()) {
            self.config = Arc::new(cfg);
        }
        self
    }

    /// The SNI sent to the gateway (default `egress-gateway`); an IP address sends none.
    pub fn with_server_name(mut self, name: &str) -> anyhow::Result<Self> {
        self.server_name = ServerName::try_from(name.to_string())?;
        Ok(self)
    }

    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway
    }

    /// The mTLS handshake alone. Under TLS 1.3 the server checks our certificate after
    /// our side has finished, so a refused client may still get `Ok` here and see the
    /// refusal on its first read; `handshake_confirmed` waits for it.
    pub async fn handshake(&self) -> Result<GatewayStream, AgentError> {
        let attempt = async {
            let tcp = TcpStream::connect(self.gateway)
                .await
                .map_err(AgentError::Connect)?;
            let _ = tcp.set_nodelay(true);
            TlsConnector::from(self.config.clone())
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(AgentError::from_io)
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(AgentError::Timeout))
    }

    /// The handshake, then up to `wait` for the gateway to object to our certificate
    /// (a TLS 1.3 server does so after the handshake). `Ok` means no alert and no close
    /// within `wait`; nothing is consumed from the stream.
    pub async fn handshake_confirmed(&self, wait: Duration) -> Result<GatewayStream, AgentError> {
        let mut s = self.handshake().await?;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(wait, s.read(&mut byte)).await {
            Err(_) => Ok(s),
            Ok(Ok(0)) => Err(AgentError::Closed),
            Ok(Ok(_)) => Err(AgentError::Tls(std::io::Error::other(
                "the gateway sent data before any request",
            ))),
            Ok(Err(e)) => Err(AgentError::from_io(e)),
        }
    }

    /// Sends `CONNECT authority` and reads the gateway's answer.
    pub async fn connect_tunnel(
        &self,
        authority: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<TunnelResult> {
        let mut s = self.handshake().await?;
        // Host as HTTP proxy clients (curl) send it for CONNECT.
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        let (status, headers) = read_head(&mut s).await?;
        if (200..300).contains(&status) {
            return Ok(TunnelResult {
                status,
                headers,
                body: vec![],
                stream: Some(s),
            });
        }
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let mut body = Vec::new();
        match len {
            Some(len) => {
                body.resize(len, 0);
                s.read_exact(&mut body)
                    .await
                    .context("reading the CONNECT response body")?;
            }
            // No length: the body runs to the close (bounded, in case the gateway
            // keeps the connection open).
            None => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    (&mut s).take(1 << 20).read_to_end(&mut body),
                )
                .await;
            }
        }
        Ok(TunnelResult {
            status,
            headers,
            body,
            stream: None,
        })
    }

    /// TLS to the destination inside an open tunnel (standard WebPKI name checks).
    pub async fn tls_through_tunnel<S>(
        &self,
        tunnel: S,
        server_name: &str,
        roots: &[CertificateDer<'static>],
    ) -> anyhow::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone())?;
        }
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(server_name.to_string())?;
        TlsConnector::from(Arc::new(cfg))
            .connect(name, tunnel)
            .await
            .context("TLS to the destination through the tunnel")
    }

    /// One keep-alive mTLS connection for many requests.
    pub async fn session(&self) -> anyhow::Result<AgentSession> {
        let s = self.handshake().await?;
        // hyper's client connection writes the URI as given, so absolute-form stays so.
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(AgentSession {
            send,
            _task: AbortOnDrop(task),
        })
    }

    /// One request on a fresh connection; `url` is absolute (`http://host:port/path`).
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<AgentResponse> {
        self.session()
            .await?
            .request(method, url, headers, body)
            .await
    }
}

/// One keep-alive mTLS connection to the gateway. The connection task ends with it.
pub struct AgentSession {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    _task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AgentSession {
    /// The gateway (or the network) closed the connection.
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    /// Sends `method url` with `url` as the request target on the wire (absolute form,
    /// `GET http://host:port/path HTTP/1.1`, as a proxy expects) and a Host header from
    /// the URL unless `headers` has one.
    pub async fn request(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<AgentResponse> {
        let uri: hyper::Uri = url.parse().context("request URL")?;
        let mut builder = hyper::Request::builder().method(method).uri(uri.clone());
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            if let Some(a) = uri.authority() {
                builder = builder.header("host", a.as_str());
            }
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder.body(Full::new(Bytes::from(body)))?;
        self.send
            .ready()
            .await
            .context("connection to the gateway")?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).to_string(),
                )
            })
            .collect();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok(AgentResponse {
            status,
            headers,
            body,
        })
    }
}

/// Reads an HTTP/1.1 response head byte by byte, so nothing past it is consumed.
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!("gateway closed the connection before answering");
        }
        buf.push(byte[0]);
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}
