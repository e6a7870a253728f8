//! Compiles `quiver/v1/*.proto` with protox (pure Rust, no system `protoc`)
//! and writes the encoded descriptor set used by gRPC server reflection.

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["quiver/v1/feature_service.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("quiver_descriptor.bin"), fds.encode_to_vec())?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        // Events carry a handful of entities and attributes; decoding them
        // into BTreeMaps is cheaper than hashing each key (ingest decodes
        // hundreds of thousands per second).
        .btree_map([".quiver.v1.Event"])
        .compile_fds(fds)?;
    Ok(())
}
