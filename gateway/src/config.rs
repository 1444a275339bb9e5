//! `gateway.yaml`: the gateway's own configuration (not the policy).
//!
//! Strict: unknown keys are an error, and every error names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment the config falls back on; read through a trait so tests never mutate
/// the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {location}`{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        location: String,
        message: String,
    },
}

/// The raw file, as written by the operator.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin: Option<String>,
    #[serde(default)]
    identity: RawIdentity,
    policy: Option<PathBuf>,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    timeouts: RawTimeouts,
    limits_backend: Option<String>,
    on_backend_error: Option<String>,
    #[serde(default)]
    limits: RawResourceLimits,
    #[serde(default)]
    upstream_pool: RawUpstreamPool,
    #[serde(default)]
    allow_cidrs: Vec<String>,
    shutdown_grace: Option<String>,
    interception: Option<RawInterception>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInterception {
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    leaf_ttl: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    workload_api: Option<String>,
    startup_timeout: Option<String>,
    spiffe_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<String>,
    service_name: Option<String>,
    audit_log: Option<String>,
    audit_log_max_bytes: Option<u64>,
    audit_log_keep: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    handshake: Option<String>,
    request_header: Option<String>,
    connect: Option<String>,
    idle: Option<String>,
    response: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResourceLimits {
    max_connections: Option<usize>,
    max_connections_per_agent: Option<usize>,
    max_header_bytes: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstreamPool {
    max_idle_per_destination: Option<usize>,
    idle_timeout: Option<String>,
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

/// What to do when a shared limits backend is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBackendError {
    Deny,
    AllowLocal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub handshake: Duration,
    pub request_header: Duration,
    pub connect: Duration,
    pub idle: Duration,
    /// Time to an upstream's response headers (a pathway may set its own).
    pub response: Duration,
}

/// The keep-alive pool of upstream connections for forwarded HTTP requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamPool {
    /// Idle connections kept per destination; a burst of concurrent agent connections
    /// above it closes the surplus after use, and the next burst dials them again.
    pub max_idle_per_destination: usize,
    pub idle_timeout: Duration,
}

impl Default for UpstreamPool {
    fn default() -> Self {
        UpstreamPool {
            max_idle_per_destination: 256,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ResourceLimits {
    pub max_connections: usize,
    pub max_connections_per_agent: usize,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct Telemetry {
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// Sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. a collector's token.
    pub otlp_headers: http::HeaderMap,
    pub service_name: String,
    pub audit_log: AuditSink,
    /// Size-based rotation of a file `audit_log`; `None`: the file grows until an
    /// external rotator (logrotate) moves it and sends SIGUSR1.
    pub audit_rotation: Option<AuditRotation>,
}

/// `telemetry.audit_log_max_bytes` and `telemetry.audit_log_keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRotation {
    /// A line that would take the file past this size goes to a new file.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` is the newest); older ones are deleted.
    pub keep: usize,
}

/// TLS interception for destinations an L7 pathway names: the CA that signs the
/// per-host leaves agents see. The files are checked at start-up by the gateway
/// (see [`crate::interception`]), not here, so config parsing stays file-free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub leaf_ttl: Duration,
}

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// `unix:///path` or `tcp://host:port`, as the SPIFFE Workload API endpoint spec says.
    pub workload_api: String,
    pub identity_startup_timeout: Duration,
    /// Which of the workload's SVIDs is the gateway's (`identity.spiffe_id`); `None` takes
    /// the Workload API's default, the first one.
    pub identity_spiffe_id: Option<spiffe::SpiffeId>,
    pub policy: PathBuf,
    pub telemetry: Telemetry,
    pub timeouts: Timeouts,
    pub limits_backend: String,
    pub on_backend_error: OnBackendError,
    pub resource_limits: ResourceLimits,
    pub upstream_pool: UpstreamPool,
    pub shutdown_grace: Duration,
    /// Ranges every pathway may reach despite the address guard (development
    /// clusters, tests); empty by default.
    pub allow_cidrs: Vec<ipnet::IpNet>,
    pub interception: Option<Interception>,
}

/// Values given on the command line; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub policy: Option<PathBuf>,
    pub workload_api: Option<String>,
    pub audit_log: Option<String>,
}

impl GatewayConfig {
    /// Reads and validates `gateway.yaml`.
    pub fn load(path: &Path, overrides: &Overrides, env: &dyn Env) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_str(&text, &path.display().to_string(), overrides, env)
    }

    pub fn from_yaml_str(
        yaml: &str,
        origin: &str,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = if yaml.trim().is_empty() {
            RawConfig::default()
        } else {
            parse_yaml(yaml, origin)?
        };
        Self::from_raw(raw, origin, overrides, env)
    }

    fn from_raw(
        raw: RawConfig,
        origin: &str,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<Self, ConfigError> {
        let fields = Fields { origin };
        let bad = |key: &str, message: String| fields.bad(key, message);
        let addr = |key: &str, value: &str| fields.addr(key, value);
        let duration = |key: &str, value: Option<&String>, default: Duration| {
            fields.duration(key, value, default)
        };

        let listen_s = overrides
            .listen
            .clone()
            .or(raw.listen)
            .unwrap_or_else(|| "0.0.0.0:8443".into());
        let admin_s = overrides
            .admin
            .clone()
            .or(raw.admin)
            .unwrap_or_else(|| "127.0.0.1:9901".into());
        let listen = addr("listen", &listen_s)?;
        let admin = addr("admin", &admin_s)?;
        if listen == admin && listen.port() != 0 {
            return Err(bad(
                "admin",
                "must not share the mTLS listener's address".into(),
            ));
        }

        let workload_api = overrides
            .workload_api
            .clone()
            .or(raw.identity.workload_api)
            .or_else(|| env.var("SPIFFE_ENDPOINT_SOCKET"))
            .ok_or_else(|| {
                bad(
                    "identity.workload_api",
                    "not set, and SPIFFE_ENDPOINT_SOCKET is empty: say where the SPIFFE Workload API socket is (unix:///path/to/agent.sock)".into(),
                )
            })?;
        if !(workload_api.starts_with("unix:") || workload_api.starts_with("tcp://")) {
            return Err(bad(
                "identity.workload_api",
                format!("`{workload_api}` must start with unix:// or tcp://"),
            ));
        }
        let identity_startup_timeout = duration(
            "identity.startup_timeout",
            raw.identity.startup_timeout.as_ref(),
            Duration::from_secs(60),
        )?;
        // A workload registered under several entries gets several SVIDs, in an order the
        // Workload API does not promise (SPIRE sorts them by entry ID).
        let identity_spiffe_id = match raw.identity.spiffe_id.as_deref() {
            None => None,
            Some(id) => Some(spiffe::SpiffeId::new(id).map_err(|e| {
                bad(
                    "identity.spiffe_id",
                    format!("`{id}` is not a SPIFFE ID: {e}"),
                )
            })?),
        };

        let policy = overrides
            .policy
            .clone()
            .or(raw.policy)
            .ok_or_else(|| bad("policy", "not set: give the path of policy.yaml".into()))?;

        let otlp_endpoint = raw
            .telemetry
            .otlp_endpoint
            .or_else(|| env.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env.var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let otlp_protocol = match raw
            .telemetry
            .otlp_protocol
            .or_else(|| env.var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
            .or_else(|| env.var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                return Err(bad(
                    "telemetry.otlp_protocol",
                    format!("`{other}` is not one of grpc, http/protobuf"),
                ))
            }
        };
        let otlp_headers = match env
            .var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", v))
            .or_else(|| {
                env.var("OTEL_EXPORTER_OTLP_HEADERS")
                    .map(|v| ("OTEL_EXPORTER_OTLP_HEADERS", v))
            }) {
            None => http::HeaderMap::new(),
            Some((name, value)) => otlp_headers(&value).map_err(|message| bad(name, message))?,
        };
        let service_name = raw
            .telemetry
            .service_name
            .or_else(|| env.var("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "egress-gateway".into());
        let audit_log = match overrides
            .audit_log
            .clone()
            .or(raw.telemetry.audit_log)
            .as_deref()
        {
            None | Some("stdout") | Some("-") => AuditSink::Stdout,
            Some("") => return Err(bad("telemetry.audit_log", "must not be empty".into())),
            Some(path) => AuditSink::File(PathBuf::from(path)),
        };
        let audit_rotation = match (
            &audit_log,
            raw.telemetry.audit_log_max_bytes,
            raw.telemetry.audit_log_keep,
        ) {
            (_, None, None) => None,
            (_, None, Some(_)) => {
                return Err(bad(
                    "telemetry.audit_log_keep",
                    "needs telemetry.audit_log_max_bytes (rotation is by size)".into(),
                ))
            }
            (AuditSink::Stdout, Some(_), _) => {
                return Err(bad(
                    "telemetry.audit_log_max_bytes",
                    "rotation needs a file audit_log, not stdout".into(),
                ))
            }
            (AuditSink::File(_), Some(0), _) => {
                return Err(bad(
                    "telemetry.audit_log_max_bytes",
                    "must be positive".into(),
                ))
            }
            (AuditSink::File(_), Some(_), Some(0)) => {
                return Err(bad(
                    "telemetry.audit_log_keep",
                    "must be at least 1 (the file rotated last)".into(),
                ))
            }
            (AuditSink::File(_), Some(max_bytes), keep) => Some(AuditRotation {
                max_bytes,
                keep: keep.unwrap_or(5),
            }),
        };

        let timeouts = Timeouts {
            handshake: duration(
                "timeouts.handshake",
                raw.timeouts.handshake.as_ref(),
                Duration::from_secs(10),
            )?,
            request_header: duration(
                "timeouts.request_header",
                raw.timeouts.request_header.as_ref(),
                Duration::from_secs(10),
            )?,
            connect: duration(
                "timeouts.connect",
                raw.timeouts.connect.as_ref(),
                Duration::from_secs(10),
            )?,
            idle: duration(
                "timeouts.idle",
                raw.timeouts.idle.as_ref(),
                Duration::from_secs(300),
            )?,
            response: duration(
                "timeouts.response",
                raw.timeouts.response.as_ref(),
                Duration::from_secs(60),
            )?,
        };

        // From the environment when the file leaves it out: a Kubernetes Secret can hold a
        // Redis URL with its password, which a ConfigMap should not.
        let limits_backend = raw
            .limits_backend
            .or_else(|| env.var("EGRESS_LIMITS_BACKEND"))
            .unwrap_or_else(|| "memory".into());
        if limits_backend != "memory"
            && !(limits_backend.starts_with("redis://") || limits_backend.starts_with("rediss://"))
        {
            return Err(bad(
                "limits_backend",
                format!("`{limits_backend}` is neither `memory` nor a redis:// URL"),
            ));
        }
        let on_backend_error = match raw.on_backend_error.as_deref() {
            None | Some("deny") => OnBackendError::Deny,
            Some("allow_local") => OnBackendError::AllowLocal,
            Some(other) => {
                return Err(bad(
                    "on_backend_error",
                    format!("`{other}` is not one of deny, allow_local"),
                ))
            }
        };

        let positive = |key: &str, v: Option<usize>, default: usize| match v {
            None => Ok(default),
            Some(0) => Err(bad(key, "must be at least 1".into())),
            Some(n) => Ok(n),
        };
        let resource_limits = ResourceLimits {
            max_connections: positive(
                "limits.max_connections",
                raw.limits.max_connections,
                10_000,
            )?,
            max_connections_per_agent: positive(
                "limits.max_connections_per_agent",
                raw.limits.max_connections_per_agent,
                1_000,
            )?,
            max_header_bytes: positive(
                "limits.max_header_bytes",
                raw.limits.max_header_bytes,
                64 * 1024,
            )?,
        };
        if resource_limits.max_header_bytes < 8192 {
            return Err(bad(
                "limits.max_header_bytes",
                "must be at least 8192 (the HTTP/1 parser's minimum buffer)".into(),
            ));
        }
        let pool_default = UpstreamPool::default();
        let upstream_pool = UpstreamPool {
            max_idle_per_destination: positive(
                "upstream_pool.max_idle_per_destination",
                raw.upstream_pool.max_idle_per_destination,
                pool_default.max_idle_per_destination,
            )?,
            idle_timeout: duration(
                "upstream_pool.idle_timeout",
                raw.upstream_pool.idle_timeout.as_ref(),
                pool_default.idle_timeout,
            )?,
        };
        let shutdown_grace = duration(
            "shutdown_grace",
            raw.shutdown_grace.as_ref(),
            Duration::from_secs(30),
        )?;

        let mut allow_cidrs = Vec::new();
        for (i, c) in raw.allow_cidrs.iter().enumerate() {
            let net: ipnet::IpNet = c.parse().map_err(|_| {
                bad(
                    &format!("allow_cidrs[{i}]"),
                    format!("`{c}` is not a CIDR such as 10.96.0.0/12"),
                )
            })?;
            if net.trunc() != net {
                return Err(bad(
                    &format!("allow_cidrs[{i}]"),
                    format!("`{c}` has host bits set; did you mean {}?", net.trunc()),
                ));
            }
            allow_cidrs.push(net);
        }

        let interception = match raw.interception {
            None => None,
            Some(raw) => {
                let ca_cert = raw.ca_cert.ok_or_else(|| {
                    bad(
                        "interception.ca_cert",
                        "not set: give the PEM file of the interception CA certificate".into(),
                    )
                })?;
                let ca_key = raw.ca_key.ok_or_else(|| {
                    bad(
                        "interception.ca_key",
                        "not set: give the PEM file of the interception CA's private key".into(),
                    )
                })?;
                let leaf_ttl = duration(
                    "interception.leaf_ttl",
                    raw.leaf_ttl.as_ref(),
                    Duration::from_secs(24 * 3600),
                )?;
                if leaf_ttl < Duration::from_secs(60) {
                    return Err(bad(
                        "interception.leaf_ttl",
                        "must be at least 1m (leaves are renewed at 80 % of their life)".into(),
                    ));
                }
                Some(Interception {
                    ca_cert,
                    ca_key,
                    leaf_ttl,
                })
            }
        };

        Ok(GatewayConfig {
            listen,
            admin,
            workload_api,
            identity_startup_timeout,
            identity_spiffe_id,
            policy,
            telemetry: Telemetry {
                otlp_endpoint,
                otlp_protocol,
                otlp_headers,
                service_name,
                audit_log,
                audit_rotation,
            },
            timeouts,
            limits_backend,
            on_backend_error,
            resource_limits,
            upstream_pool,
            shutdown_grace,
            allow_cidrs,
            interception,
        })
    }
}

/// Builds the errors of one config file: each names the file and the key.
pub(crate) struct Fields<'a> {
    pub(crate) origin: &'a str,
}

impl Fields<'_> {
    pub(crate) fn bad(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key: key.to_string(),
            location: String::new(),
            message,
        }
    }

    pub(crate) fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.bad(
                key,
                format!("`{value}` is not an address of the form ip:port"),
            )
        })
    }

    /// A positive duration such as `10s` or `500ms`, or `default` when absent.
    pub(crate) fn duration(
        &self,
        key: &str,
        value: Option<&String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(self.bad(key, format!("`{v}` must be longer than zero"))),
                Err(e) => Err(self.bad(
                    key,
                    format!("`{v}` is not a duration like 10s or 500ms ({e})"),
                )),
            },
        }
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs separated by commas, values
/// percent-encoded, as the OpenTelemetry specification writes them.
fn otlp_headers(list: &str) -> Result<http::HeaderMap, String> {
    let mut headers = http::HeaderMap::new();
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not of the form key=value"));
        };
        let name = http::HeaderName::from_bytes(key.trim().as_bytes())
            .map_err(|_| format!("`{}` is not a header name", key.trim()))?;
        let decoded = egress_policy::percent_decode(value.trim())
            .ok_or_else(|| format!("the value of `{name}` has a bad percent-escape"))?;
        let value = http::HeaderValue::from_bytes(&decoded)
            .map_err(|_| format!("the value of `{name}` is not a valid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Parses YAML with the failing field's path and line in the error.
fn parse_yaml(yaml: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(yaml, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let location = e
            .location()
            .map(|l| format!("line {}: ", l.line()))
            .unwrap_or_default();
        // The first line of saphyr's message; the rest is a source snippet.
        let message = e.to_string().lines().next().unwrap_or_default().to_string();
        ConfigError::Invalid {
            origin: origin.to_string(),
            key: if path.is_empty() || path == "." {
                "(top level)".into()
            } else {
                path
            },
            location,
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);
    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn env() -> FakeEnv {
        FakeEnv(HashMap::from([(
            "SPIFFE_ENDPOINT_SOCKET",
            "unix:///tmp/agent.sock",
        )]))
    }

    fn load(yaml: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::from_yaml_str(yaml, "gateway.yaml", &Overrides::default(), &env())
    }

    #[test]
    fn full_example_from_the_product_contract_loads() {
        let cfg = load(
            r#"
listen: 0.0.0.0:8443
admin: 127.0.0.1:9901
identity:
  workload_api: unix:///run/spire/sockets/agent.sock
policy: /etc/egress-gateway/policy.yaml
telemetry:
  otlp_endpoint: http://otel-collector:4317
  service_name: egress-gateway
  audit_log: stdout
timeouts: { handshake: 10s, request_header: 10s, connect: 10s, idle: 300s }
limits_backend: memory
on_backend_error: deny
"#,
        )
        .unwrap();
        assert_eq!(cfg.workload_api, "unix:///run/spire/sockets/agent.sock");
        assert_eq!(cfg.timeouts.idle, Duration::from_secs(300));
        assert_eq!(cfg.telemetry.audit_log, AuditSink::Stdout);
        assert_eq!(cfg.on_backend_error, OnBackendError::Deny);
    }

    #[test]
    fn otlp_headers_come_from_the_standard_variables() {
        let load_with = |env: &FakeEnv| {
            GatewayConfig::from_yaml_str(
                "policy: p.yaml\n",
                "gateway.yaml",
                &Overrides::default(),
                env,
            )
        };
        let mut env = env();
        env.0.insert(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "authorization=Bearer%20abc, x-scope-orgid=team-1",
        );
        let cfg = load_with(&env).unwrap();
        let h = &cfg.telemetry.otlp_headers;
        assert_eq!(h["authorization"], "Bearer abc");
        assert_eq!(h["x-scope-orgid"], "team-1");

        // The traces variable wins; a bad one names itself and what is wrong.
        for (value, says) in [
            ("x-token=%zz", "percent-escape"),
            ("no-equals-sign", "key=value"),
        ] {
            env.0.insert("OTEL_EXPORTER_OTLP_TRACES_HEADERS", value);
            let err = load_with(&env).unwrap_err().to_string();
            assert!(err.contains("OTEL_EXPORTER_OTLP_TRACES_HEADERS"), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn upstream_pool_defaults_and_overrides() {
        let cfg = load("policy: p.yaml\n").unwrap();
        assert_eq!(cfg.upstream_pool, UpstreamPool::default());
        assert_eq!(cfg.upstream_pool.max_idle_per_destination, 256);
        let cfg = load(
            "policy: p.yaml\nupstream_pool: { max_idle_per_destination: 512, idle_timeout: 30s }\n",
        )
        .unwrap();
        assert_eq!(cfg.upstream_pool.max_idle_per_destination, 512);
        assert_eq!(cfg.upstream_pool.idle_timeout, Duration::from_secs(30));
        for (yaml, key) in [
            (
                "policy: p.yaml\nupstream_pool: { max_idle_per_destination: 0 }\n",
                "`upstream_pool.max_idle_per_destination`",
            ),
            (
                "policy: p.yaml\nupstream_pool: { idle_timeout: later }\n",
                "`upstream_pool.idle_timeout`",
            ),
            (
                "policy: p.yaml\nupstream_pool: { max_idle: 3 }\n",
                "max_idle",
            ),
        ] {
            let err = load(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn workload_api_falls_back_to_the_environment() {
        let cfg = load("policy: p.yaml\n").unwrap();
        assert_eq!(cfg.workload_api, "unix:///tmp/agent.sock");
        assert_eq!(cfg.listen.port(), 8443);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("policy: p.yaml\ntimeouts: { handshak: 1s }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("handshak"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (yaml, key) in [
            (
                "policy: p.yaml\ntimeouts: { connect: soon }\n",
                "timeouts.connect",
            ),
            ("policy: p.yaml\nlisten: nowhere\n", "listen"),
            (
                "policy: p.yaml\non_backend_error: maybe\n",
                "on_backend_error",
            ),
            (
                "policy: p.yaml\nlimits_backend: etcd://x\n",
                "limits_backend",
            ),
            ("listen: 0.0.0.0:1\n", "policy"),
        ] {
            let err = load(yaml).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{yaml}: {err}");
        }
    }

    #[test]
    fn limits_backend_comes_from_the_file_then_the_environment() {
        let with = |vars: &[(&'static str, &'static str)]| {
            let mut e = env();
            e.0.extend(vars.iter().copied());
            e
        };
        let from_env = with(&[("EGRESS_LIMITS_BACKEND", "redis://redis:6379/0")]);
        let cfg =
            GatewayConfig::from_yaml_str("policy: p.yaml\n", "g", &Overrides::default(), &from_env)
                .unwrap();
        assert_eq!(cfg.limits_backend, "redis://redis:6379/0");
        let cfg = GatewayConfig::from_yaml_str(
            "policy: p.yaml\nlimits_backend: memory\n",
            "g",
            &Overrides::default(),
            &from_env,
        )
        .unwrap();
        assert_eq!(cfg.limits_backend, "memory", "the file wins");
        assert_eq!(load("policy: p.yaml\n").unwrap().limits_backend, "memory");
    }

    #[test]
    fn audit_rotation_needs_a_file_and_a_size() {
        let cfg = load("policy: p.yaml\ntelemetry: { audit_log: /var/log/a.log, audit_log_max_bytes: 1048576 }\n").unwrap();
        assert_eq!(
            cfg.telemetry.audit_rotation,
            Some(AuditRotation {
                max_bytes: 1_048_576,
                keep: 5
            })
        );
        assert_eq!(
            load("policy: p.yaml\n").unwrap().telemetry.audit_rotation,
            None
        );
        for (telemetry, key) in [
            (
                "{ audit_log_max_bytes: 1000 }",
                "telemetry.audit_log_max_bytes",
            ),
            (
                "{ audit_log: a.log, audit_log_keep: 3 }",
                "telemetry.audit_log_keep",
            ),
            (
                "{ audit_log: a.log, audit_log_max_bytes: 0 }",
                "telemetry.audit_log_max_bytes",
            ),
            (
                "{ audit_log: a.log, audit_log_max_bytes: 10, audit_log_keep: 0 }",
                "telemetry.audit_log_keep",
            ),
        ] {
            let err = load(&format!("policy: p.yaml\ntelemetry: {telemetry}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{telemetry}: {err}");
        }
    }

    #[test]
    fn identity_spiffe_id_is_optional_and_checked() {
        assert_eq!(load("policy: p.yaml\n").unwrap().identity_spiffe_id, None);
        let cfg = load(
            "policy: p.yaml\nidentity:\n  spiffe_id: spiffe://example.org/ns/egress-gateway/sa/egress-gateway\n",
        )
        .unwrap();
        assert_eq!(
            cfg.identity_spiffe_id.map(|id| id.to_string()).as_deref(),
            Some("spiffe://example.org/ns/egress-gateway/sa/egress-gateway")
        );
        let err = load("policy: p.yaml\nidentity:\n  spiffe_id: https://example.org/gw\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`identity.spiffe_id`"), "{err}");
    }

    #[test]
    fn gateway_wide_allow_cidrs_are_validated() {
        let cfg = load("policy: p.yaml\nallow_cidrs: [127.0.0.0/8, \"::1/128\"]\n").unwrap();
        assert_eq!(cfg.allow_cidrs.len(), 2);
        let err = load("policy: p.yaml\nallow_cidrs: [10.0.0.1/8]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("allow_cidrs[0]") && err.contains("10.0.0.0/8"),
            "{err}"
        );
        let err = load("policy: p.yaml\nallow_cidrs: [nope]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_cidrs[0]"), "{err}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let o = Overrides {
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let cfg = GatewayConfig::from_yaml_str(
            "policy: p.yaml\nlisten: 0.0.0.0:8443\n",
            "g.yaml",
            &o,
            &env(),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 0);
    }
}
