//! The sidecar's configuration: flags, an optional `sidecar.yaml`, and
//! `SPIFFE_ENDPOINT_SOCKET`. Flags win over the file, the file over the environment.
//!
//! Strict like `gateway.yaml`: unknown keys are an error, and every error names the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use egress_policy::SpiffeId;
use serde::Deserialize;

use crate::config::{ConfigError, Env, Fields};

/// Everything the sidecar needs to run.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// Plain HTTP proxy listener for the agent (loopback unless `allow_non_loopback`).
    pub listen: SocketAddr,
    /// `/healthz` and `/readyz`.
    pub admin: SocketAddr,
    /// The gateway's mTLS listener, `host:port`; resolved on every new connection.
    pub gateway: String,
    /// The only SPIFFE ID the gateway may present.
    pub gateway_id: SpiffeId,
    pub workload_api: String,
    pub startup_timeout: Duration,
    pub allow_non_loopback: bool,
    pub timeouts: SidecarTimeouts,
    /// Idle mTLS connections to the gateway kept for reuse.
    pub max_idle_connections: usize,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct SidecarTimeouts {
    /// TCP connect plus TLS handshake to the gateway.
    pub connect: Duration,
    /// How long the agent may take to send a request's headers.
    pub request_header: Duration,
    /// How long an idle pooled connection to the gateway is kept.
    pub idle: Duration,
}

impl Default for SidecarTimeouts {
    fn default() -> Self {
        SidecarTimeouts {
            connect: Duration::from_secs(10),
            request_header: Duration::from_secs(10),
            // Below the gateway's default idle timeout (300s), so the sidecar drops a
            // pooled connection before the gateway does.
            idle: Duration::from_secs(90),
        }
    }
}

impl SidecarConfig {
    /// A configuration with the defaults: for tests and embedding.
    pub fn new(gateway: impl Into<String>, gateway_id: SpiffeId, workload_api: String) -> Self {
        SidecarConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15021)),
            gateway: gateway.into(),
            gateway_id,
            workload_api,
            startup_timeout: Duration::from_secs(60),
            allow_non_loopback: false,
            timeouts: SidecarTimeouts::default(),
            max_idle_connections: 64,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// Builds the configuration from flags (`overrides`), an optional file and `env`.
    pub fn load(
        file: Option<&Path>,
        overrides: &SidecarOverrides,
        env: &dyn Env,
    ) -> Result<Self, ConfigError> {
        let (raw, origin) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                (
                    parse_yaml(&text, &path.display().to_string())?,
                    path.display().to_string(),
                )
            }
            None => (RawSidecar::default(), "sidecar flags".to_string()),
        };
        Self::from_raw(raw, &origin, overrides, env)
    }

    pub fn from_yaml_str(
        yaml: &str,
        overrides: &SidecarOverrides,
        env: &dyn Env,
    ) -> Result<Self, ConfigError> {
        Self::from_raw(
            parse_yaml(yaml, "sidecar.yaml")?,
            "sidecar.yaml",
            overrides,
            env,
        )
    }

    fn from_raw(
        raw: RawSidecar,
        origin: &str,
        o: &SidecarOverrides,
        env: &dyn Env,
    ) -> Result<Self, ConfigError> {
        let fields = Fields { origin };
        let bad = |key: &str, message: String| fields.bad(key, message);
        let addr = |key: &str, value: &str| fields.addr(key, value);
        let duration = |key: &str, value: Option<&String>, default: Duration| {
            fields.duration(key, value, default)
        };

        let listen = addr(
            "listen",
            o.listen
                .as_deref()
                .or(raw.listen.as_deref())
                .unwrap_or("127.0.0.1:15001"),
        )?;
        let admin = addr(
            "admin",
            o.admin
                .as_deref()
                .or(raw.admin.as_deref())
                .unwrap_or("127.0.0.1:15021"),
        )?;
        if listen == admin && listen.port() != 0 {
            return Err(bad(
                "admin",
                "must not share the proxy listener's address".into(),
            ));
        }
        let allow_non_loopback = o.allow_non_loopback || raw.allow_non_loopback.unwrap_or(false);
        // The listener takes plain HTTP with no authentication: anyone who can reach it
        // speaks to the gateway as this agent.
        if !listen.ip().is_loopback() && !allow_non_loopback {
            return Err(bad(
                "listen",
                format!(
                    "`{listen}` is not a loopback address; the sidecar's proxy port is \
                     unauthenticated, so anything that reaches it acts as this agent. \
                     Use 127.0.0.1 or [::1], or pass --allow-non-loopback if that is really meant"
                ),
            ));
        }

        let gateway = o.gateway.clone().or(raw.gateway).ok_or_else(|| {
            bad(
                "gateway",
                "not set: say where the gateway's mTLS listener is (host:port)".into(),
            )
        })?;
        split_host_port(&gateway).map_err(|m| bad("gateway", m))?;
        let gateway_id_s = o.gateway_id.clone().or(raw.gateway_id).ok_or_else(|| {
            bad(
                "gateway_id",
                "not set: say which SPIFFE ID the gateway must present".into(),
            )
        })?;
        let gateway_id: SpiffeId = gateway_id_s
            .parse()
            .map_err(|e| bad("gateway_id", format!("`{gateway_id_s}`: {e}")))?;

        let workload_api = o
            .workload_api
            .clone()
            .or(raw.workload_api)
            .or_else(|| env.var("SPIFFE_ENDPOINT_SOCKET"))
            .ok_or_else(|| {
                bad(
                    "workload_api",
                    "not set, and SPIFFE_ENDPOINT_SOCKET is empty: say where the SPIFFE Workload API socket is (unix:///path/to/agent.sock)".into(),
                )
            })?;
        if !(workload_api.starts_with("unix:") || workload_api.starts_with("tcp://")) {
            return Err(bad(
                "workload_api",
                format!("`{workload_api}` must start with unix:// or tcp://"),
            ));
        }

        let defaults = SidecarTimeouts::default();
        let timeouts = SidecarTimeouts {
            connect: duration(
                "timeouts.connect",
                raw.timeouts.connect.as_ref(),
                defaults.connect,
            )?,
            request_header: duration(
                "timeouts.request_header",
                raw.timeouts.request_header.as_ref(),
                defaults.request_header,
            )?,
            idle: duration("timeouts.idle", raw.timeouts.idle.as_ref(), defaults.idle)?,
        };
        Ok(SidecarConfig {
            listen,
            admin,
            gateway,
            gateway_id,
            workload_api,
            startup_timeout: duration(
                "startup_timeout",
                raw.startup_timeout.as_ref(),
                Duration::from_secs(60),
            )?,
            allow_non_loopback,
            timeouts,
            max_idle_connections: raw.max_idle_connections.unwrap_or(64),
            shutdown_grace: duration(
                "shutdown_grace",
                raw.shutdown_grace.as_ref(),
                Duration::from_secs(10),
            )?,
        })
    }
}

/// What the command line sets; `None` leaves the file's value (or the default).
#[derive(Debug, Clone, Default)]
pub struct SidecarOverrides {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub gateway: Option<String>,
    pub gateway_id: Option<String>,
    pub workload_api: Option<String>,
    pub allow_non_loopback: bool,
}

/// `host:port` (IPv6 literals in brackets) into its parts.
pub(crate) fn split_host_port(s: &str) -> Result<(&str, u16), String> {
    let err = || format!("`{s}` is not of the form host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(':') && !s.starts_with('[') {
        return Err(err());
    }
    let port: u16 = port.parse().map_err(|_| err())?;
    if port == 0 {
        return Err(err());
    }
    Ok((host, port))
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSidecar {
    listen: Option<String>,
    admin: Option<String>,
    gateway: Option<String>,
    gateway_id: Option<String>,
    workload_api: Option<String>,
    allow_non_loopback: Option<bool>,
    startup_timeout: Option<String>,
    #[serde(default)]
    timeouts: RawTimeouts,
    max_idle_connections: Option<usize>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<String>,
    request_header: Option<String>,
    idle: Option<String>,
}

/// Parses YAML with the failing field's path and line in the error.
fn parse_yaml(yaml: &str, origin: &str) -> Result<RawSidecar, ConfigError> {
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str(yaml, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    });
    result.map_err(|e| ConfigError::Invalid {
        origin: origin.to_string(),
        key: if path.is_empty() || path == "." {
            "(top level)".into()
        } else {
            path
        },
        location: e
            .location()
            .map(|l| format!("line {}: ", l.line()))
            .unwrap_or_default(),
        // The first line of saphyr's message; the rest is a source snippet.
        message: e.to_string().lines().next().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoEnv;
    impl Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }
    struct SocketEnv;
    impl Env for SocketEnv {
        fn var(&self, name: &str) -> Option<String> {
            (name == "SPIFFE_ENDPOINT_SOCKET").then(|| "unix:///run/spire/agent.sock".into())
        }
    }

    const GW: &str = "spiffe://example.org/ns/egress-gateway/sa/egress-gateway";

    fn flags() -> SidecarOverrides {
        SidecarOverrides {
            gateway: Some("egress-gateway.egress-gateway.svc:8443".into()),
            gateway_id: Some(GW.into()),
            ..Default::default()
        }
    }

    #[test]
    fn flags_and_environment_are_enough() {
        let c = SidecarConfig::load(None, &flags(), &SocketEnv).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:15001");
        assert_eq!(c.admin.to_string(), "127.0.0.1:15021");
        assert_eq!(c.workload_api, "unix:///run/spire/agent.sock");
        assert_eq!(c.gateway_id.to_string(), GW);
        assert!(!c.allow_non_loopback);
    }

    #[test]
    fn non_loopback_listen_needs_explicit_consent() {
        let mut o = flags();
        o.listen = Some("0.0.0.0:15001".into());
        let e = SidecarConfig::load(None, &o, &SocketEnv)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`listen`") && e.contains("--allow-non-loopback"),
            "{e}"
        );
        o.allow_non_loopback = true;
        assert!(SidecarConfig::load(None, &o, &SocketEnv).is_ok());
        o.listen = Some("[::1]:15001".into());
        o.allow_non_loopback = false;
        assert!(SidecarConfig::load(None, &o, &SocketEnv).is_ok());
    }

    #[test]
    fn file_values_and_flag_precedence() {
        let yaml = format!(
            "listen: 127.0.0.1:7000\ngateway: gw:8443\ngateway_id: {GW}\nworkload_api: unix:///tmp/a.sock\ntimeouts: {{ connect: 2s, idle: 30s }}\n"
        );
        let mut o = SidecarOverrides {
            listen: Some("127.0.0.1:7001".into()),
            ..Default::default()
        };
        let c = SidecarConfig::from_yaml_str(&yaml, &o, &NoEnv).unwrap();
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.gateway, "gw:8443");
        assert_eq!(c.timeouts.connect, Duration::from_secs(2));
        assert_eq!(c.timeouts.idle, Duration::from_secs(30));
        o.workload_api = Some("/no/scheme".into());
        let e = SidecarConfig::from_yaml_str(&yaml, &o, &NoEnv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("workload_api"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = SidecarConfig::from_yaml_str("gatway: x:1\n", &flags(), &SocketEnv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gatway"), "{e}");
        let e = SidecarConfig::from_yaml_str("timeouts: { connect: soon }\n", &flags(), &SocketEnv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeouts.connect"), "{e}");
        let mut o = flags();
        o.gateway_id = Some("https://example.org/x".into());
        let e = SidecarConfig::load(None, &o, &SocketEnv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway_id"), "{e}");
        o = flags();
        o.gateway = Some("no-port".into());
        let e = SidecarConfig::load(None, &o, &SocketEnv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`gateway`"), "{e}");
        let e = SidecarConfig::load(None, &flags(), &NoEnv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SPIFFE_ENDPOINT_SOCKET"), "{e}");
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("gw.svc:8443").unwrap(), ("gw.svc", 8443));
        assert_eq!(split_host_port("[::1]:8443").unwrap(), ("::1", 8443));
        assert!(split_host_port("::1:8443").is_err());
        assert!(split_host_port("gw:0").is_err());
        assert!(split_host_port(":8443").is_err());
    }
}
