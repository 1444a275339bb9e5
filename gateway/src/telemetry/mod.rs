//! Traces, logs and the trace context carried across the gateway.

pub mod trace_context;

pub use trace_context::TraceContext;

/// Diagnostic logs go to stderr (stdout is the default audit sink), filtered by
/// `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
