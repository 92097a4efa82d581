//! Generates the protobuf messages and the async ttrpc service into `src/generated/`.
//!
//! The output goes into `src/` (not `OUT_DIR`) because the generated `mod.rs` carries inner
//! attributes that `include!` rejects; the files are checked in so readers can see them.

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let out = std::path::Path::new("src/generated");
    std::fs::create_dir_all(out)?;
    Codegen::new()
        .out_dir(out)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize { async_all: true, gen_mod: true, ..Default::default() })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(true))
        .run()
}
