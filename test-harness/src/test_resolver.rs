//! A resolver for the gateway that answers `*.test` names with loopback, so stock
//! clients (Go, Python) that skip the proxy for `localhost`/`127.0.0.1` still send
//! requests for e.g. `api.allowed.test` through it. Other names fail to resolve: the
//! tests never leave the machine.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use egress_gateway::proxy::dial::ResolveFuture;
use egress_gateway::proxy::Resolve;

#[derive(Debug, Default, Clone, Copy)]
pub struct LoopbackTestResolver;

impl LoopbackTestResolver {
    pub fn shared() -> Arc<dyn Resolve> {
        Arc::new(LoopbackTestResolver)
    }
}

impl Resolve for LoopbackTestResolver {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name.ends_with(".test") || name == "localhost" {
                Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{name}: only *.test names resolve in tests"),
                ))
            }
        })
    }
}
