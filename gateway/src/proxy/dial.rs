//! Resolve once, check every answer, connect only to an address that passed.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpStream;

use super::address_guard;
use super::target::{Host, Target};

pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// Name resolution, behind a trait so tests can answer with private or rebinding
/// addresses.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a>;
}

/// The system resolver (getaddrinfo). Only DNS names that passed strict parsing reach
/// it, so it never sees a numeric spelling it would interpret.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name, 0)).await?;
            let mut ips: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !ips.contains(&a.ip()) {
                    ips.push(a.ip());
                }
            }
            Ok(ips)
        })
    }
}

/// The default resolver: hickory-resolver with the system configuration
/// (`/etc/resolv.conf`, `/etc/hosts`) and its own per-query timeout. Only DNS names
/// that passed strict parsing reach it.
#[derive(Clone)]
pub struct HickoryResolver {
    inner: hickory_resolver::TokioResolver,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver from the system configuration: {0}")]
pub struct ResolverSetupError(String);

impl HickoryResolver {
    /// Reads the system configuration; `timeout` bounds each query to a name server.
    pub fn from_system_conf(timeout: Duration) -> Result<Self, ResolverSetupError> {
        let mut builder = hickory_resolver::TokioResolver::builder_tokio()
            .map_err(|e| ResolverSetupError(e.to_string()))?;
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        // Both families: every answer is checked, and the passing ones tried in order.
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let inner = builder
            .build()
            .map_err(|e| ResolverSetupError(e.to_string()))?;
        Ok(HickoryResolver { inner })
    }
}

impl Resolve for HickoryResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            let lookup = self
                .inner
                .lookup_ip(name)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut ips: Vec<IpAddr> = Vec::new();
            for ip in lookup.iter() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            Ok(ips)
        })
    }
}

/// The resolver the gateway uses unless a test injects one: hickory with the system
/// configuration, or getaddrinfo when that configuration cannot be read.
pub fn default_resolver(timeout: Duration) -> Arc<dyn Resolve> {
    match HickoryResolver::from_system_conf(timeout) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::warn!(error = %e, "falling back to the system resolver (getaddrinfo)");
            Arc::new(SystemResolver)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("resolving {host} timed out")]
    ResolveTimeout { host: String },
    #[error("destination address not allowed: {ip} is {range}")]
    Blocked { ip: IpAddr, range: &'static str },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
}

impl DialError {
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            DialError::ConnectTimeout { .. } | DialError::ResolveTimeout { .. }
        )
    }

    pub fn is_blocked(&self) -> bool {
        matches!(self, DialError::Blocked { .. })
    }
}

/// Opens TCP connections to checked addresses.
#[derive(Clone)]
pub struct Dialer {
    resolver: Arc<dyn Resolve>,
    connect_timeout: Duration,
    resolve_timeout: Duration,
}

impl Dialer {
    pub fn new(resolver: Arc<dyn Resolve>, connect_timeout: Duration) -> Self {
        Self {
            resolver,
            connect_timeout,
            resolve_timeout: connect_timeout,
        }
    }

    /// Resolves `target` (once), drops every answer the guard refuses, and connects to
    /// the remaining addresses in order until one accepts.
    pub async fn dial(
        &self,
        target: &Target,
        allow_cidrs: &[IpNet],
    ) -> Result<(TcpStream, SocketAddr), DialError> {
        let ips = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => {
                match tokio::time::timeout(self.resolve_timeout, self.resolver.resolve(name)).await
                {
                    Err(_) => {
                        return Err(DialError::ResolveTimeout { host: name.clone() });
                    }
                    Ok(Err(e)) => {
                        return Err(DialError::Resolve {
                            host: name.clone(),
                            reason: e.to_string(),
                        })
                    }
                    Ok(Ok(ips)) if ips.is_empty() => {
                        return Err(DialError::Resolve {
                            host: name.clone(),
                            reason: "no addresses".into(),
                        })
                    }
                    Ok(Ok(ips)) => ips,
                }
            }
        };
        let mut first_blocked = None;
        let mut passing = Vec::with_capacity(ips.len());
        for ip in ips {
            match address_guard::check(ip, allow_cidrs) {
                Ok(()) => passing.push(SocketAddr::new(ip, target.port)),
                Err(range) => {
                    tracing::debug!(%ip, range = range.name, target = %target, "address refused by the guard");
                    first_blocked.get_or_insert(DialError::Blocked {
                        ip,
                        range: range.name,
                    });
                }
            }
        }
        if passing.is_empty() {
            // Every answer was blocked: a policy refusal, not an upstream failure.
            return Err(first_blocked.unwrap_or(DialError::Resolve {
                host: target.host.to_string(),
                reason: "no addresses".into(),
            }));
        }
        let mut last = None;
        for addr in passing {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, addr));
                }
                Ok(Err(e)) => {
                    last = Some(DialError::Connect {
                        target: addr.to_string(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => last = Some(DialError::ConnectTimeout { addr }),
            }
        }
        Err(last.unwrap_or(DialError::Connect {
            target: target.to_string(),
            reason: "no address to try".into(),
        }))
    }
}
