//! Security contexts and mount semantics that Kubernetes' CRI suite (critest) checks, run side by
//! side on runc and on shoji (containerd 1.7 and 2.x) with the same expectations: seccomp
//! (RuntimeDefault, Unconfined, Localhost profiles, in the init and in execs), no_new_privs both
//! ways with a set-uid-root program, a read-only volume whose nested mounts stay writable (and a
//! recursively read-only one where the handler advertises it), and host-to-container mount
//! propagation. The one documented difference: shoji refuses bidirectional propagation (a guest
//! mount cannot reach the host), checked on shoji alone.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use shoji_tests::{
    containerd::Version,
    cri::{self, api},
    critest_images,
    image::BUSYBOX,
    pods::{self, check, on, pod_security, security, sh, sh_ok, Pods},
    scenario::{self, Env, ShojiRuntime},
    side_by_side,
};

type Result<T = ()> = scenario::Result<T>;

fn profile(kind: api::security_profile::ProfileType, path: &Path) -> api::SecurityProfile {
    api::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: path.display().to_string(),
    }
}

/// A Localhost seccomp profile that fails `syscalls` with EPERM and allows the rest.
fn deny_profile(dir: &Path, name: &str, syscalls: &[&str]) -> Result<PathBuf> {
    let path = dir.join(name);
    let json = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{ "names": syscalls, "action": "SCMP_ACT_ERRNO" }],
    });
    std::fs::write(&path, serde_json::to_vec(&json)?)?;
    Ok(path)
}

/// The `Seccomp:` mode of the container's init (its own PID namespace: /proc/1) and of an exec.
async fn seccomp_modes(cri: &cri::Cri, id: &str) -> Result<String> {
    sh_ok(
        cri,
        id,
        "for f in /proc/1/status /proc/self/status; do grep '^Seccomp:' $f | tr -d '\\t'; done",
    )
    .await
}

async fn seccomp(env: &Env) -> Result {
    use api::security_profile::ProfileType;
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let chmod = deny_profile(work.path(), "block-chmod.json", &["chmod", "fchmodat"])?;
    let hostname = deny_profile(work.path(), "block-hostname.json", &["sethostname"])?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("seccomp", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let container = |name: &str, p: Option<api::SecurityProfile>, caps: &[&str]| {
            let mut c = cri::container_config(name, BUSYBOX, &["sleep", "1000"]);
            let s = security(&mut c);
            s.seccomp = p;
            s.capabilities = Some(api::Capability {
                add_capabilities: caps.iter().map(|c| c.to_string()).collect(),
                ..Default::default()
            });
            c
        };
        let default = container(
            "default",
            Some(profile(ProfileType::RuntimeDefault, Path::new(""))),
            &[],
        );
        let default = pods.start(&pod, &cfg, &default).await?;
        let got = seccomp_modes(&cri, &default).await?;
        check(got == "Seccomp:2\nSeccomp:2", || {
            format!("RuntimeDefault: init and exec show {got:?}, want filter mode 2")
        })?;
        // containerd's default profile refuses unshare without CAP_SYS_ADMIN.
        let out = sh(&cri, &default, "unshare -U true").await?;
        check(out.exit_code != 0, || {
            format!("RuntimeDefault allowed unshare: {out:?}")
        })?;

        for (name, p) in [
            (
                "unconfined",
                Some(profile(ProfileType::Unconfined, Path::new(""))),
            ),
            ("nil", None),
        ] {
            let id = pods.start(&pod, &cfg, &container(name, p, &[])).await?;
            let got = seccomp_modes(&cri, &id).await?;
            check(got == "Seccomp:0\nSeccomp:0", || {
                format!("{name} profile: init and exec show {got:?}, want 0")
            })?;
        }

        let id = container("chmod", Some(profile(ProfileType::Localhost, &chmod)), &[]);
        let id = pods.start(&pod, &cfg, &id).await?;
        let out = cri
            .exec_sync(&id, &["chmod", "400", "/"], pods::EXEC)
            .await?;
        check(
            out.exit_code != 0 && out.stderr.contains("Operation not permitted"),
            || format!("a Localhost profile denying chmod let it run: {out:?}"),
        )?;

        // SYS_ADMIN allows sethostname; a profile still refuses it, Unconfined does not.
        let blocked = container(
            "blocked",
            Some(profile(ProfileType::Localhost, &hostname)),
            &["SYS_ADMIN"],
        );
        let blocked = pods.start(&pod, &cfg, &blocked).await?;
        let out = sh(&cri, &blocked, "hostname shoji-blocked").await?;
        check(out.exit_code != 0, || {
            format!("a profile denying sethostname let it run: {out:?}")
        })?;
        let free = container(
            "free",
            Some(profile(ProfileType::Unconfined, Path::new(""))),
            &["SYS_ADMIN"],
        );
        let free = pods.start(&pod, &cfg, &free).await?;
        sh_ok(&cri, &free, "hostname shoji-free && hostname").await?;
        Ok(())
    })
    .await
}

/// critest's set-uid-root program (`tests/images/nonewprivs.c`: prints its effective uid)
/// at `dir/nonewprivs`.
fn setuid_program(dir: &Path) -> Result<()> {
    let bin = dir.join("nonewprivs");
    critest_images::static_program("nonewprivs", dir)?;
    std::os::unix::fs::chown(&bin, Some(0), Some(0))?;
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o4755))?;
    Ok(())
}

/// uid 1000 runs a set-uid-root program: euid 0 unless no_new_privs is set.
async fn no_new_privs(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let bin = tempfile::Builder::new().prefix("shoji-suid-").tempdir()?;
    setuid_program(bin.path())?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("nnp", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        for (nnp, want) in [(false, "Effective uid: 0"), (true, "Effective uid: 1000")] {
            let mut c = cri::container_config(&format!("nnp-{nnp}"), BUSYBOX, &["sleep", "1000"]);
            c.mounts.push(cri::host_mount("/suid", bin.path(), true));
            let s = security(&mut c);
            s.no_new_privs = nnp;
            s.run_as_user = Some(api::Int64Value { value: 1000 });
            let id = pods.start(&pod, &cfg, &c).await?;
            let got = sh_ok(&cri, &id, "/suid/nonewprivs").await?;
            check(got == want, || {
                format!("no_new_privs {nnp}: {got:?}, want {want:?}")
            })?;
        }
        Ok(())
    })
    .await
}

/// A host directory with a tmpfs mounted at `tmpfs/` below it, unmounted when dropped.
struct NestedMount {
    dir: tempfile::TempDir,
}

impl NestedMount {
    fn new() -> Result<NestedMount> {
        let dir = tempfile::Builder::new().prefix("shoji-nested-").tempdir()?;
        std::fs::create_dir(dir.path().join("tmpfs"))?;
        mount(
            Some("tmpfs"),
            &dir.path().join("tmpfs"),
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )?;
        Ok(NestedMount { dir })
    }

    /// Unmounts the tmpfs and removes its mount point, as critest's cleanup does while the
    /// pod still runs.
    fn remove(&self) -> Result<()> {
        let tmpfs = self.dir.path().join("tmpfs");
        umount2(&tmpfs, MntFlags::empty())?;
        std::fs::remove_dir(&tmpfs).map_err(|e| format!("rmdir {}: {e}", tmpfs.display()))?;
        Ok(())
    }
}

impl Drop for NestedMount {
    fn drop(&mut self) {
        let _ = umount2(&self.dir.path().join("tmpfs"), MntFlags::MNT_DETACH);
    }
}

/// Whether `handler` advertises recursive read-only mounts (containerd 2.x asks the runtime).
async fn supports_rro(cri: &cri::Cri, handler: &str) -> Result<bool> {
    Ok(cri.runtime_handlers().await?.iter().any(|h| {
        h.name == handler
            && h.features
                .as_ref()
                .is_some_and(|f| f.recursive_read_only_mounts)
    }))
}

/// `ro` keeps the mounts below a volume writable (runc's non-recursive read-only bind);
/// `rro`, where advertised, makes them read-only too. The host can remove the nested mount
/// point while the pod runs: the pod's copy of it is not in the host's mount table.
async fn read_only_volumes(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let nested = NestedMount::new()?;
    let handler = env.runtime.cri_handler.clone();
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("readonly", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let mut c = cri::container_config("ro", BUSYBOX, &["sleep", "1000"]);
        c.mounts
            .push(cri::host_mount("/mnt", nested.dir.path(), true));
        let id = pods.start(&pod, &cfg, &c).await?;
        sh_ok(&cri, &id, "touch /mnt/tmpfs/file").await?;
        let out = sh(&cri, &id, "touch /mnt/file 2>&1").await?;
        check(
            out.exit_code != 0 && out.stdout.contains("Read-only file system"),
            || format!("the read-only volume itself was writable: {out:?}"),
        )?;

        // containerd 2.x asks only runc-type runtimes for their features, so only runc
        // gets here; shoji implements `rro` (sharefs unit tests) but cannot advertise it.
        if supports_rro(&cri, &handler).await? {
            let mut c = cri::container_config("rro", BUSYBOX, &["sleep", "1000"]);
            let mut m = cri::host_mount("/mnt", nested.dir.path(), true);
            m.recursive_read_only = true;
            c.mounts.push(m);
            let id = pods.start(&pod, &cfg, &c).await?;
            let out = sh(&cri, &id, "touch /mnt/tmpfs/rro 2>&1").await?;
            check(
                out.exit_code != 0 && out.stdout.contains("Read-only file system"),
                || {
                    format!(
                        "a nested mount of a recursively read-only volume was writable: {out:?}"
                    )
                },
            )?;
        }
        nested.remove()
    })
    .await
}

/// A host directory made a shared mount point (as kubelet's mount propagation needs), with
/// a source directory holding `flag` to mount below it later; unmounted when dropped.
struct SharedVolume {
    dir: tempfile::TempDir,
}

impl SharedVolume {
    fn new() -> Result<SharedVolume> {
        let dir = tempfile::Builder::new().prefix("shoji-prop-").tempdir()?;
        let (vol, src) = (dir.path().join("vol"), dir.path().join("src"));
        std::fs::create_dir_all(vol.join("later"))?;
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("flag"), "from the host\n")?;
        let none = None::<&str>;
        mount(
            Some(&vol),
            &vol,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )?;
        mount(none, &vol, none, MsFlags::MS_SHARED | MsFlags::MS_REC, none)?;
        Ok(SharedVolume { dir })
    }

    fn vol(&self) -> PathBuf {
        self.dir.path().join("vol")
    }

    /// Mounts the source at `vol/later` on the host, after the container started.
    fn mount_later(&self) -> Result<()> {
        let none = None::<&str>;
        mount(
            Some(&self.dir.path().join("src")),
            &self.vol().join("later"),
            none,
            MsFlags::MS_BIND,
            none,
        )?;
        Ok(())
    }
}

impl Drop for SharedVolume {
    fn drop(&mut self) {
        let _ = umount2(&self.vol().join("later"), MntFlags::MNT_DETACH);
        let _ = umount2(&self.vol(), MntFlags::MNT_DETACH);
    }
}

fn propagating(name: &str, vol: &Path, p: api::MountPropagation) -> api::ContainerConfig {
    let mut c = cri::container_config(name, BUSYBOX, &["sleep", "1000"]);
    let mut m = cri::host_mount("/vol", vol, false);
    m.propagation = p as i32;
    c.mounts.push(m);
    c
}

/// HostToContainer: a mount the host adds under the volume after the start shows in the
/// container. Private: it does not, though the volume's host source is a shared mount.
async fn host_to_container_propagation(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let shared = SharedVolume::new()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("propagation", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let slave = propagating(
            "slave",
            &shared.vol(),
            api::MountPropagation::PropagationHostToContainer,
        );
        let slave = pods.start(&pod, &cfg, &slave).await?;
        let private = propagating(
            "private",
            &shared.vol(),
            api::MountPropagation::PropagationPrivate,
        );
        let private = pods.start(&pod, &cfg, &private).await?;
        shared.mount_later()?;
        // A guest sees a new host mount at its next lookup of the directory (≤ ~1.25 s).
        let mut got = String::new();
        for _ in 0..20 {
            got = sh_ok(&cri, &slave, "cat /vol/later/flag 2>/dev/null || true").await?;
            if !got.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        check(got == "from the host", || {
            format!("HostToContainer: the host's later mount did not show: {got:?}")
        })?;
        let got = sh_ok(&cri, &private, "ls -A /vol/later").await?;
        check(got.is_empty(), || {
            format!("Private: the host's later mount showed: {got:?}")
        })
    })
    .await
}

/// A device cgroup per container, as runc makes one: any container may make a device node
/// (CAP_MKNOD; on its /dev tmpfs: shoji's rootfs is virtio-fs, where the host makes no device
/// nodes), but an unprivileged one opens only the devices it was given (/dev/null's numbers),
/// not /dev/kmsg's; a privileged container opens any.
async fn device_cgroup(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let mut cfg = cri::pod_config("devices", "shoji-test", work.path());
        pod_security(&mut cfg).privileged = true;
        let pod = pods.run(&cfg).await?;
        let kmsg = "mknod /dev/k c 1 11 && exec 3< /dev/k && echo opened";
        let plain = cri::container_config("plain", BUSYBOX, &["sleep", "1000"]);
        let plain = pods.start(&pod, &cfg, &plain).await?;
        let out = sh(&cri, &plain, &format!("{{ {kmsg}; }} 2>&1")).await?;
        check(
            out.exit_code != 0 && out.stdout.contains("Operation not permitted"),
            || format!("an unprivileged container opened /dev/kmsg's device: {out:?}"),
        )?;
        sh_ok(&cri, &plain, "mknod /dev/n c 1 3 && echo x > /dev/n").await?;
        let mut admin = cri::container_config("admin", BUSYBOX, &["sleep", "1000"]);
        security(&mut admin).privileged = true;
        let admin = pods.start(&pod, &cfg, &admin).await?;
        sh_ok(&cri, &admin, kmsg).await?;
        Ok(())
    })
    .await
}

side_by_side!(seccomp, 160);
side_by_side!(no_new_privs, 164);
side_by_side!(read_only_volumes, 168);
side_by_side!(host_to_container_propagation, 172);
side_by_side!(device_cgroup, 192);

/// Bidirectional propagation cannot work across a VM boundary (a mount made in the guest
/// cannot appear on the host): shoji refuses it at create, naming it, instead of silently
/// giving one-way propagation.
#[tokio::test]
async fn shoji_refuses_bidirectional_propagation() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V2, 176, async |env: &Env| {
        let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
        let shared = SharedVolume::new()?;
        Pods::scenario(env, async |pods: &mut Pods| {
            let cfg = cri::pod_config("bidirectional", "shoji-test", work.path());
            let pod = pods.run(&cfg).await?;
            let c = propagating(
                "both",
                &shared.vol(),
                api::MountPropagation::PropagationBidirectional,
            );
            match pods.start(&pod, &cfg, &c).await {
                Ok(id) => Err(format!("a bidirectional mount was accepted: {id}").into()),
                Err(e) => check(e.to_string().contains("propagation"), || {
                    format!("the refusal does not name the propagation: {e}")
                }),
            }
        })
        .await
    })
    .await
}
