//! Generates the inventory service's gRPC code. `protox` compiles the proto in pure Rust, so
//! building the shop needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/inventory.proto");
    let fds = protox::compile(["proto/inventory.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
