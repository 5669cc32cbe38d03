//! The workspace's own binaries (the shim, the `shoji` CLI), built before the tests run
//! (`hack/test.sh` builds them; cargo does not build other packages' binaries for tests).
use std::path::PathBuf;

/// The directory holding the workspace's debug binaries.
pub fn target_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("debug")
}

/// Path of binary `name`; panics with the command that builds it when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build -p shoji-shim --bins` (hack/test.sh does)",
        path.display()
    );
    path
}
