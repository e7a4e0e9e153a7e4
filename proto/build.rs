// Generate tonic/prost code without a system `protoc`: protox parses the .proto
// files in pure Rust and hands a FileDescriptorSet to tonic-prost-build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/coordinator.proto", "proto/collective.proto"];
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
