//! `hack/install.sh` on the containerd configurations nodes really have, on containerd 1.6
//! (Debian's), 1.7 and 2.x: Debian's packaged file, `containerd config default`, a
//! kubeadm-style one (`SystemdCgroup = true`, its own sandbox image), one holding the handler
//! block of an older install and, on 2.x, none at all. For each: install into a scratch root
//! (twice: the second run changes nothing); containerd's merged configuration equals the
//! original's but for the shoji handlers; a private containerd runs the result (with only the
//! harness's isolation set over it, see `containerd::Options::operator_config`), its CRI plugin
//! loads, a runc pod and a shoji pod run through CRI (the pause image being the configuration's
//! sandbox image), `shoji check` sees both handlers; then `--uninstall` leaves the root exactly
//! as it was.
//!
//! The upgrade test installs build A, starts a pod, installs build B under it (other binaries,
//! kernel and initramfs), and checks that the pod keeps running on A's shim and boot images
//! while a new pod gets B's, that the pod stops cleanly, that A's boot images go only then, and
//! that a rollback to A keeps B's images while a pod uses them.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use shoji_tests::{
    bins,
    cni::Network,
    containerd::{Containerd, Options, Version, SHOJI_RUNTIME},
    cri,
    image::BUSYBOX,
    pods::{sh_ok, Pods},
    scenario::{self, check, Env, Runtime, CRI_NAMESPACE},
};
use tokio::process::Command;
use toml::{Table, Value};

type Result<T = ()> = scenario::Result<T>;

/// One containerd version's configurations, in turn (each boots one VM).
const TEST_LIMIT: Duration = Duration::from_secs(900);
/// One install.sh run (it runs `containerd config dump` twice).
const INSTALL: Duration = Duration::from_secs(120);
/// The handler the pods use: QEMU runs everywhere (the `shoji` handler wants Cloud Hypervisor).
const HANDLER: &str = "shoji-qemu";

/// The configuration a node has before shoji is installed.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// No config.toml: containerd's defaults.
    Nothing,
    /// Debian's packaged /etc/containerd/config.toml.
    Packaged,
    /// `containerd config default` of the version.
    Default,
    /// What a kubeadm guide writes: systemd cgroups for runc, its own pause image.
    Kubeadm,
    /// Debian's file with the handler block an older hack/install.sh appended (for 1.x); it
    /// is the install's, so the original to restore is Debian's file.
    OlderInstall,
}

impl Start {
    /// The starts of containerd `version`. No config at all only for 2.x: 1.x writes the same
    /// block as for Debian's file, 2.x creates a config that imports the drop-in.
    fn of(version: Version) -> &'static [Start] {
        match version {
            Version::V2 => &[
                Start::Nothing,
                Start::Packaged,
                Start::Default,
                Start::Kubeadm,
                Start::OlderInstall,
            ],
            _ => &[
                Start::Packaged,
                Start::Default,
                Start::Kubeadm,
                Start::OlderInstall,
            ],
        }
    }
}

const KUBEADM_V2: &str = r#"version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.example.com/k8s/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            SystemdCgroup = true
"#;

const KUBEADM_V3: &str = r#"version = 3

[plugins]
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = 'registry.example.com/k8s/pause:3.10'
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = true
"#;

/// The block hack/install.sh appended to a 1.x config.toml before the drop-ins and backups
/// (`@PREFIX@`: the root it installed into).
const OLDER_BLOCK: &str = r#"# BEGIN shoji handlers (hack/install.sh)
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.shoji]
  runtime_type = "io.containerd.shoji.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.shoji.options]
  ConfigPath = "@PREFIX@/etc/shoji/clh.toml"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.shoji-qemu]
  runtime_type = "io.containerd.shoji.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.shoji-qemu.options]
  ConfigPath = "@PREFIX@/etc/shoji/qemu.toml"
# END shoji handlers"#;

/// Runs `cmd`, killed when it outlives `limit`; its output, whatever its exit status.
async fn output(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let what = format!("{:?}", cmd.as_std());
    let out = tokio::time::timeout(limit, cmd.kill_on_drop(true).output())
        .await
        .map_err(|_| format!("{what}: no exit within {limit:?}"))??;
    Ok(out)
}

/// [`output`] of a command that must succeed.
async fn succeeds(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let out = output(cmd, limit).await?;
    check(out.status.success(), || {
        let stderr = String::from_utf8_lossy(&out.stderr);
        format!("{:?} failed ({}): {stderr}", cmd.as_std(), out.status)
    })?;
    Ok(out)
}

/// Runs `hack/install.sh ARGS` (with `env` added); returns its stderr, or fails with it.
async fn install(args: &[&str], env: &[(&str, &Path)]) -> Result<String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hack/install.sh");
    let mut cmd = Command::new(script);
    cmd.args(args).envs(env.iter().copied());
    let out = succeeds(&mut cmd, INSTALL).await?;
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The built shim and CLI without their debug info (a tenth of the size: installs copy and
/// checksum them several times per test), in a directory of their own.
async fn stripped_bins() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for name in ["containerd-shim-shoji-v2", "shoji"] {
        let mut strip = Command::new("strip");
        strip
            .arg("-o")
            .arg(dir.path().join(name))
            .arg(bins::binary(name));
        succeeds(&mut strip, Duration::from_secs(60)).await?;
    }
    Ok(dir)
}

/// Every path under `root` with its mode, and each file's content.
fn tree(root: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
    fn walk(d: &Path, out: &mut Vec<(PathBuf, u32, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                out.push((p.clone(), mode, Vec::new()));
                walk(&p, out);
            } else if meta.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.push((p, mode, target.into_os_string().into_encoded_bytes()));
            } else {
                out.push((p.clone(), mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort();
    out
}

fn describe(t: &[(PathBuf, u32, Vec<u8>)]) -> Vec<String> {
    t.iter()
        .map(|(p, mode, data)| format!("{} {mode:o} {} bytes", p.display(), data.len()))
        .collect()
}

/// `containerd --config CONFIG config dump` of `version`, parsed.
async fn dump(version: Version, config: &Path) -> Result<Table> {
    let mut cmd = Command::new(version.bin_dir().join("containerd"));
    cmd.arg("--config").arg(config).args(["config", "dump"]);
    let out = succeeds(&mut cmd, Duration::from_secs(30)).await?;
    Ok(String::from_utf8(out.stdout)?.parse()?)
}

/// The value at `keys` in `t`.
fn at<'a>(t: &'a Table, keys: &[&str]) -> Option<&'a Value> {
    let (first, rest) = keys.split_first()?;
    rest.iter().try_fold(t.get(*first)?, |v, k| v.get(*k))
}

/// Where a dump (always in the version's own layout) keeps CRI's runtimes.
fn runtimes_path(version: Version) -> [&'static str; 4] {
    match version {
        Version::V2 => [
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ],
        _ => [
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ],
    }
}

/// The configured pause image in a dump.
fn sandbox_image(version: Version, dump: &Table) -> Option<String> {
    let keys: &[&str] = match version {
        Version::V2 => &[
            "plugins",
            "io.containerd.cri.v1.images",
            "pinned_images",
            "sandbox",
        ],
        _ => &["plugins", "io.containerd.grpc.v1.cri", "sandbox_image"],
    };
    at(dump, keys).and_then(Value::as_str).map(String::from)
}

/// A dump without the shoji handlers and the list of files read: what must not change.
fn without_shoji(version: Version, mut dump: Table) -> Table {
    dump.remove("imports");
    let runtimes = runtimes_path(version).iter().try_fold(&mut dump, |t, k| {
        t.get_mut(*k).and_then(Value::as_table_mut)
    });
    if let Some(r) = runtimes {
        r.remove("shoji");
        r.remove("shoji-qemu");
    }
    dump
}

/// The config.toml a node starts from, and the one it had before shoji (what `--uninstall`
/// must leave); None: no file.
async fn start_config(
    version: Version,
    start: Start,
    prefix: &Path,
) -> Result<(Option<String>, Option<String>)> {
    let packaged = || -> Result<String> {
        let path = version.packaged_config();
        std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{}: {e} (hack/install-containerd.sh puts it there)",
                path.display()
            )
            .into()
        })
    };
    let same = |text: String| (Some(text.clone()), Some(text));
    Ok(match start {
        Start::Nothing => (None, None),
        Start::Packaged => same(packaged()?),
        Start::Default => {
            let mut cmd = Command::new(version.bin_dir().join("containerd"));
            cmd.args(["config", "default"]);
            let out = succeeds(&mut cmd, Duration::from_secs(30)).await?;
            same(String::from_utf8(out.stdout)?)
        }
        Start::Kubeadm => match version {
            Version::V2 => same(KUBEADM_V3.into()),
            _ => same(KUBEADM_V2.into()),
        },
        Start::OlderInstall => {
            let original = packaged()?;
            let block = OLDER_BLOCK.replace("@PREFIX@", &prefix.display().to_string());
            // As it wrote it: the file without its trailing newlines, a blank line, the block.
            let with_block = format!("{}\n\n{block}\n", original.trim_end_matches('\n'));
            (Some(with_block), Some(original))
        }
    })
}

/// The shims (pids) serving sandboxes under `run_dir`.
fn shims(run_dir: &Path) -> Vec<i32> {
    let marker = format!("SHOJI_RUN_DIR={}", run_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            let is_shim = exe
                .file_name()?
                .to_string_lossy()
                .starts_with("containerd-shim-shoji-v2");
            let ours = env.split(|b| *b == 0).any(|v| v == marker.as_bytes());
            (is_shim && ours).then_some(pid)
        })
        .collect()
}

/// The `-kernel` QEMU of sandbox `id` (under `run_dir`) booted.
fn booted_kernel(run_dir: &Path, id: &str) -> Option<PathBuf> {
    let dir = run_dir.join(id).display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a.contains(&dir)) {
            return None;
        }
        let i = args.iter().position(|a| a == "-kernel")?;
        args.get(i + 1).map(PathBuf::from)
    })
}

/// A scratch root with the handler's run directory beside it (short: sandbox socket paths).
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Result<Scratch> {
        let dir = tempfile::Builder::new().prefix("shji").tempdir_in("/tmp")?;
        std::fs::create_dir_all(dir.path().join("root/etc/containerd"))?;
        Ok(Scratch { dir })
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn main(&self) -> PathBuf {
        self.root().join("etc/containerd/config.toml")
    }
    /// shoji as installed: the root's shim, the qemu handler file, the scratch run dir.
    fn runtime(&self) -> Runtime {
        let root = self.root();
        let mut runtime = Runtime::shoji(
            root.join("usr/local/bin"),
            Some(root.join("etc/shoji/qemu.toml")),
            self.run_dir(),
        );
        runtime.cri_handler = HANDLER.into();
        runtime
    }
}

/// The install arguments for `root` and containerd `version`.
fn install_args(root: &Path, bin_dir: &Path, version: Version) -> Vec<String> {
    let ctrd = version.bin_dir().join("containerd");
    [
        "--root",
        &root.display().to_string(),
        "--bin-dir",
        &bin_dir.display().to_string(),
        "--containerd",
        &ctrd.display().to_string(),
    ]
    .map(String::from)
    .into()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The sandbox's logs, kept in the installed handler's (default) log_dir: removed once there.
async fn remove_kept_logs(sandbox: &str) -> Result {
    let kept = Path::new(shoji::config::DEFAULT_LOG_DIR).join(sandbox);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !kept.join("console.log").is_file() {
        check(tokio::time::Instant::now() < deadline, || {
            format!("no logs kept in {}", kept.display())
        })?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::remove_dir_all(&kept)?;
    Ok(())
}

/// Starts pod `name` on `handler` with one sleeping container; returns (pod, container).
async fn pod(pods: &mut Pods, logs: &Path, name: &str, handler: &str) -> Result<(String, String)> {
    let config = cri::pod_config(name, "shoji-install", logs);
    let id = pods.run_with(&config, handler).await?;
    let app = cri::container_config("app", BUSYBOX, &["sleep", "600"]);
    let container = pods.start(&id, &config, &app).await?;
    Ok((id, container))
}

/// Tags the test image as the configuration's pause image (no registry here).
async fn tag_sandbox_image(env: &Env, image: &str) -> Result {
    if image != BUSYBOX {
        let tag = ["images", "tag", BUSYBOX, image];
        env.ctrd
            .ctr_ok(CRI_NAMESPACE, &tag, Duration::from_secs(30))
            .await?;
    }
    Ok(())
}

async fn configs_on(version: Version, net: u8) {
    scenario::within(TEST_LIMIT, async {
        let bins = stripped_bins().await?;
        for &start in Start::of(version) {
            let began = std::time::Instant::now();
            one_config(version, start, net, bins.path())
                .await
                .map_err(|e| format!("containerd {version}, {start:?} config: {e}"))?;
            eprintln!("containerd {version}, {start:?}: {:?}", began.elapsed());
        }
        Ok(())
    })
    .await
}

async fn one_config(version: Version, start: Start, net: u8, bin_dir: &Path) -> Result {
    let scratch = Scratch::new()?;
    let (root, main) = (scratch.root(), scratch.main());
    let (initial, original) = start_config(version, start, &root).await?;
    if let Some(text) = &original {
        std::fs::write(&main, text)?;
    }
    let expected = tree(&root);
    if let Some(text) = &initial {
        std::fs::write(&main, text)?;
    }
    let args = install_args(&root, bin_dir, version);
    let said = install(&strs(&args), &[]).await?;
    let dropin = root.join("etc/containerd/conf.d/shoji.toml");
    let named = match version {
        Version::V2 => dropin.display().to_string(),
        _ => main.display().to_string(),
    };
    check(
        said.contains("checked: containerd") && said.contains(&named),
        || format!("install.sh did not say it checked and changed {named}: {said}"),
    )?;
    let installed = tree(&root);
    install(&strs(&args), &[]).await?;
    check(tree(&root) == installed, || {
        "a second install changed the root".into()
    })?;

    // containerd reads the original's settings, runc included, plus the two handlers.
    let after = dump(version, &main).await?;
    let before_path = scratch.dir.path().join("original.toml");
    let version_line = match version {
        Version::V2 => "version = 3\n",
        _ => "version = 2\n",
    };
    std::fs::write(&before_path, original.as_deref().unwrap_or(version_line))?;
    let before = dump(version, &before_path).await?;
    let runtimes = runtimes_path(version);
    for (handler, file) in [("shoji", "clh.toml"), (HANDLER, "qemu.toml")] {
        let rt = [&runtimes[..], &[handler]].concat();
        let config_path = at(&after, &[&rt[..], &["options", "ConfigPath"]].concat());
        let want = root.join("etc/shoji").join(file).display().to_string();
        check(
            at(&after, &[&rt[..], &["runtime_type"]].concat()) == Some(&SHOJI_RUNTIME.into())
                && config_path == Some(&Value::String(want)),
            || {
                format!(
                    "handler {handler} in containerd's configuration: {:?}",
                    at(&after, &rt)
                )
            },
        )?;
    }
    check(
        without_shoji(version, after.clone()) == without_shoji(version, before),
        || "containerd's configuration changed beyond the shoji handlers".into(),
    )?;
    let runc = [&runtimes[..], &["runc", "runtime_type"]].concat();
    check(at(&after, &runc).is_some(), || "runc is gone".into())?;
    let image = sandbox_image(version, &after).ok_or("no sandbox image configured")?;

    // A private containerd on the result runs a runc pod and a shoji pod.
    let runtime = scratch.runtime();
    let env = Env::start_with(version, &runtime, Some(Network::new(net)?), |o| {
        o.operator_config = Some(main.clone());
    })
    .await?;
    let logs = tempfile::tempdir()?;
    let mut sandbox = None;
    let ran = Pods::scenario(&env, async |pods| {
        tag_sandbox_image(&env, &image).await?;
        checked_by_shoji(&env, &root, &main).await?;
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
        let (_, c) = pod(pods, logs.path(), "runc-pod", "runc").await?;
        let kernel = sh_ok(&pods.cri, &c, "cat /proc/sys/kernel/osrelease").await?;
        check(kernel == host.trim(), || {
            format!("the runc pod runs kernel {kernel}")
        })?;
        let (id, c) = pod(pods, logs.path(), "shoji-pod", HANDLER).await?;
        sandbox = Some(id.clone());
        let kernel = sh_ok(&pods.cri, &c, "cat /proc/sys/kernel/osrelease").await?;
        check(kernel != host.trim(), || {
            format!("the shoji pod runs the host's kernel {kernel}")
        })?;
        let booted = booted_kernel(&scratch.run_dir(), &id).ok_or("no QEMU for the shoji pod")?;
        check(
            booted.starts_with(root.join("usr/share/shoji/boot")),
            || format!("the shoji pod booted {}", booted.display()),
        )
    })
    .await;
    let concluded = env.conclude(ran).await;
    let kept = match &sandbox {
        Some(id) if concluded.is_ok() => remove_kept_logs(id).await,
        _ => Ok(()),
    };
    concluded?;
    kept?;

    install(&["--uninstall", "--root", &root.display().to_string()], &[]).await?;
    let left = tree(&root);
    check(left == expected, || {
        format!(
            "after --uninstall the root is {:?}, not {:?}",
            describe(&left),
            describe(&expected)
        )
    })
}

/// `shoji check` of the installed files against the running containerd: CRI loaded, both
/// handlers known.
async fn checked_by_shoji(env: &Env, root: &Path, main: &Path) -> Result {
    let (cri, report) = shoji_check_cri(root, main, env.ctrd.address()).await?;
    check(
        cri.starts_with("ok")
            && cri.contains("CRI loaded")
            && cri.contains(&format!("{HANDLER} ({SHOJI_RUNTIME})"))
            && cri.contains(&format!("shoji ({SHOJI_RUNTIME})"))
            && cri.contains("runc (io.containerd.runc.v2, default)"),
        || format!("shoji check:\n{report}"),
    )
}

/// The `containerd CRI` line of the root's `shoji check` (qemu handler file, containerd config
/// `main`, socket `address`), and the whole report.
async fn shoji_check_cri(root: &Path, main: &Path, address: &Path) -> Result<(String, String)> {
    let mut cmd = Command::new(root.join("usr/local/bin/shoji"));
    cmd.arg("--config")
        .arg(root.join("etc/shoji/qemu.toml"))
        .arg("check")
        .arg("--containerd-config")
        .arg(main)
        .arg("--containerd-address")
        .arg(address);
    let out = output(&mut cmd, Duration::from_secs(60)).await?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let cri = report
        .lines()
        .find(|l| l.contains("containerd CRI"))
        .unwrap_or_default()
        .to_string();
    Ok((cri, report))
}

/// The node of the issue this installer fixed: Debian's containerd 1.6 config with the block
/// an older install appended (no runc table). containerd's CRI plugin does not load, and
/// `shoji check` says so with containerd's reason; reinstalling repairs it.
#[tokio::test]
async fn shoji_check_names_a_cri_plugin_that_did_not_load() {
    let version = Version::V1_6;
    scenario::within(Duration::from_secs(300), async {
        let scratch = Scratch::new()?;
        let (root, main) = (scratch.root(), scratch.main());
        let bins = stripped_bins().await?;
        install(&strs(&install_args(&root, bins.path(), version)), &[]).await?;
        let (broken, _) = start_config(version, Start::OlderInstall, &root).await?;
        std::fs::write(&main, broken.ok_or("no older install's config")?)?;
        let opts = Options {
            operator_config: Some(main.clone()),
            ..Options::default()
        };
        let ctrd = Containerd::start(version, opts).await?;
        let checked = shoji_check_cri(&root, &main, ctrd.address()).await;
        let stopped = ctrd.stop().await;
        let (cri, report) = checked?;
        stopped?;
        check(
            cri.starts_with("MISSING")
                && cri.contains("the CRI plugin did not load")
                && cri.contains("no corresponding runtime configured"),
            || format!("shoji check:\n{report}"),
        )?;
        let said = install(&strs(&install_args(&root, bins.path(), version)), &[]).await?;
        let after = dump(version, &main).await?;
        let runc = [&runtimes_path(version)[..], &["runc", "runtime_type"]].concat();
        check(at(&after, &runc).is_some(), || {
            format!("reinstalling did not bring runc back: {said}")
        })?;
        install(&["--uninstall", "--root", &root.display().to_string()], &[]).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn install_on_real_configs_containerd_1_6() {
    configs_on(Version::V1_6, 150).await;
}

#[tokio::test]
async fn install_on_real_configs_containerd_1_7() {
    configs_on(Version::V1_7, 151).await;
}

#[tokio::test]
async fn install_on_real_configs_containerd_2() {
    configs_on(Version::V2, 152).await;
}

/// What containerd would not load is refused before anything is written, with the reason.
#[tokio::test]
async fn install_refuses_what_containerd_would_not_load() {
    scenario::within(Duration::from_secs(120), async {
        let bin_dir = bins::binary("shoji").parent().unwrap().to_path_buf();
        let cases: [(Version, &str, &str); 3] = [
            (
                Version::V1_6,
                "version = 2\n[plugins\n",
                "cannot load the node's configuration",
            ),
            (
                Version::V1_7,
                KUBEADM_V3,
                "does not read (1.x reads version 2)",
            ),
            (
                Version::V2,
                "[plugins.x]\n",
                "needs a version 2 or 3 config",
            ),
        ];
        for (version, text, want) in cases {
            let scratch = Scratch::new()?;
            std::fs::write(scratch.main(), text)?;
            let before = tree(&scratch.root());
            let args = install_args(&scratch.root(), &bin_dir, version);
            let err = match install(&strs(&args), &[]).await {
                Ok(said) => return Err(format!("install.sh accepted {text:?}: {said}").into()),
                Err(e) => e.to_string(),
            };
            check(
                err.contains(want) && err.contains(&scratch.main().display().to_string()),
                || format!("containerd {version}, {text:?}: want {want:?}, got {err}"),
            )?;
            check(tree(&scratch.root()) == before, || {
                format!("a refused install changed the root ({text:?})")
            })?;
        }
        let scratch = Scratch::new()?;
        let mut args = install_args(&scratch.root(), &bin_dir, Version::V2);
        args[5] = "/nonexistent/containerd".into();
        let err = install(&strs(&args), &[]).await.unwrap_err().to_string();
        check(err.contains("--containerd /nonexistent/containerd"), || {
            err.clone()
        })
    })
    .await
}

/// Build B: build A's binaries and boot images with a distinct tail (still valid: ELF loaders
/// and the kernel's initramfs unpacker ignore trailing bytes/zeros), in a directory of its own.
fn build_b(dir: &Path, bin_dir: &Path) -> Result<PathBuf> {
    let cache = std::env::var_os("SHOJI_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/shoji"), PathBuf::from);
    for (from, name) in [
        (
            bin_dir.join("containerd-shim-shoji-v2"),
            "containerd-shim-shoji-v2",
        ),
        (bin_dir.join("shoji"), "shoji"),
        (cache.join("vmlinux"), "vmlinux"),
        (cache.join("initramfs.img"), "initramfs.img"),
    ] {
        let mut bytes = std::fs::read(&from)?;
        bytes.extend_from_slice(&[0u8; 512]);
        let to = dir.join(name);
        std::fs::write(&to, bytes)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(dir.to_path_buf())
}

/// Stops and removes `pod` (bounded), then waits until its shim `shim` has exited.
async fn stop(pods: &mut Pods, pod: &str, shim: i32, run_dir: &Path) -> Result {
    pods.stop_and_remove(pod, Duration::from_secs(60)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while shims(run_dir).contains(&shim) {
        check(tokio::time::Instant::now() < deadline, || {
            format!("the shim of pod {pod} outlived it")
        })?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn exe_of(pid: i32) -> Result<Vec<u8>> {
    Ok(std::fs::read(format!("/proc/{pid}/exe"))?)
}

#[tokio::test]
async fn upgrade_under_a_running_pod_and_roll_back() {
    let version = Version::V1_6;
    scenario::within(Duration::from_secs(600), async {
        let scratch = Scratch::new()?;
        let (root, run_dir) = (scratch.root(), scratch.run_dir());
        std::fs::write(scratch.main(), std::fs::read(version.packaged_config())?)?;
        let expected = tree(&root);
        let a_dir = stripped_bins().await?;
        let a_bins = a_dir.path().to_path_buf();
        let b_dir = tempfile::tempdir()?;
        let b = build_b(b_dir.path(), &a_bins)?;
        let a_args = install_args(&root, &a_bins, version);
        let b_args = install_args(&root, &b, version);
        let b_env = [("SHOJI_CACHE", b.as_path())];
        install(&strs(&a_args), &[]).await?;
        let boot = root.join("usr/share/shoji/boot");
        let key_a = std::fs::read_link(boot.join("current"))?;

        let env = Env::start_with(version, &scratch.runtime(), Some(Network::new(153)?), |o| {
            o.operator_config = Some(scratch.main());
        })
        .await?;
        let logs = tempfile::tempdir()?;
        let mut sandboxes = Vec::new();
        let ran = Pods::scenario(&env, async |pods| {
            let image = sandbox_image(version, &dump(version, &scratch.main()).await?)
                .ok_or("no sandbox image")?;
            tag_sandbox_image(&env, &image).await?;
            let (pod_a, c_a) = pod(pods, logs.path(), "on-a", HANDLER).await?;
            sandboxes.push(pod_a.clone());
            let shim_a = *shims(&run_dir).first().ok_or("no shim for pod A")?;
            check(
                booted_kernel(&run_dir, &pod_a) == Some(boot.join(&key_a).join("vmlinux")),
                || format!("pod A booted {:?}", booted_kernel(&run_dir, &pod_a)),
            )?;

            // Build B over the running pod.
            let said = install(&strs(&b_args), &b_env).await?;
            let key_b = std::fs::read_link(boot.join("current"))?;
            check(
                key_b != key_a
                    && boot.join(&key_a).join("vmlinux").is_file()
                    && said.contains(&format!("kept boot images {}", boot.join(&key_a).display()))
                    && said.contains("no restart needed"),
                || format!("install of B over pod A said: {said}"),
            )?;
            let installed_shim =
                std::fs::read(root.join("usr/local/bin/containerd-shim-shoji-v2"))?;
            check(installed_shim.ends_with(&[0u8; 512]), || {
                "B's shim was not installed".into()
            })?;
            check(!exe_of(shim_a)?.ends_with(&[0u8; 512]), || {
                "pod A's shim does not run A's binary".into()
            })?;
            check(
                sh_ok(&pods.cri, &c_a, "echo alive").await? == "alive",
                || "pod A does not answer".into(),
            )?;

            // A new pod gets B's shim and boot images.
            let (pod_b, _) = pod(pods, logs.path(), "on-b", HANDLER).await?;
            sandboxes.push(pod_b.clone());
            check(
                booted_kernel(&run_dir, &pod_b) == Some(boot.join(&key_b).join("vmlinux")),
                || format!("pod B booted {:?}", booted_kernel(&run_dir, &pod_b)),
            )?;
            let shim_b = shims(&run_dir)
                .into_iter()
                .find(|p| *p != shim_a)
                .ok_or("no shim for pod B")?;
            check(exe_of(shim_b)?.ends_with(&[0u8; 512]), || {
                "pod B's shim does not run B's binary".into()
            })?;

            // Pod A stops cleanly on A's shim; A's images go at the next install.
            stop(pods, &pod_a, shim_a, &run_dir).await?;
            let said = install(&strs(&b_args), &b_env).await?;
            check(!boot.join(&key_a).exists(), || {
                format!("A's boot images stayed once unused: {said}")
            })?;

            // Rollback to A under pod B: B's images stay while pod B runs.
            let said = install(&strs(&a_args), &[]).await?;
            check(
                std::fs::read_link(boot.join("current"))? == key_a
                    && boot.join(&key_b).join("vmlinux").is_file(),
                || format!("rollback to A under pod B said: {said}"),
            )?;
            stop(pods, &pod_b, shim_b, &run_dir).await?;
            install(&strs(&a_args), &[]).await?;
            check(!boot.join(&key_b).exists(), || {
                "B's boot images stayed once unused".into()
            })
        })
        .await;
        let concluded = env.conclude(ran).await;
        if concluded.is_ok() {
            for id in &sandboxes {
                remove_kept_logs(id).await?;
            }
        }
        concluded?;
        install(&["--uninstall", "--root", &root.display().to_string()], &[]).await?;
        check(tree(&root) == expected, || {
            "--uninstall did not restore the root".into()
        })
    })
    .await
}
