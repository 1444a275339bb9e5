//! Fakes, fixtures and end-to-end test helpers for egress-gateway.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod agent;
pub mod ca;
pub mod gateway;
pub mod guard;
pub mod interop;
pub mod llm_upstream;
pub mod loopback;
pub mod otlp;
pub mod resolver;
pub mod sidecar;
pub mod spire;
pub mod test_resolver;
pub mod upstream;
pub mod workload_api;

/// True when the tools tests depend on (real SPIRE, redis-server, curl, the Python
/// clients) must be present: `scripts/test.sh` installs them and sets
/// `EGRESS_REQUIRE_DEPS=1`; CI systems set `CI`. Elsewhere a missing tool skips loudly.
pub fn deps_required() -> bool {
    std::env::var_os("EGRESS_REQUIRE_DEPS").is_some_and(|v| v == "1")
        || std::env::var_os("CI").is_some()
}
