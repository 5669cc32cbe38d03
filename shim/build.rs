//! Generates the binding of containerd's `runtimeoptions.v1.Options` (proto/), which
//! containerd-shim-protos does not ship.
use std::{fs, path::Path};

fn main() {
    let gen = Path::new(&std::env::var("OUT_DIR").unwrap()).join("gen");
    fs::create_dir_all(&gen).unwrap();
    let input = "proto/runtimeoptions.proto";
    println!("cargo:rerun-if-changed={input}");
    protobuf_codegen::Codegen::new()
        .pure()
        .out_dir(&gen)
        .include("proto")
        .input(input)
        .customize(protobuf_codegen::Customize::default().gen_mod_rs(false))
        .run()
        .expect("protobuf codegen of runtimeoptions.proto");
    // The generated file begins with inner attributes and docs, which `include!` rejects.
    let out = gen.join("runtimeoptions.rs");
    let text = fs::read_to_string(&out).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
        .collect();
    fs::write(&out, kept.join("\n")).unwrap();
}
