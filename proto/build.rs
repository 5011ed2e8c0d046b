//! Generates the `rstscope.v1` messages and gRPC services from `rstscope/v1/*.proto`, with the
//! `protoc` that the protoc-bin-vendored crate ships (no system package needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc);
    let protos = ["rstscope/v1/events.proto", "rstscope/v1/ingest.proto", "rstscope/v1/query.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().build_client(true).build_server(true).compile_protos(&protos, &["."])?;
    Ok(())
}
