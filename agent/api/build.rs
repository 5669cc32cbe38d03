//! Generates the agent's ttrpc service, client and messages from proto/agent.proto.
use std::{fs, path::Path};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out_dir = std::env::var("OUT_DIR").unwrap();
    let gen = Path::new(&out_dir).join("gen");
    fs::create_dir_all(&gen).unwrap();
    let inputs = ["proto/agent.proto", "proto/google/protobuf/empty.proto"];
    for input in inputs {
        println!("cargo:rerun-if-changed={input}");
    }
    Codegen::new()
        .out_dir(&gen)
        .inputs(inputs)
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc-codegen failed");
    // The generated files begin with inner attributes and docs, which `include!` rejects.
    for entry in fs::read_dir(&gen).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        fs::write(&path, kept.join("\n")).unwrap();
    }
}
