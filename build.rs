//! Compiles `proto/` into Rust with tonic's code generator.
//!
//! The protos are parsed by `protox`, a protobuf compiler written in Rust, so a
//! fresh checkout builds without `protoc` installed. The encoded descriptor set
//! is also written to `OUT_DIR` for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "ratekeeper/v1/ratekeeper.proto",
    "ratekeeper/v1/leases.proto",
    "ratekeeper/v1/admin.proto",
    "ratekeeper/v1/reservations.proto",
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/service/rate_limit_quota/v3/rlqs.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(
        out_dir.join("ratekeeper_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    for entry in walk("proto")? {
        println!("cargo:rerun-if-changed={}", entry.display());
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// Every file under `dir`, so that editing any proto triggers a rebuild.
fn walk(dir: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::from(dir)];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
}
