//! Generates the Workload API gRPC code from `proto/workload.proto` without `protoc`.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/workload.proto");
    let fds = protox::compile(["workload.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
