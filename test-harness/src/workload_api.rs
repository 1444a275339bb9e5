//! A SPIFFE Workload API server on a Unix socket, speaking the real gRPC protocol, for
//! fast tests and the demo. Like the SPIRE agent it insists on the
//! `workload.spiffe.io: true` header; unlike it, it gives every caller the same identity.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use rustls_pki_types::CertificateDer;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::ca::{Svid, TestCa};

/// Generated from `proto/workload.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("_");
}

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

/// What the fake serves: SVIDs (the first is the default) and bundles.
#[derive(Clone, Debug, Default)]
pub struct WorkloadIdentity {
    pub svids: Vec<Svid>,
    /// CA certificates of the own trust domain.
    pub bundle: Vec<CertificateDer<'static>>,
    /// Federated trust domains and their CA certificates.
    pub federated_bundles: Vec<(String, Vec<CertificateDer<'static>>)>,
}

impl WorkloadIdentity {
    /// One SVID for `spiffe_id` from `ca`, with `ca`'s bundle.
    pub fn single(ca: &TestCa, spiffe_id: &str) -> Self {
        WorkloadIdentity {
            svids: vec![ca.mint_svid(spiffe_id)],
            bundle: vec![ca.root_cert()],
            federated_bundles: vec![],
        }
    }
}

fn concat(certs: &[CertificateDer<'static>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.as_ref().to_vec()).collect()
}

fn td_key(td: &str) -> String {
    if td.starts_with("spiffe://") {
        td.to_string()
    } else {
        format!("spiffe://{td}")
    }
}

fn x509_response(id: &WorkloadIdentity) -> Result<pb::X509svidResponse, Status> {
    if id.svids.is_empty() {
        // What the SPIRE agent says to a workload with no registration entry.
        return Err(Status::permission_denied("no identity issued"));
    }
    let bundle = concat(&id.bundle);
    Ok(pb::X509svidResponse {
        svids: id
            .svids
            .iter()
            .map(|s| pb::X509svid {
                spiffe_id: s.spiffe_id.clone().unwrap_or_default(),
                x509_svid: concat(&s.cert_chain),
                x509_svid_key: s.key.secret_pkcs8_der().to_vec(),
                bundle: bundle.clone(),
                hint: String::new(),
            })
            .collect(),
        crl: vec![],
        federated_bundles: id
            .federated_bundles
            .iter()
            .map(|(td, cas)| (td_key(td), concat(cas)))
            .collect(),
    })
}

fn bundles_response(id: &WorkloadIdentity) -> pb::X509BundlesResponse {
    let mut bundles: std::collections::HashMap<String, Vec<u8>> = id
        .federated_bundles
        .iter()
        .map(|(td, cas)| (td_key(td), concat(cas)))
        .collect();
    if let Some(own) = own_trust_domain(id) {
        bundles.insert(td_key(&own), concat(&id.bundle));
    }
    pb::X509BundlesResponse {
        crl: vec![],
        bundles,
    }
}

/// The own trust domain: from the default SVID's ID, else from the first bundle CA's
/// `spiffe://td` URI SAN (as `TestCa` roots carry), so a bundle-only identity still names it.
fn own_trust_domain(id: &WorkloadIdentity) -> Option<String> {
    let from_id = |sid: &str| {
        sid.strip_prefix("spiffe://")
            .and_then(|rest| rest.split('/').next())
            .filter(|td| !td.is_empty())
            .map(str::to_string)
    };
    if let Some(td) = id
        .svids
        .first()
        .and_then(|s| s.spiffe_id.as_deref())
        .and_then(from_id)
    {
        return Some(td);
    }
    let ca = id.bundle.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(ca.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => from_id(u),
        _ => None,
    })
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get("workload.spiffe.io") {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// What every stream watches: the material, and whether the "agent" is down.
#[derive(Clone)]
struct State {
    identity: Arc<WorkloadIdentity>,
    down: bool,
}

fn unavailable() -> Status {
    Status::unavailable("workload API is unavailable (simulated outage)")
}

type Shared = watch::Receiver<State>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

struct Service {
    rx: Shared,
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        {
            // Refuse up front, as SPIRE does, rather than opening an empty stream.
            let state = self.rx.borrow();
            if state.down {
                return Err(unavailable());
            }
            x509_response(&state.identity)?;
        }
        // An `Err` item ends the gRPC stream (tonic sends it as the trailers), so an
        // outage or a withdrawn identity drops every client, which then reconnects.
        let stream = WatchStream::new(self.rx.clone()).map(|state| {
            if state.down {
                Err(unavailable())
            } else {
                x509_response(&state.identity)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        if self.rx.borrow().down {
            return Err(unavailable());
        }
        let stream = WatchStream::new(self.rx.clone()).map(|state| {
            if state.down {
                Err(unavailable())
            } else {
                Ok(bundles_response(&state.identity))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "JWT-SVIDs are not served by this fake",
        ))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "JWT bundles are not served by this fake",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "JWT-SVIDs are not served by this fake",
        ))
    }
}

/// A running fake Workload API. Dropping it stops the server.
pub struct FakeWorkloadApi {
    socket_path: PathBuf,
    tx: watch::Sender<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl FakeWorkloadApi {
    pub async fn start(socket_path: &Path, identity: WorkloadIdentity) -> anyhow::Result<Self> {
        let (tx, _) = watch::channel(State {
            identity: Arc::new(identity),
            down: false,
        });
        let mut api = FakeWorkloadApi {
            socket_path: socket_path.to_path_buf(),
            tx,
            stop: None,
            task: None,
            _dir: None,
        };
        api.serve()?;
        Ok(api)
    }

    pub async fn start_in_tempdir(identity: WorkloadIdentity) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut api = Self::start(&dir.path().join("agent.sock"), identity).await?;
        api._dir = Some(dir);
        Ok(api)
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.socket_path);
        let listener = UnixListener::bind(&self.socket_path)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let service = Service {
            rx: self.tx.subscribe(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.stop = Some(stop_tx);
        self.task = Some(task);
        Ok(())
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// `unix:///abs/path`, as `SPIFFE_ENDPOINT_SOCKET` spells it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket_path.display())
    }

    /// Pushes new material to every open stream (rotation).
    pub fn update(&self, identity: WorkloadIdentity) {
        // Kept while down too, so coming back up serves the newest material.
        self.tx
            .send_modify(|state| state.identity = Arc::new(identity));
    }

    /// The material currently served.
    pub fn identity(&self) -> Arc<WorkloadIdentity> {
        self.tx.borrow().identity.clone()
    }

    /// Simulates an agent outage without closing the socket: while `down`, every open
    /// stream ends with `Unavailable` and new calls get `Unavailable`; clients such as
    /// `X509Source` keep their last material and retry with backoff.
    pub fn set_unavailable(&self, down: bool) {
        self.tx.send_if_modified(|state| {
            let changed = state.down != down;
            state.down = down;
            changed
        });
    }

    /// Stops serving (an agent outage): open streams end, the socket goes away and new
    /// calls fail to connect. `restart` serves again.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // Watch-fed streams never end on their own, so a graceful shutdown would wait
            // forever: end them with `Unavailable` first, then restore the flag silently.
            let was_down = self.tx.borrow().down;
            self.set_unavailable(true);
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
            self.tx.send_if_modified(|state| {
                state.down = was_down;
                false
            });
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }

    /// Serves again on the same socket with the latest material.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.serve()
    }

    pub async fn shutdown(mut self) {
        self.stop().await;
    }
}

impl Drop for FakeWorkloadApi {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A CA plus a fake Workload API serving one identity, rotatable on demand.
pub struct IdentityFixture {
    pub ca: TestCa,
    pub api: FakeWorkloadApi,
    spiffe_id: String,
    dns_names: Vec<String>,
}

impl IdentityFixture {
    pub async fn start(ca: TestCa, spiffe_id: &str, dns_names: &[&str]) -> anyhow::Result<Self> {
        let dns_names: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        let identity = Self::identity(&ca, spiffe_id, &dns_names);
        let api = FakeWorkloadApi::start_in_tempdir(identity).await?;
        Ok(IdentityFixture {
            ca,
            api,
            spiffe_id: spiffe_id.to_string(),
            dns_names,
        })
    }

    fn identity(ca: &TestCa, spiffe_id: &str, dns_names: &[String]) -> WorkloadIdentity {
        WorkloadIdentity {
            svids: vec![ca.mint(crate::ca::SvidOptions {
                spiffe_id: Some(spiffe_id.to_string()),
                dns_names: dns_names.to_vec(),
                ..Default::default()
            })],
            bundle: vec![ca.root_cert()],
            federated_bundles: vec![],
        }
    }

    /// Mints a new SVID for the same ID, pushes it, and returns it.
    pub fn rotate(&self) -> Svid {
        let identity = Self::identity(&self.ca, &self.spiffe_id, &self.dns_names);
        let svid = identity.svids[0].clone();
        self.api.update(identity);
        svid
    }

    pub fn endpoint(&self) -> String {
        self.api.endpoint()
    }
}
