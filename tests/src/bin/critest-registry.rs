//! Builds the images cri-tools' critest pulls (`shoji_tests::critest_images`) and serves them on 127.0.0.1 over
//! the OCI distribution API (`shoji_tests::registry`), for `hack/critest.sh`.
//!
//!     critest-registry [--port-file FILE] [--shell BUSYBOX]
//!
//! Binds a free port, writes `127.0.0.1:<port>` to FILE (when given, once the images are ready) and stdout, lists
//! the references it serves on stderr, and serves until killed. `--shell`: the busybox installed as the images'
//! `/bin/sh` (see `critest_images`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use shoji_tests::{critest_images, registry::Registry};

fn main() {
    let (mut port_file, mut shell) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--port-file", Some(file)) => port_file = Some(file),
            ("--shell", Some(file)) => shell = Some(PathBuf::from(file)),
            _ => {
                eprintln!("usage: critest-registry [--port-file FILE] [--shell BUSYBOX]");
                std::process::exit(2);
            }
        }
    }
    let images = critest_images::build(shell.as_deref()).unwrap_or_else(|e| {
        eprintln!("critest-registry: {e}");
        std::process::exit(1);
    });
    let mut registry = Registry::default();
    for tagged in images {
        eprintln!(
            "critest-registry: {} {}",
            tagged.reference, tagged.image.manifest.digest
        );
        registry.add(&tagged.reference, tagged.image);
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| {
        eprintln!("critest-registry: bind 127.0.0.1:0: {e}");
        std::process::exit(1);
    });
    let addr = listener.local_addr().expect("bound socket has an address");
    if let Some(file) = &port_file {
        // Written whole under another name and renamed: a reader never sees half an address.
        let tmp = format!("{file}.tmp");
        if let Err(e) =
            std::fs::write(&tmp, format!("{addr}\n")).and_then(|()| std::fs::rename(&tmp, file))
        {
            eprintln!("critest-registry: write {file}: {e}");
            std::process::exit(1);
        }
    }
    println!("{addr}");
    if let Err(e) = Arc::new(registry).serve(listener) {
        eprintln!("critest-registry: {e}");
        std::process::exit(1);
    }
}
