//! The answer to `containerd-shim-shoji-v2 -info`: the runtime's name, version and the OCI
//! runtime features it implements. containerd 2.x reads the features to decide what a
//! handler supports (a recursive read-only mount needs `rro` in `mountOptions`), and CRI
//! clients such as critest skip what a handler does not advertise.
//!
//! Every entry is something a container in the guest really gets: the host honours the
//! bind options (`sharefs`), the guest agent the rest. Left out on purpose: `shared`,
//! `rshared` (a guest mount cannot propagate back to the host), user namespaces and
//! idmapped mounts (not implemented), AppArmor and SELinux (the guest kernel has no LSM;
//! the VM is the boundary).
use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, Message, MessageField},
    types::introspection::{RuntimeInfo, RuntimeVersion},
};
use oci_spec::runtime::{
    Apparmor, Arch, Cgroup, Features, IDMap, LinuxFeature, LinuxNamespaceType, LinuxSeccompAction,
    MountExtensions, Seccomp, Selinux,
};

use super::RUNTIME_TYPE;

/// containerd's type URL for the runtime-spec features document.
const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Mount options a container's mounts may carry (besides filesystem data options).
const MOUNT_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "ro",
    "rw",
    "rro",
    "nosuid",
    "nodev",
    "noexec",
    "suid",
    "dev",
    "exec",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "private",
    "rprivate",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
];

const NAMESPACES: [LinuxNamespaceType; 6] = [
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Mount,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Network,
];

/// The seccomp actions libseccomp applies in the guest.
const SECCOMP_ACTIONS: [LinuxSeccompAction; 7] = [
    LinuxSeccompAction::ScmpActAllow,
    LinuxSeccompAction::ScmpActErrno,
    LinuxSeccompAction::ScmpActKill,
    LinuxSeccompAction::ScmpActKillProcess,
    LinuxSeccompAction::ScmpActLog,
    LinuxSeccompAction::ScmpActTrace,
    LinuxSeccompAction::ScmpActTrap,
];

/// The features document (runtime-spec `features.md`).
pub fn features() -> Features {
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let mut cgroup = Cgroup::default();
    // The guest is cgroup v2; the host side maps both cgroupfs and systemd paths.
    cgroup
        .set_v1(Some(false))
        .set_v2(Some(true))
        .set_systemd(Some(true));
    let mut seccomp = Seccomp::default();
    seccomp
        .set_enabled(Some(true))
        .set_actions(Some(SECCOMP_ACTIONS.to_vec()))
        .set_operators(strings(&[
            "SCMP_CMP_NE",
            "SCMP_CMP_LT",
            "SCMP_CMP_LE",
            "SCMP_CMP_EQ",
            "SCMP_CMP_GE",
            "SCMP_CMP_GT",
            "SCMP_CMP_MASKED_EQ",
        ]))
        .set_archs(Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ]));
    let mut apparmor = Apparmor::default();
    apparmor.set_enabled(Some(false));
    let mut selinux = Selinux::default();
    selinux.set_enabled(Some(false));
    let mut idmap = IDMap::default();
    idmap.set_enabled(Some(false));
    let mut mount_extensions = MountExtensions::default();
    mount_extensions.set_idmap(Some(idmap));
    let mut linux = LinuxFeature::default();
    linux
        .set_namespaces(Some(NAMESPACES.to_vec()))
        .set_cgroup(Some(cgroup))
        .set_seccomp(Some(seccomp))
        .set_apparmor(Some(apparmor))
        .set_selinux(Some(selinux))
        .set_mount_extensions(Some(mount_extensions));
    let mut features = Features::default();
    features
        .set_oci_version_min("1.0.0".into())
        .set_oci_version_max("1.2.0".into())
        .set_mount_options(strings(MOUNT_OPTIONS))
        .set_linux(Some(linux));
    features
}

/// The `-info` answer, protobuf-encoded.
pub fn runtime_info() -> Vec<u8> {
    let features =
        serde_json::to_vec(&features()).expect("the features document serializes to JSON");
    let info = RuntimeInfo {
        name: RUNTIME_TYPE.into(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        }),
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.into(),
            value: features,
            ..Default::default()
        }),
        ..Default::default()
    };
    info.write_to_bytes().expect("RuntimeInfo encodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_carries_the_features_containerd_reads() {
        let info = RuntimeInfo::parse_from_bytes(&runtime_info()).unwrap();
        assert_eq!(info.name, RUNTIME_TYPE);
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let json: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
        let options = json["mountOptions"].as_array().unwrap();
        // containerd's CRI turns recursive read-only mounts on for a handler with `rro`.
        assert!(options.iter().any(|o| o == "rro"));
        // A guest mount cannot propagate to the host: never claim bidirectional propagation.
        assert!(!options.iter().any(|o| o == "rshared" || o == "shared"));
        assert_eq!(json["linux"]["seccomp"]["enabled"], true);
        assert_eq!(json["linux"]["mountExtensions"]["idmap"]["enabled"], false);
        assert!(!json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "user"));
    }
}
