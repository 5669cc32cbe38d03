//! Unit tests of `guest_spec`: ids, executables, the rewritten spec, refused documents, sysctls.
use super::*;
use std::os::unix::fs::symlink;

#[test]
fn ids() {
    for good in ["a", "c1", "0abc_d.e-f", &"x".repeat(128)] {
        assert!(validate_id("container", good).is_ok(), "{good}");
    }
    for bad in ["", "-a", ".a", "a/b", "a b", "../x", "é", &"x".repeat(129)] {
        assert!(validate_id("container", bad).is_err(), "{bad}");
    }
}

fn rootfs() -> PathBuf {
    let r = std::env::temp_dir().join(format!(
        "shoji-agent-spec-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&r);
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::write(r.join("bin/busybox"), b"").unwrap();
    std::fs::set_permissions(
        r.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(r.join("bin/data"), b"").unwrap();
    // An absolute link must resolve inside the rootfs, not on the agent's /.
    symlink("/bin/busybox", r.join("bin/sh")).unwrap();
    symlink("../../bin/busybox", r.join("usr/bin/env")).unwrap();
    symlink("loop", r.join("bin/loop")).unwrap();
    r
}

fn process(args: &[&str], env: &[&str]) -> Process {
    let json =
        serde_json::json!({"args": args, "env": env, "cwd": "/", "user": {"uid": 0, "gid": 0}});
    exec_process(json.to_string().as_bytes(), false).unwrap()
}

#[test]
fn executables_resolve_in_the_rootfs() {
    let r = rootfs();
    assert!(check_executable(&r, &process(&["sh"], &["PATH=/bin"])).is_ok());
    assert!(check_executable(&r, &process(&["env"], &[])).is_ok());
    assert!(check_executable(&r, &process(&["/bin/sh", "-c", "true"], &[])).is_ok());
    assert!(check_executable(&r, &process(&["./bin/sh"], &[])).is_ok());
    assert_eq!(
        check_executable(&r, &process(&["nosuch"], &["PATH=/bin:/usr/bin"]))
            .unwrap_err()
            .to_string(),
        "exec: \"nosuch\": executable file not found in $PATH"
    );
    let e = check_executable(&r, &process(&["/bin/data"], &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("permission denied"), "{e}");
    assert!(check_executable(&r, &process(&["/bin/loop"], &[])).is_err());
    assert!(check_executable(&r, &process(&["/bin"], &[])).is_err());
    std::fs::remove_dir_all(&r).unwrap();
}

#[test]
fn container_spec_is_rewritten() {
    let json = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 1000, "gid": 1000}, "terminal": true,
            "apparmorProfile": "cri-containerd.apparmor.d", "selinuxLabel": "system_u:system_r:container_t:s0"},
        "root": {"path": "/host/rootfs", "readonly": true},
        "hooks": {"prestart": [{"path": "/bin/true"}]},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"},
                {"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "mount", "path": "/proc/1/ns/mnt"}],
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
            "cgroupsPath": "kubepods-x"
        }
    });
    let json = json.to_string();
    let mut guest = container_spec(json.as_bytes(), "c1", Path::new("/run/r"), false).unwrap();
    assert_eq!(guest.pod_namespaces, vec![LinuxNamespaceType::Ipc]);
    guest.join_pod(42);
    let GuestSpec {
        spec, net_sysctls, ..
    } = guest;
    assert_eq!(
        net_sysctls,
        vec![("net.ipv4.ip_unprivileged_port_start".into(), "0".into())]
    );
    let root = spec.root().as_ref().unwrap();
    assert_eq!(
        (root.path().as_path(), root.readonly()),
        (Path::new("/run/r"), Some(true))
    );
    assert!(spec.hooks().is_none());
    let process = spec.process().as_ref().unwrap();
    assert!(process.apparmor_profile().is_none() && process.selinux_label().is_none());
    let linux = spec.linux().as_ref().unwrap();
    let ns = linux.namespaces().as_ref().unwrap();
    let paths: Vec<_> = ns.iter().map(|n| (n.typ(), n.path().clone())).collect();
    assert_eq!(
        paths,
        vec![
            (LinuxNamespaceType::Pid, None),
            (LinuxNamespaceType::Ipc, Some("/proc/42/ns/ipc".into())),
            (LinuxNamespaceType::Mount, None),
            (LinuxNamespaceType::Cgroup, None),
        ]
    );
    let sysctl = linux.sysctl().as_ref().unwrap();
    assert_eq!(
        sysctl.keys().collect::<Vec<_>>(),
        vec!["kernel.shm_rmid_forced"]
    );
    assert_eq!(
        linux.cgroups_path().as_deref(),
        Some(Path::new("/shoji/c1"))
    );
    let p = spec.process().as_ref().unwrap();
    assert_eq!((p.terminal(), p.user().uid()), (Some(false), 1000));
    assert!(p.capabilities().is_none(), "no capabilities may be added");
}

#[test]
fn recursive_rootfs_propagation_names_become_plain_ones() {
    let mut linux = libcontainer::oci_spec::runtime::Linux::default();
    for (given, want) in [
        ("rslave", "slave"),
        ("rshared", "shared"),
        ("rprivate", "private"),
        ("runbindable", "unbindable"),
        ("slave", "slave"),
        ("rbogus", "rbogus"),
    ] {
        linux.set_rootfs_propagation(Some(given.into()));
        plain_rootfs_propagation(&mut linux);
        assert_eq!(linux.rootfs_propagation().as_deref(), Some(want), "{given}");
    }
}

#[test]
fn bad_documents_are_named() {
    assert!(matches!(
        container_spec(b"{", "c", Path::new("/r"), false),
        Err(SpecError::BadJson { .. })
    ));
    assert_eq!(
        container_spec(b"{\"ociVersion\":\"1\"}", "c", Path::new("/r"), false).unwrap_err(),
        SpecError::Missing("process")
    );
    assert_eq!(
        exec_process(br#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#, false).unwrap_err(),
        SpecError::NoArgs
    );
    let huge = serde_json::json!({"args": ["sh", "x".repeat(1 << 20)], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let e = exec_process(huge.to_string().as_bytes(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 131071 bytes per string"), "{e}");
    let spec = |name: &str, value: &str| {
        serde_json::json!({"ociVersion": "1", "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "linux": {"sysctl": {name: value}}})
        .to_string()
    };
    for (name, value) in [
        ("net.a..b", "1"),
        ("net/../../x", "1"),
        ("net.core.somaxconn", "1\n2"),
    ] {
        let e = container_spec(spec(name, value).as_bytes(), "c", Path::new("/r"), false);
        assert!(
            matches!(e, Err(SpecError::BadSysctl { .. })),
            "{name:?}: {e:?}"
        );
    }
}

#[test]
fn pod_sysctls_are_namespaced_ones() {
    for (name, scope) in [
        ("net.ipv4.ip_unprivileged_port_start", SysctlScope::Network),
        ("net/ipv4/ping_group_range", SysctlScope::Network),
        ("kernel.shm_rmid_forced", SysctlScope::Ipc),
        ("fs.mqueue.msg_max", SysctlScope::Ipc),
    ] {
        assert_eq!(sysctl_scope(name, "0").unwrap(), scope, "{name}");
    }
    for name in [
        "vm.overcommit_memory",
        "kernel.panic",
        "kernel.shm",
        "",
        "net",
    ] {
        assert!(sysctl_scope(name, "0").is_err(), "{name:?}");
    }
}
