//! `egress-gateway sidecar`: plain-HTTP proxy beside an agent, mTLS to the gateway.
//! Serves until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::ProcessEnv;
use crate::sidecar::{self, SidecarConfig, SidecarOverrides};

#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// Optional sidecar.yaml; flags override its values.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Plain HTTP proxy listener for the agent (loopback only unless --allow-non-loopback)
    /// [default: 127.0.0.1:15001].
    #[arg(long)]
    pub listen: Option<String>,
    /// The gateway's mTLS listener, host:port.
    #[arg(long)]
    pub gateway: Option<String>,
    /// The SPIFFE ID the gateway must present; any other is refused.
    #[arg(long)]
    pub gateway_id: Option<String>,
    /// /healthz and /readyz [default: 127.0.0.1:15021].
    #[arg(long)]
    pub admin: Option<String>,
    /// The SPIFFE Workload API (unix:///path/to/agent.sock) [default: $SPIFFE_ENDPOINT_SOCKET].
    #[arg(long)]
    pub workload_api: Option<String>,
    /// Allow a non-loopback --listen address. The proxy port is unauthenticated: whoever
    /// reaches it speaks to the gateway as this agent.
    #[arg(long)]
    pub allow_non_loopback: bool,
}

pub fn run(args: SidecarArgs) -> ExitCode {
    crate::telemetry::init_logging();
    let overrides = SidecarOverrides {
        listen: args.listen,
        admin: args.admin,
        gateway: args.gateway,
        gateway_id: args.gateway_id,
        workload_api: args.workload_api,
        allow_non_loopback: args.allow_non_loopback,
    };
    let config = match SidecarConfig::load(args.config.as_deref(), &overrides, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    super::block_on(async move {
        let running = match sidecar::start(config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the sidecar");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_shutdown_signal().await;
        running.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
