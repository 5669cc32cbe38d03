//! What serves a shoji pod on the host, read from `/proc` while two CRI pods run (QEMU/TCG
//! here, Cloud Hypervisor with `SHOJI_TEST_HYPERVISOR=clh` on a KVM node; containerd 1.7 and
//! 2.x): the VMM and the vsock back-end run as their sandbox's own
//! non-root uid with no capabilities, no_new_privs and a seccomp filter, in mount and network
//! namespaces of their own whose root holds neither the host's secrets nor the shim's files;
//! virtiofsd is filtered and in its own mount namespace; the sandbox directory is the root's
//! alone; and the uid goes back to the node's range when the pod is removed. And what
//! virtiofsd refuses a privileged container: device nodes on the host's filesystems.
use std::{os::unix::fs::PermissionsExt, path::Path};

use serde_json::Value;
use shoji_tests::{
    backend,
    containerd::Version,
    cri,
    image::BUSYBOX,
    pods::{check, on, pod_security, security, sh, sh_ok, Pods},
    scenario::{self, Env, ShojiRuntime},
};

type Result<T = ()> = scenario::Result<T>;

/// `Key:` of /proc/<pid>/status, whitespace-separated.
fn status(pid: u32, key: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().map(String::from).collect())
        .ok_or_else(|| format!("no {key} in /proc/{pid}/status").into())
}

fn ns(pid: impl std::fmt::Display, kind: &str) -> Result<std::path::PathBuf> {
    Ok(std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))?)
}

/// The recorded pid of `name` in the sandbox's state, and the state.
fn recorded(state: &Value, name: &str) -> Result<u32> {
    state["pids"]
        .as_array()
        .and_then(|pids| pids.iter().find(|p| p["name"] == name))
        .and_then(|p| p["pid"].as_u64())
        .map(|p| p as u32)
        .ok_or_else(|| format!("no {name} in the sandbox state: {state}").into())
}

/// What a process's root (`root`, at `at` inside it) holds: its files, symlinks and the
/// directories in `whole` (bound as a whole), not the directories that only lead to them.
fn leaves(root: &Path, at: &Path, whole: &[&Path], out: &mut Vec<std::path::PathBuf>) -> Result {
    for e in std::fs::read_dir(root.join(at.strip_prefix("/")?))? {
        let e = e?;
        let path = at.join(e.file_name());
        let kind = e.file_type()?;
        if kind.is_dir() && !whole.contains(&path.as_path()) {
            leaves(root, &path, whole, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The jail of one sandbox's VMM and vsock back-end; returns their uid.
fn check_jailed(dir: &Path, other: &Path) -> Result<u32> {
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    check(mode == 0o700, || {
        format!("{} has mode {mode:o}", dir.display())
    })?;
    // Its files and the VMM's sockets: their owner's alone.
    for d in [dir.to_path_buf(), dir.join("vmm")] {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let meta = e.metadata()?;
            let mode = meta.permissions().mode() & 0o777;
            check(meta.is_dir() || mode & 0o077 == 0, || {
                format!("{} has mode {mode:o}", e.path().display())
            })?;
        }
    }
    let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
    let uid = state["jail"]["uid"]
        .as_u64()
        .ok_or_else(|| format!("no jail uid in the sandbox state: {state}"))?;
    // QEMU's vsock back-end is a process of its own; CH serves vsock itself.
    let vmm_name = backend::vmm_name();
    let jailed: &[&str] = match vmm_name {
        "qemu" => &["qemu", "vhost-device-vsock"],
        _ => &[vmm_name],
    };
    for &name in jailed {
        let pid = recorded(&state, name)?;
        let ids = status(pid, "Uid")?;
        check(
            ids.iter().all(|u| *u == uid.to_string()) && uid != 0,
            || format!("{name} runs as uids {ids:?}, not the sandbox's {uid}"),
        )?;
        let gids = status(pid, "Gid")?;
        check(gids.iter().all(|g| *g == uid.to_string()), || {
            format!("{name} runs as gids {gids:?}")
        })?;
        for (key, want) in [
            ("CapEff", "0000000000000000"),
            ("CapPrm", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
        ] {
            let got = status(pid, key)?;
            check(got == [want], || {
                format!("{name}: {key} is {got:?}, want {want}")
            })?;
        }
        for kind in ["mnt", "net"] {
            check(ns(pid, kind)? != ns("self", kind)?, || {
                format!("{name} shares the host's {kind} namespace")
            })?;
        }
        // Its root holds exactly what it needs: the system's binaries and libraries, its
        // own binary, the boot images, its devices, console and back-ends' sockets, the VMM
        // directory; nothing of the host's or the shim's.
        let root = Path::new("/proc").join(pid.to_string()).join("root");
        let vmm = dir.join("vmm");
        let mut seen = Vec::new();
        leaves(&root, Path::new("/"), &[Path::new("/usr"), &vmm], &mut seen)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(std::path::PathBuf::from)
        };
        let mut expected: Vec<std::path::PathBuf> = [
            "/usr",
            "/etc/ld.so.cache",
            "/bin",
            "/lib",
            "/lib64",
            "/sbin",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .chain([vmm.clone(), std::fs::read_link(format!("/proc/{pid}/exe"))?])
        .collect();
        if name == vmm_name {
            expected.extend(["/dev/urandom", "/dev/kvm"].map(std::path::PathBuf::from));
            expected.extend([dir.join("console.log"), dir.join("virtiofsd.sock")]);
            // The boot images: on QEMU's command line; CH gets them through its API.
            expected.extend(after("-kernel"));
            expected.extend(after("-initrd"));
            expected.extend([dir.join("clh.log"), dir.join("clh-events.json")]);
            expected.extend(
                seen.iter()
                    .filter(|p| {
                        name != "qemu"
                            && p.file_name()
                                .is_some_and(|f| f == "vmlinux" || f == "initramfs.img")
                    })
                    .cloned()
                    .collect::<Vec<_>>(),
            );
        }
        let extra: Vec<_> = seen.iter().filter(|p| !expected.contains(p)).collect();
        check(extra.is_empty(), || {
            format!("{name} sees more than it needs: {extra:?} (all: {seen:?})")
        })?;
        for gone in [
            dir.join("state.json"),
            dir.join("shared"),
            other.to_path_buf(),
        ] {
            check(!seen.iter().any(|p| p.starts_with(&gone)), || {
                format!("{name} sees {}", gone.display())
            })?;
        }
        check(
            root.join(vmm.strip_prefix("/")?)
                .join("vsock.sock")
                .exists(),
            || format!("{name} does not see its VMM directory"),
        )?;
        // And it cannot write what it was given to read.
        let usr = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        check(
            usr.lines()
                .any(|l| l.split_whitespace().nth(4) == Some("/usr") && l.contains(" ro,")),
            || format!("{name}'s /usr is not read-only:\n{usr}"),
        )?;
    }
    // virtiofsd serves files of every owner (root), confined by its own sandbox.
    let virtiofsd = recorded(&state, "virtiofsd")?;
    let server = shoji::procfs::with_children(&[virtiofsd]);
    check(
        server
            .iter()
            .any(|p| status(*p, "Seccomp").is_ok_and(|s| s == ["2"])),
        || "no virtiofsd process has a seccomp filter".into(),
    )?;
    check(ns(virtiofsd, "mnt")? != ns("self", "mnt")?, || {
        "virtiofsd shares the host's mount namespace".into()
    })?;
    Ok(uid as u32)
}

async fn jailed(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let run_dir = env.runtime.run_dirs[0].clone();
    let claim = |uid: u32| run_dir.join(".uids").join(uid.to_string());
    let mut uids = Vec::new();
    Pods::scenario(env, async |pods: &mut Pods| {
        let mut sandboxes = Vec::new();
        for name in ["jail-a", "jail-b"] {
            let cfg = cri::pod_config(name, "shoji-test", work.path());
            let pod = pods.run(&cfg).await?;
            let app = cri::container_config("app", BUSYBOX, &["sleep", "1000"]);
            pods.start(&pod, &cfg, &app).await?;
            sandboxes.push(run_dir.join(&pod));
        }
        uids.push(check_jailed(&sandboxes[0], &sandboxes[1])?);
        uids.push(check_jailed(&sandboxes[1], &sandboxes[0])?);
        check(uids[0] != uids[1], || {
            format!("two sandboxes share uid {}", uids[0])
        })?;
        for uid in &uids {
            check(claim(*uid).is_file(), || {
                format!("uid {uid} is not claimed")
            })?;
        }
        Ok(())
    })
    .await?;
    // The scenario removed the pods: their uids are free again.
    for uid in uids {
        check(!claim(uid).exists(), || {
            format!("uid {uid} is still claimed")
        })?;
    }
    Ok(())
}

#[tokio::test]
async fn jailed_on_containerd_1_7() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V1_7, 177, jailed).await
}

#[tokio::test]
async fn jailed_on_containerd_2() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V2, 178, jailed).await
}

/// A privileged container may make device nodes in the guest (its own /dev) but not on a
/// host filesystem through virtio-fs: virtiofsd runs without CAP_MKNOD (runc's container
/// would make the node on the host: a documented difference, shoji's wall).
async fn no_devices_on_the_host(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let vol = work.path().join("vol");
    std::fs::create_dir(&vol)?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let mut cfg = cri::pod_config("mknod", "shoji-test", work.path());
        pod_security(&mut cfg).privileged = true;
        let pod = pods.run(&cfg).await?;
        let mut admin = cri::container_config("admin", BUSYBOX, &["sleep", "1000"]);
        security(&mut admin).privileged = true;
        admin.mounts.push(cri::host_mount("/vol", &vol, false));
        let admin = pods.start(&pod, &cfg, &admin).await?;
        sh_ok(
            &cri,
            &admin,
            "mknod /dev/guest-null c 1 3 && echo x > /dev/guest-null",
        )
        .await?;
        for (kind, args) in [("character", "c 1 3"), ("block", "b 7 0")] {
            let out = sh(&cri, &admin, &format!("mknod /vol/{kind} {args} 2>&1")).await?;
            check(
                out.exit_code != 0 && out.stdout.contains("Operation not permitted"),
                || format!("a {kind} device was made on a host volume: {out:?}"),
            )?;
            check(!vol.join(kind).exists(), || {
                format!("a {kind} device node is on the host")
            })?;
        }
        // Files are still written there.
        sh_ok(&cri, &admin, "echo data > /vol/file").await?;
        check(vol.join("file").is_file(), || {
            "the volume is not writable".into()
        })
    })
    .await
}

#[tokio::test]
async fn a_privileged_container_makes_no_device_node_on_the_host() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V2, 179, no_devices_on_the_host).await
}
