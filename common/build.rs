//! Generates the drover.v1 wire types, their tonic services, proto3-JSON
//! serde impls (for `droverctl --json`) and the file descriptor set that
//! server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("drover_descriptor.bin");
    let protos = [
        "../proto/drover/v1/agent.proto",
        "../proto/drover/v1/deployer.proto",
        "../proto/drover/v1/artifacts.proto",
        "../proto/drover/v1/pipeline.proto",
        "../proto/drover/v1/deploy.proto",
        "../proto/drover/v1/train.proto",
        "../proto/drover/v1/notifications.proto",
        "../proto/drover/v1/flags.proto",
        "../proto/drover/v1/config.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }

    // No transport constructors on clients: the design fixes the RPC name
    // `AgentControl/Connect`, which would clash with the generated
    // `AgentControlClient::connect`. Clients are built from a Channel instead.
    tonic_prost_build::configure()
        .build_transport(false)
        // Small per-stream buffers: see src/codec.rs.
        .codec_path("crate::codec::DroverCodec")
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(&protos, &["../proto"])?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".drover"])?;
    Ok(())
}
