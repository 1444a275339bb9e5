//! `egress-gateway run`: serve until SIGTERM/SIGINT; reload the policy on SIGHUP;
//! reopen a file audit log on SIGUSR1 (after logrotate moved it).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::{GatewayConfig, Overrides, ProcessEnv};
use crate::server;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Path of gateway.yaml.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override `listen` (ip:port of the mTLS proxy listener).
    #[arg(long)]
    pub listen: Option<String>,
    /// Override `admin` (ip:port of /healthz, /readyz, /metrics).
    #[arg(long)]
    pub admin: Option<String>,
    /// Override `policy` (path of policy.yaml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Override `identity.workload_api` (unix:///path/to/agent.sock).
    #[arg(long)]
    pub workload_api: Option<String>,
    /// Override `telemetry.audit_log` (stdout or a file path).
    #[arg(long)]
    pub audit_log: Option<String>,
}

pub fn run(args: RunArgs) -> ExitCode {
    crate::telemetry::init_logging();
    let overrides = Overrides {
        listen: args.listen,
        admin: args.admin,
        policy: args.policy,
        workload_api: args.workload_api,
        audit_log: args.audit_log,
    };
    let config = match GatewayConfig::load(&args.config, &overrides, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    super::block_on(async move {
        let gateway = match server::start(config).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_shutdown_signal(&gateway).await;
        gateway.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_shutdown_signal(gateway: &server::RunningGateway) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the policy");
                // In its own task: SIGTERM is answered even while a reload reads files.
                tokio::spawn(gateway.reload_policy());
            }
            _ = usr1.recv() => {
                let reopen = gateway.reopen_audit_log();
                tokio::spawn(async move {
                    match reopen.await {
                        Ok(()) => tracing::info!("SIGUSR1: audit log reopened"),
                        Err(e) => tracing::error!(error = %e, "SIGUSR1: cannot reopen the audit log; writing to the old file"),
                    }
                });
            }
        }
    }
}
