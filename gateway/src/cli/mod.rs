//! Subcommands of the `egress-gateway` binary.

pub mod policy;
pub mod run;
pub mod sidecar;
pub mod suggest;

/// Runs a long-lived subcommand on a multi-threaded runtime.
pub(crate) fn block_on(
    f: impl std::future::Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(f),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
