//! Host probes shared by the shim (`hypervisor = "auto"`, `shoji check`) and by the scripts
//! that must answer before anything heavy is built (`hack/test.sh` with
//! `SHOJI_TEST_HYPERVISOR=clh`): can this host's KVM run an ordinary guest ([`kvm`]), where
//! is a binary ([`locate`]), and can Cloud Hypervisor run guests here ([`clh_blocker`]).
//! Only libc, so that this crate and its `shoji-probe` binary build in seconds.
use std::path::{Path, PathBuf};

pub mod kvm;

pub use kvm::KvmProbe;

/// Where the configuration's bare binary names are looked for after `$PATH`: `cargo install`
/// puts virtiofsd and vhost-device-vsock there, and containerd starts shims with a minimal
/// PATH.
fn cargo_bins() -> [PathBuf; 2] {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    [home.join(".cargo/bin"), PathBuf::from("/root/.cargo/bin")]
}

/// The executable `path` names: itself when it has a `/`, else the first match in `$PATH`,
/// then in `~/.cargo/bin`. `None` when there is none.
pub fn locate(path: &Path) -> Option<PathBuf> {
    if path.components().count() != 1 || path.is_absolute() {
        return is_executable(path).then(|| path.to_path_buf());
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(cargo_bins())
        .map(|dir| dir.join(path))
        .find(|p| is_executable(p))
}

/// [`locate`] for a bare name; the name itself when it is not found, so that the error at
/// launch names what is missing.
pub fn find_binary(name: &str) -> PathBuf {
    locate(Path::new(name)).unwrap_or_else(|| PathBuf::from(name))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Why Cloud Hypervisor cannot run guests on this host, if it cannot: it has no software
/// emulation, so it needs a KVM that runs ordinary guests, and its binary (`binary`, as
/// configured; `found`: whether [`locate`] found it).
pub fn clh_blocker(kvm: &KvmProbe, binary: &Path, found: bool) -> Option<String> {
    if !kvm.usable {
        return Some(format!(
            "KVM cannot run ordinary guests here: {}",
            kvm.reason
        ));
    }
    if !found {
        return Some(format!(
            "the cloud-hypervisor binary was not found ({})",
            binary.display()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm(usable: bool) -> KvmProbe {
        KvmProbe {
            usable,
            reason: if usable { "a test guest ran" } else { "PVM" }.into(),
        }
    }

    #[test]
    fn clh_needs_a_usable_kvm_first_and_then_its_binary() {
        let bin = Path::new("cloud-hypervisor");
        assert_eq!(clh_blocker(&kvm(true), bin, true), None);
        assert_eq!(
            clh_blocker(&kvm(false), bin, true).unwrap(),
            "KVM cannot run ordinary guests here: PVM"
        );
        // KVM is the deeper reason: named even when the binary is missing as well.
        assert!(clh_blocker(&kvm(false), bin, false)
            .unwrap()
            .starts_with("KVM cannot"));
        assert_eq!(
            clh_blocker(&kvm(true), bin, false).unwrap(),
            "the cloud-hypervisor binary was not found (cloud-hypervisor)"
        );
    }

    #[test]
    fn binaries_are_found_by_path_or_by_name() {
        let sh = locate(Path::new("sh")).expect("sh on PATH");
        assert!(sh.is_absolute(), "{}", sh.display());
        assert_eq!(locate(&sh), Some(sh.clone()));
        assert_eq!(locate(Path::new("no-such-binary-shoji")), None);
        assert_eq!(locate(Path::new("/nonexistent/sh")), None);
        // A directory is not a binary.
        assert_eq!(locate(Path::new("/")), None);
        assert_eq!(
            find_binary("no-such-binary-shoji"),
            PathBuf::from("no-such-binary-shoji")
        );
    }
}
