//! Compiles `proto/` with protox (no system `protoc`) and generates tonic + prost code.
//! The encoded descriptor set is kept in OUT_DIR for the Connect layer (JSON mapping) and
//! gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/process/process.proto", "proto/filesystem/filesystem.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `Process.Connect` would clash with the generated `ProcessClient::connect` constructor.
        .build_transport(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
