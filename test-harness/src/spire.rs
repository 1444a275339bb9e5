//! Runs real `spire-server` and `spire-agent` (the version in `spire-config/VERSION`) on
//! this host for tests: temp dirs, a free TCP port on 127.0.0.1, join-token attestation
//! and registration entries from `spire-config/`. Install the binaries with
//! `scripts/install-spire.sh`.
//!
//! Every test process runs as uid 0, so the entries use the selector `unix:uid:0` and the
//! Workload API hands this process one SVID per entry; pick one by SPIFFE ID.

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::Deserialize;
use spiffe::x509_source::SvidPicker;
use spiffe::{SpiffeId, WorkloadApiClient, X509Source, X509Svid};
use tokio::process::{Child, Command};

use crate::ca::Svid;

const VERSION_FILE: &str = include_str!("../../spire-config/VERSION");
const SERVER_CONF_TEMPLATE: &str = include_str!("../../spire-config/server.conf.tmpl");
const AGENT_CONF_TEMPLATE: &str = include_str!("../../spire-config/agent.conf.tmpl");
const ENTRIES_JSON: &str = include_str!("../../spire-config/entries.json");

/// The trust domain `spire-config/entries.json` is written for.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";

/// How long each startup phase (server, agent, first SVIDs) may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How much of a log to quote in an error.
const LOG_TAIL_LINES: usize = 30;

/// The pinned SPIRE version, e.g. `1.15.3`.
pub fn spire_version() -> &'static str {
    VERSION_FILE.trim()
}

/// Where `scripts/install-spire.sh` puts the binaries by default.
pub fn default_install_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(
        PathBuf::from(home)
            .join(".cache/egress-gateway")
            .join(format!("spire-{}", spire_version())),
    )
}

/// Paths of the two SPIRE binaries.
#[derive(Clone, Debug)]
pub struct SpireBinaries {
    pub server: PathBuf,
    pub agent: PathBuf,
}

/// The SPIRE binaries were not found; the message says how to install them.
#[derive(Clone, Debug)]
pub struct SpireMissing {
    pub searched: Vec<PathBuf>,
}

impl fmt::Display for SpireMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let searched: Vec<String> = self
            .searched
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        write!(
            f,
            "real SPIRE v{v} (spire-server and spire-agent) not found in $EGRESS_SPIRE_DIR, \
             the cache dir or PATH (searched: {s}); install it with `scripts/install-spire.sh` \
             (builds both into ~/.cache/egress-gateway/spire-{v}, or $EGRESS_SPIRE_DIR)",
            v = spire_version(),
            s = if searched.is_empty() {
                "nothing".to_string()
            } else {
                searched.join(", ")
            },
        )
    }
}

impl std::error::Error for SpireMissing {}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// For a test that needs real SPIRE: the binaries, or `None` after a loud message on
/// stderr so the test can return early. Under `scripts/test.sh` (which installs it)
/// or with `CI` set, a missing SPIRE is a failure: this panics instead.
pub fn require_spire() -> Option<SpireBinaries> {
    match SpireFixture::binaries() {
        Ok(bins) => Some(bins),
        Err(missing) if crate::deps_required() => {
            panic!("real SPIRE is required in CI: {missing}")
        }
        Err(missing) => {
            // Written to stderr directly: the test harness captures `eprintln!` of
            // passing tests, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPING real-SPIRE test: {missing}; run scripts/install-spire.sh ***\n"
            );
            None
        }
    }
}

/// A registration entry. Selectors are `type:value`, e.g. `unix:uid:0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntrySpec {
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    pub dns_names: Vec<String>,
}

impl EntrySpec {
    pub fn new(spiffe_id: impl Into<String>, selectors: &[&str]) -> Self {
        EntrySpec {
            spiffe_id: spiffe_id.into(),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            dns_names: vec![],
        }
    }
}

/// The registration entries of `spire-config/entries.json`, for `trust_domain` (the file
/// is written for `example.org`; other trust domains get the same paths).
pub fn config_entries(trust_domain: &str) -> Vec<EntrySpec> {
    #[derive(Deserialize)]
    struct File {
        entries: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        spiffe_id: String,
        selectors: Vec<Selector>,
        #[serde(default)]
        dns_names: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Selector {
        #[serde(rename = "type")]
        kind: String,
        value: String,
    }
    // Compiled in, so a broken file fails every test loudly rather than one silently.
    let file: File = serde_json::from_str(ENTRIES_JSON).expect("spire-config/entries.json");
    let from = format!("spiffe://{DEFAULT_TRUST_DOMAIN}/");
    let to = format!("spiffe://{trust_domain}/");
    file.entries
        .into_iter()
        .map(|e| EntrySpec {
            spiffe_id: e.spiffe_id.replacen(&from, &to, 1),
            selectors: e
                .selectors
                .into_iter()
                .map(|s| format!("{}:{}", s.kind, s.value))
                .collect(),
            dns_names: e.dns_names,
        })
        .collect()
}

/// What to start SPIRE with.
#[derive(Clone, Debug)]
pub struct SpireOptions {
    pub trust_domain: String,
    /// The server's `default_x509_svid_ttl`; the agent rotates at about half of it.
    pub x509_svid_ttl: Duration,
    /// The server's `agent_ttl`: the agent's own SVID, which bounds how long the agent
    /// may stay stopped and still come back without a new join token.
    pub agent_svid_ttl: Duration,
    /// Created before `start` returns, which waits until each one's SVID is served.
    pub entries: Vec<EntrySpec>,
}

impl SpireOptions {
    /// The entries of `spire-config/entries.json` moved to `trust_domain`.
    pub fn for_trust_domain(trust_domain: &str) -> Self {
        SpireOptions {
            trust_domain: trust_domain.to_string(),
            x509_svid_ttl: Duration::from_secs(60),
            agent_svid_ttl: Duration::from_secs(3600),
            entries: config_entries(trust_domain),
        }
    }
}

impl Default for SpireOptions {
    /// `example.org`, a 60 s SVID TTL and the entries of `spire-config/entries.json`.
    fn default() -> Self {
        SpireOptions::for_trust_domain(DEFAULT_TRUST_DOMAIN)
    }
}

/// One SVID as the Workload API returned it.
#[derive(Clone, Debug)]
pub struct FetchedSvid {
    pub spiffe_id: String,
    /// DER certificates, leaf first.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub private_key: Vec<u8>,
    /// DER CA certificates of the SVID's trust domain.
    pub bundle: Vec<Vec<u8>>,
}

impl FetchedSvid {
    pub fn leaf(&self) -> &[u8] {
        &self.cert_chain[0]
    }

    /// As the harness's `Svid`, for an `AgentClient`.
    pub fn to_svid(&self) -> Svid {
        Svid {
            spiffe_id: Some(self.spiffe_id.clone()),
            cert_chain: self
                .cert_chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            key: PrivatePkcs8KeyDer::from(self.private_key.clone()),
        }
    }

    /// The trust bundle as roots, e.g. for `AgentClient::new`.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.bundle
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect()
    }
}

/// One workload's identity as a long-running process would hold it: an `X509Source`
/// on the agent's socket that keeps the SVID with one SPIFFE ID current as SPIRE
/// rotates it (this process is registered under every entry, so it picks by ID).
pub struct SpireWorkload {
    source: X509Source,
    spiffe_id: SpiffeId,
}

impl SpireWorkload {
    /// The current SVID, for a new `AgentClient` (one per connection follows rotation).
    pub fn svid(&self) -> anyhow::Result<Svid> {
        let svid = self.source.svid().context("no current SVID")?;
        Ok(Svid {
            spiffe_id: Some(svid.spiffe_id().to_string()),
            cert_chain: svid
                .cert_chain()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                .collect(),
            key: PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()),
        })
    }

    /// The current trust bundle of the workload's own trust domain.
    pub fn roots(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let td = self.spiffe_id.trust_domain();
        let set = self.source.bundle_set().context("no bundle set")?;
        let bundle = set
            .get(td)
            .ok_or_else(|| anyhow!("no bundle for trust domain {td}"))?;
        Ok(bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect())
    }

    pub fn source(&self) -> &X509Source {
        &self.source
    }

    pub async fn shutdown(self) {
        self.source.shutdown().await;
    }
}

/// Picks the SVID with one SPIFFE ID; no match means no identity, never another one.
struct PickById(SpiffeId);

impl SvidPicker for PickById {
    fn pick_svid(&self, svids: &[std::sync::Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.spiffe_id() == &self.0)
    }
}

/// Real SPIRE server and agent. Dropping it kills both and removes the temp dirs, also
/// when a test panics (then the log tails are printed to stderr first).
pub struct SpireFixture {
    bins: SpireBinaries,
    trust_domain: String,
    server_socket: PathBuf,
    agent_socket: PathBuf,
    agent_conf: PathBuf,
    server_port: u16,
    log_dir: PathBuf,
    server: Option<Child>,
    agent: Option<Child>,
    /// How often the agent has been started; each run logs to its own file.
    agent_runs: u32,
    // Last, so the processes are gone before their files are removed.
    root: tempfile::TempDir,
}

impl SpireFixture {
    /// Finds `spire-server` and `spire-agent`: `$EGRESS_SPIRE_DIR`, then the default
    /// install dir, then `PATH`.
    pub fn binaries() -> Result<SpireBinaries, SpireMissing> {
        let mut dirs = Vec::new();
        if let Some(dir) = std::env::var_os("EGRESS_SPIRE_DIR").filter(|d| !d.is_empty()) {
            dirs.push(PathBuf::from(dir));
        }
        dirs.extend(default_install_dir());
        for dir in &dirs {
            let bins = SpireBinaries {
                server: dir.join("spire-server"),
                agent: dir.join("spire-agent"),
            };
            if is_executable(&bins.server) && is_executable(&bins.agent) {
                return Ok(bins);
            }
        }
        let in_path = |name: &str| {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(name))
                    .find(|p| is_executable(p))
            })
        };
        if let (Some(server), Some(agent)) = (in_path("spire-server"), in_path("spire-agent")) {
            return Ok(SpireBinaries { server, agent });
        }
        dirs.push(PathBuf::from("$PATH"));
        Err(SpireMissing { searched: dirs })
    }

    /// Starts server and agent, creates `opts.entries` and returns once the agent serves
    /// an SVID for each of them.
    pub async fn start(opts: SpireOptions) -> anyhow::Result<SpireFixture> {
        let bins = Self::binaries().map_err(|e| anyhow!("{e}"))?;
        let root = tempfile::Builder::new().prefix("spire-").tempdir()?;
        // Other uids must reach the agent socket, so that a workload without an entry gets
        // "no identity" rather than "permission denied".
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))?;
        let dir = |name: &str, mode: u32| -> anyhow::Result<PathBuf> {
            let p = root.path().join(name);
            fs::create_dir_all(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
            Ok(p)
        };
        let server_data = dir("server-data", 0o700)?;
        let agent_data = dir("agent-data", 0o700)?;
        let server_socket = dir("server", 0o700)?.join("api.sock");
        let agent_socket = dir("agent", 0o755)?.join("api.sock");
        let log_dir = dir("logs", 0o755)?;
        let server_port = free_port()?;
        let ttl = format!("{}s", opts.x509_svid_ttl.as_secs().max(1));
        let agent_ttl = format!("{}s", opts.agent_svid_ttl.as_secs().max(1));
        let port = server_port.to_string();

        let vars: [(&str, &str); 13] = [
            ("SERVER_BIND_ADDRESS", "127.0.0.1"),
            ("SERVER_ADDRESS", "127.0.0.1"),
            ("SERVER_PORT", &port),
            ("SERVER_SOCKET", path_str(&server_socket)?),
            ("AGENT_SOCKET", path_str(&agent_socket)?),
            ("SERVER_DATA_DIR", path_str(&server_data)?),
            ("AGENT_DATA_DIR", path_str(&agent_data)?),
            ("TRUST_DOMAIN", &opts.trust_domain),
            ("X509_SVID_TTL", &ttl),
            ("AGENT_SVID_TTL", &agent_ttl),
            ("LOG_LEVEL", "DEBUG"),
            // SPIRE's 5 s defaults would make every start and new entry ~5 s slower.
            ("SERVER_CACHE_RELOAD_INTERVAL", "1s"),
            ("AGENT_SYNC_INTERVAL", "1s"),
        ];
        let server_conf = root.path().join("server.conf");
        let agent_conf = root.path().join("agent.conf");
        fs::write(&server_conf, render(SERVER_CONF_TEMPLATE, &vars)?)?;
        fs::write(&agent_conf, render(AGENT_CONF_TEMPLATE, &vars)?)?;

        let mut server_cmd = Command::new(&bins.server);
        server_cmd
            .arg("run")
            .arg("-config")
            .arg(&server_conf)
            .current_dir(root.path());
        let server = spawn_logged(server_cmd, &log_dir.join("server.log"))?;

        let mut fixture = SpireFixture {
            bins,
            trust_domain: opts.trust_domain.clone(),
            server_socket,
            agent_socket,
            agent_conf,
            server_port,
            log_dir,
            server: Some(server),
            agent: None,
            agent_runs: 0,
            root,
        };
        fixture.wait_server_healthy().await?;
        let token = fixture.generate_join_token().await?;
        fixture.spawn_agent(Some(&token)).await?;
        fixture.create_entries(&opts.entries).await?;
        for entry in &opts.entries {
            fixture
                .wait_for_svid(&entry.spiffe_id, PHASE_TIMEOUT)
                .await
                .with_context(|| fixture.log_context())?;
        }
        Ok(fixture)
    }

    /// The agent's Workload API socket.
    pub fn agent_socket(&self) -> &Path {
        &self.agent_socket
    }

    /// `unix:///…` for `X509Source` or `SPIFFE_ENDPOINT_SOCKET`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.agent_socket.display())
    }

    /// The server's admin API socket (`-socketPath` of `spire-server` commands).
    pub fn server_socket(&self) -> &Path {
        &self.server_socket
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The agent's SPIFFE ID, parent of every entry: `spiffe://<td>/host`.
    pub fn agent_id(&self) -> String {
        format!("spiffe://{}/host", self.trust_domain)
    }

    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    pub fn binaries_in_use(&self) -> &SpireBinaries {
        &self.bins
    }

    /// Where `server.log` and `agent-<n>.log` are written.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Registers one more workload under this agent. Selectors are `type:value`.
    pub async fn create_entry(
        &self,
        spiffe_id: &str,
        selectors: &[&str],
        x509_ttl: Option<Duration>,
    ) -> anyhow::Result<()> {
        let mut args = vec![
            "entry".to_string(),
            "create".into(),
            "-socketPath".into(),
            path_str(&self.server_socket)?.into(),
            "-parentID".into(),
            self.agent_id(),
            "-spiffeID".into(),
            spiffe_id.into(),
            "-output".into(),
            "json".into(),
        ];
        for s in selectors {
            args.extend(["-selector".to_string(), s.to_string()]);
        }
        if let Some(ttl) = x509_ttl {
            args.extend(["-x509SVIDTTL".to_string(), ttl.as_secs().max(1).to_string()]);
        }
        let out = self.server_cli(&args).await?;
        check_entry_results(&out)
    }

    /// Kills the agent (SIGKILL, like a crash). Its data dir and socket path stay.
    pub async fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(mut agent) = self.agent.take() {
            agent.kill().await.context("killing spire-agent")?;
        }
        Ok(())
    }

    /// Starts the agent again on the same data dir and socket. It re-uses the agent SVID
    /// kept in its data dir (the disk KeyManager keeps the key), so it needs no new join
    /// token; should that fail, it attests again with a fresh token. Returns once the
    /// agent serves SVIDs again.
    pub async fn start_agent(&mut self) -> anyhow::Result<()> {
        if self.agent.is_some() {
            bail!("spire-agent is already running");
        }
        // A SIGKILLed agent leaves its socket behind; a client must not reach a dead one.
        let _ = fs::remove_file(&self.agent_socket);
        if let Err(reuse_err) = self.spawn_agent(None).await {
            eprintln!("spire-agent did not come back on its stored SVID ({reuse_err:#}); attesting again with a new join token");
            self.stop_agent().await?;
            let token = self.generate_join_token().await?;
            self.spawn_agent(Some(&token)).await.with_context(|| {
                format!("restart without a join token failed first: {reuse_err:#}")
            })?;
        }
        self.wait_serving().await
    }

    /// Starts the agent again on its stored agent SVID only, as an operator's restart
    /// does (the join token was single-use): an error if it cannot come back on it.
    pub async fn restart_agent_on_stored_svid(&mut self) -> anyhow::Result<()> {
        if self.agent.is_some() {
            bail!("spire-agent is already running");
        }
        let _ = fs::remove_file(&self.agent_socket);
        self.spawn_agent(None).await?;
        self.wait_serving().await
    }

    /// Waits until the agent serves SVIDs.
    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        loop {
            match self.fetch_svids().await {
                Ok(svids) if !svids.is_empty() => return Ok(()),
                result => {
                    if Instant::now() >= deadline {
                        bail!(
                            "restarted spire-agent serves no SVID ({:?}){}",
                            result.err(),
                            self.log_context()
                        );
                    }
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Every X.509-SVID the Workload API gives this process (uid 0).
    pub async fn fetch_svids(&self) -> anyhow::Result<Vec<FetchedSvid>> {
        let client = WorkloadApiClient::connect_to(self.endpoint())
            .await
            .with_context(|| format!("connecting to {}", self.endpoint()))?;
        let ctx = client.fetch_x509_context().await.context("FetchX509SVID")?;
        let bundles = ctx.bundle_set();
        ctx.svids()
            .iter()
            .map(|svid| {
                let td = svid.spiffe_id().trust_domain();
                let bundle = bundles
                    .get(td)
                    .ok_or_else(|| anyhow!("no bundle for trust domain {td}"))?;
                Ok(FetchedSvid {
                    spiffe_id: svid.spiffe_id().to_string(),
                    cert_chain: svid
                        .cert_chain()
                        .iter()
                        .map(|c| c.as_bytes().to_vec())
                        .collect(),
                    private_key: svid.private_key().as_bytes().to_vec(),
                    bundle: bundle
                        .authorities()
                        .iter()
                        .map(|c| c.as_bytes().to_vec())
                        .collect(),
                })
            })
            .collect()
    }

    /// The current SVID for `spiffe_id` from the agent (waiting for it up to the phase
    /// timeout), as the harness's `Svid` for an `AgentClient`.
    pub async fn svid_for(&self, spiffe_id: &str) -> anyhow::Result<Svid> {
        Ok(self
            .wait_for_svid(spiffe_id, PHASE_TIMEOUT)
            .await?
            .to_svid())
    }

    /// The trust bundle the agent serves (the roots every SVID here chains to).
    pub async fn roots(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let svids = self.fetch_svids().await?;
        let first = svids
            .first()
            .ok_or_else(|| anyhow!("the agent serves this process no SVID"))?;
        Ok(first.roots())
    }

    /// A workload holding the SVID with `spiffe_id`, kept current through rotations and
    /// agent restarts (the source reconnects by itself, quickly).
    pub async fn workload(&self, spiffe_id: &str) -> anyhow::Result<SpireWorkload> {
        let id = SpiffeId::new(spiffe_id).with_context(|| format!("SPIFFE ID {spiffe_id}"))?;
        let source = X509Source::builder()
            .endpoint(self.endpoint())
            .picker(PickById(id.clone()))
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .initial_sync_timeout(PHASE_TIMEOUT)
            .build()
            .await
            .with_context(|| format!("X509Source for {spiffe_id} on {}", self.endpoint()))?;
        Ok(SpireWorkload {
            source,
            spiffe_id: id,
        })
    }

    /// Runs `spire-agent api fetch x509` against this agent as another uid (and gid):
    /// a workload no entry matches. Returns its output; success means it got an SVID.
    pub async fn fetch_x509_as_uid(&self, uid: u32) -> anyhow::Result<std::process::Output> {
        // The installed binary may sit under /root (mode 0700): give the other uid a
        // path it can traverse, inside the fixture's 0755 root.
        let bin_dir = self.root.path().join("bin");
        let bin = bin_dir.join("spire-agent");
        if !is_executable(&bin) {
            fs::create_dir_all(&bin_dir)?;
            fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755))?;
            if fs::hard_link(&self.bins.agent, &bin).is_err() {
                fs::copy(&self.bins.agent, &bin)
                    .with_context(|| format!("copying {}", self.bins.agent.display()))?;
            }
            fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        }
        let mut cmd = Command::new(&bin);
        cmd.args(["api", "fetch", "x509", "-timeout", "5s", "-socketPath"])
            .arg(&self.agent_socket)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .uid(uid)
            .gid(uid);
        cmd.output()
            .await
            .with_context(|| format!("running {} as uid {uid}", bin.display()))
    }

    /// True while the agent process this fixture started is alive.
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|a| matches!(a.try_wait(), Ok(None)))
    }

    /// Polls the Workload API until it returns an SVID for `spiffe_id`.
    pub async fn wait_for_svid(
        &self,
        spiffe_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<FetchedSvid> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.fetch_svids().await {
                Ok(svids) => match svids.into_iter().find(|s| s.spiffe_id == spiffe_id) {
                    Some(svid) => return Ok(svid),
                    None => "not among the SVIDs served yet".to_string(),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("no SVID for {spiffe_id} within {timeout:?}: {last}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn wait_server_healthy(&mut self) -> anyhow::Result<()> {
        let socket = path_str(&self.server_socket)?.to_string();
        self.wait_healthy("spire-server", &["healthcheck", "-socketPath", &socket])
            .await
    }

    /// Runs `<bin> healthcheck` until it succeeds; fails early if the process exits.
    async fn wait_healthy(&mut self, which: &str, args: &[&str]) -> anyhow::Result<()> {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        let bin = if which == "spire-server" {
            self.bins.server.clone()
        } else {
            self.bins.agent.clone()
        };
        loop {
            let child = if which == "spire-server" {
                self.server.as_mut()
            } else {
                self.agent.as_mut()
            };
            if let Some(child) = child {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{which} exited during startup ({status}){}",
                        self.log_context()
                    );
                }
            }
            let out = Command::new(&bin)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .await
                .with_context(|| format!("running {}", bin.display()))?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{which} not healthy within {PHASE_TIMEOUT:?}: {}{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log_context()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn generate_join_token(&self) -> anyhow::Result<String> {
        let out = self
            .server_cli(&[
                "token",
                "generate",
                "-socketPath",
                path_str(&self.server_socket)?,
                "-spiffeID",
                &self.agent_id(),
                "-ttl",
                "600",
                "-output",
                "json",
            ])
            .await?;
        #[derive(Deserialize)]
        struct Token {
            value: String,
        }
        let token: Token = serde_json::from_slice(&out)
            .with_context(|| format!("token JSON: {}", String::from_utf8_lossy(&out)))?;
        Ok(token.value)
    }

    async fn spawn_agent(&mut self, join_token: Option<&str>) -> anyhow::Result<()> {
        self.agent_runs += 1;
        let log = self.log_dir.join(format!("agent-{}.log", self.agent_runs));
        let mut cmd = Command::new(&self.bins.agent);
        cmd.arg("run")
            .arg("-config")
            .arg(&self.agent_conf)
            .current_dir(self.root.path());
        if let Some(token) = join_token {
            cmd.arg("-joinToken").arg(token);
        }
        self.agent = Some(spawn_logged(cmd, &log)?);
        let socket = path_str(&self.agent_socket)?.to_string();
        self.wait_healthy("spire-agent", &["healthcheck", "-socketPath", &socket])
            .await
    }

    async fn create_entries(&self, entries: &[EntrySpec]) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // One `entry create -data` call instead of one process per entry.
        let parent = self.agent_id();
        let json_entries: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let selectors = e
                    .selectors
                    .iter()
                    .map(|s| {
                        let (kind, value) = s
                            .split_once(':')
                            .ok_or_else(|| anyhow!("selector {s:?} is not type:value"))?;
                        Ok(serde_json::json!({ "type": kind, "value": value }))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Ok(serde_json::json!({
                    "spiffe_id": e.spiffe_id,
                    "parent_id": parent,
                    "selectors": selectors,
                    "dns_names": e.dns_names,
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        let data = self.root.path().join("entries.json");
        fs::write(
            &data,
            serde_json::to_vec_pretty(&serde_json::json!({ "entries": json_entries }))?,
        )?;
        let out = self
            .server_cli(&[
                "entry",
                "create",
                "-socketPath",
                path_str(&self.server_socket)?,
                "-data",
                path_str(&data)?,
                "-output",
                "json",
            ])
            .await?;
        check_entry_results(&out)
    }

    /// Runs a `spire-server` CLI command and returns its stdout.
    async fn server_cli<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> anyhow::Result<Vec<u8>> {
        let out = Command::new(&self.bins.server)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", self.bins.server.display()))?;
        if !out.status.success() {
            let shown: Vec<String> = args
                .iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect();
            bail!(
                "spire-server {} failed ({}): {}{}",
                shown.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
            );
        }
        Ok(out.stdout)
    }

    /// The log tails, for error messages.
    fn log_context(&self) -> String {
        let mut s = String::new();
        let mut logs = vec![self.log_dir.join("server.log")];
        if self.agent_runs > 0 {
            logs.push(self.log_dir.join(format!("agent-{}.log", self.agent_runs)));
        }
        for log in logs {
            s.push_str(&format!(
                "\n--- last lines of {} ---\n{}",
                log.display(),
                log_tail(&log, LOG_TAIL_LINES)
            ));
        }
        s
    }
}

impl Drop for SpireFixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("real SPIRE logs of the failed test:{}", self.log_context());
        }
        let mut children: Vec<Child> = self.agent.take().into_iter().collect();
        children.extend(self.server.take());
        for child in &mut children {
            let _ = child.start_kill();
        }
        // Reap before the temp dir goes, so no process writes into a removed tree. SIGKILL
        // is quick; the bound only guards against a stuck kernel.
        let deadline = Instant::now() + Duration::from_secs(2);
        for child in &mut children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// `entry create -output json` exits 0 even when an entry was rejected; the per-entry
/// status says so.
fn check_entry_results(out: &[u8]) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_slice(out)
        .with_context(|| format!("entry create JSON: {}", String::from_utf8_lossy(out)))?;
    let results = v
        .get("results")
        .and_then(|r| r.as_array())
        .ok_or_else(|| anyhow!("entry create: no results in {v}"))?;
    for r in results {
        let code = r
            .pointer("/status/code")
            .and_then(|c| c.as_i64())
            .unwrap_or(0);
        if code != 0 {
            bail!("entry create failed: {r}");
        }
    }
    Ok(())
}

fn render(template: &str, vars: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut out = template.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    // Comments may mention placeholders; any other `{{` would reach SPIRE.
    if let Some(line) = out
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && l.contains("{{"))
    {
        bail!(
            "unfilled placeholder in SPIRE config template: {}",
            line.trim()
        );
    }
    Ok(out)
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path is not UTF-8: {}", p.display()))
}

/// A port that was free a moment ago. SPIRE needs a number in its config, so the race
/// with other binders is accepted; the server fails loudly if it lost it.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let file = fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("starting {:?}", cmd.as_std().get_program()))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return "(no log)".into();
    };
    // The last 16 KiB hold far more than `lines` SPIRE log lines.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    // The seek may land inside a UTF-8 sequence.
    let buf = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = buf.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
