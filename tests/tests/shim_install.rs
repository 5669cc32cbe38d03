//! `hack/install.sh` into a scratch root, then a container through what it installed: a
//! private containerd (1.7 and 2.x) that loads the installed handler tables, with the
//! installed shim first on its PATH, runs a VM with the installed handler file, kernel and
//! initramfs. Then `--uninstall` leaves nothing of it in the root.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use shoji_tests::{
    bins,
    containerd::{Containerd, Options, Version, SHOJI_RUNTIME},
    image::{self, BUSYBOX},
    leaks::{Scope, Snapshot},
    scenario::{self, check, CTR_NAMESPACE},
};

type Result<T = ()> = scenario::Result<T>;

const TEST_LIMIT: Duration = Duration::from_secs(300);
const CALL: Duration = Duration::from_secs(120);

/// Runs `hack/install.sh ARGS` and returns its stderr.
fn install(args: &[&str]) -> Result<String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hack/install.sh");
    let out = Command::new(script).args(args).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    check(out.status.success(), || {
        format!("install.sh {args:?} failed: {stderr}")
    })?;
    Ok(stderr)
}

/// Every path under `root`, with each file's content (a second install must not change any).
fn tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(d: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push((p.clone(), Vec::new()));
                walk(&p, out);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort();
    out
}

async fn installed_pod(version: Version) {
    scenario::within(TEST_LIMIT, async {
        let scratch = tempfile::Builder::new().prefix("shji").tempdir_in("/tmp")?;
        let root = scratch.path().join("root");
        // Short: sandbox socket paths live under it.
        let run_dir = scratch.path().join("run");
        std::fs::create_dir_all(&root)?;
        let root_arg = root.display().to_string();
        let bin_dir = bins::binary("shoji")
            .parent()
            .unwrap()
            .display()
            .to_string();
        let ctrd_version = if version == Version::V2 { "2" } else { "1.7" };
        let args = [
            "--root",
            &root_arg,
            "--bin-dir",
            &bin_dir,
            "--containerd-version",
            ctrd_version,
        ];
        install(&args)?;
        let installed = tree(&root);
        install(&args)?;
        check(tree(&root) == installed, || {
            "a second install changed the root".into()
        })?;

        let at = |rel: &str| root.join(rel);
        for rel in [
            "usr/local/bin/containerd-shim-shoji-v2",
            "usr/local/bin/shoji",
            "usr/share/shoji/vmlinux",
            "usr/share/shoji/initramfs.img",
            "etc/shoji/qemu.toml",
            "etc/shoji/clh.toml",
        ] {
            check(at(rel).is_file(), || format!("{rel} was not installed"))?;
        }
        let classes = std::fs::read_to_string(at("usr/share/shoji/runtimeclass.yaml"))?;
        check(
            classes.contains("handler: shoji-qemu") && classes.contains("podFixed"),
            || format!("RuntimeClasses: {classes}"),
        )?;
        let qemu_toml = at("etc/shoji/qemu.toml");
        let cfg = shoji::config::Config::from_file(&qemu_toml)?;
        check(cfg.kernel == at("usr/share/shoji/vmlinux"), || {
            format!("the handler file names {}", cfg.kernel.display())
        })?;

        // containerd loads the installed tables: 2.x imports the drop-in, 1.7 gets the
        // block the script put into config.toml.
        let mut opts = Options {
            shim_dir: Some(at("usr/local/bin")),
            shoji_handlers: Vec::new(),
            env: vec![("SHOJI_RUN_DIR".into(), run_dir.display().to_string())],
            ..Options::default()
        };
        if version == Version::V2 {
            opts.imports = vec![at("etc/containerd/conf.d/shoji.toml")];
        } else {
            let main = std::fs::read_to_string(at("etc/containerd/config.toml"))?;
            opts.extra_toml = main.replace("version = 2\n", "");
        }
        let scope = Scope {
            cmdline_markers: vec![run_dir.display().to_string()],
            mount_dirs: vec![run_dir.clone()],
            run_dirs: vec![run_dir.clone()],
            ..Scope::default()
        };
        let baseline = Snapshot::take(&scope);
        let ctrd = Containerd::start(version, opts).await?;
        let ran = run_through(&ctrd, &root, &run_dir).await;
        let log = ctrd.log_tail();
        let clean = async {
            ctrd.assert_no_leftovers().await?;
            baseline
                .assert_clean(&scope, Duration::from_secs(10))
                .await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        let stopped = ctrd.stop().await;
        ran.map_err(|e| format!("{e}\n--- containerd log ---\n{log}"))?;
        clean?;
        stopped?;

        install(&["--uninstall", "--root", &root_arg])?;
        let left = tree(&root);
        check(left.is_empty(), || format!("left in the root: {left:?}"))?;
        Ok(())
    })
    .await
}

/// A container through the installed handler; checks what containerd and `shoji check`
/// make of the installed configuration.
async fn run_through(ctrd: &Containerd, root: &Path, run_dir: &Path) -> Result {
    let qemu_toml = root.join("etc/shoji/qemu.toml");
    let dump = ctrd.config_dump().await?;
    check(
        dump.matches(SHOJI_RUNTIME).count() == 2
            && dump.contains(&qemu_toml.display().to_string())
            && dump.contains("io.containerd.runc.v2"),
        || format!("containerd's merged configuration lacks the handlers (or runc):\n{dump}"),
    )?;
    let out = Command::new(root.join("usr/local/bin/shoji"))
        .arg("--config")
        .arg(&qemu_toml)
        .arg("check")
        .arg("--containerd-config")
        .arg(ctrd.config_path())
        .output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    let handlers = report
        .lines()
        .filter(|l| l.starts_with("ok") && l.contains("shoji handler"))
        .count();
    check(handlers == 2, || format!("shoji check:\n{report}"))?;

    image::import(ctrd, CTR_NAMESPACE).await?;
    let config = qemu_toml.display().to_string();
    let run = [
        "run",
        "-d",
        "--runtime",
        SHOJI_RUNTIME,
        "--runtime-config-path",
        &config,
        BUSYBOX,
        "installed",
        "sleep",
        "300",
    ];
    ctrd.ctr_ok(CTR_NAMESPACE, &run, CALL).await?;
    // The installed shim serves it.
    let shim = scenario::find_shim(run_dir).ok_or("no shim serves the run dir")?;
    let exe = std::fs::read_link(format!("/proc/{shim}/exe"))?;
    check(
        exe == root.join("usr/local/bin/containerd-shim-shoji-v2"),
        || format!("the shim is {}", exe.display()),
    )?;
    let exec = [
        "task",
        "exec",
        "--exec-id",
        "e1",
        "installed",
        "uname",
        "-r",
    ];
    let guest_kernel = ctrd.ctr_ok(CTR_NAMESPACE, &exec, CALL).await?.stdout;
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    check(
        !guest_kernel.trim().is_empty() && guest_kernel.trim() != host_kernel.trim(),
        || format!("uname -r in the VM: {guest_kernel:?} (host {host_kernel:?})"),
    )?;
    let sandbox = std::fs::read_dir(run_dir)?
        .flatten()
        .next()
        .ok_or("no sandbox directory")?
        .file_name();
    for args in [
        &["task", "kill", "--signal", "SIGKILL", "installed"][..],
        &["task", "delete", "--force", "installed"],
        &["container", "delete", "installed"],
    ] {
        let _ = ctrd.ctr(CTR_NAMESPACE, args, CALL).await?;
    }
    // The installed configuration keeps a torn-down sandbox's logs in the default log_dir.
    let kept = Path::new(shoji::config::DEFAULT_LOG_DIR).join(&sandbox);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !kept.join("console.log").is_file() {
        check(tokio::time::Instant::now() < deadline, || {
            format!("no logs kept in {}", kept.display())
        })?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let console = std::fs::read_to_string(kept.join("console.log"))?;
    std::fs::remove_dir_all(&kept)?;
    check(console.contains("agent ready"), || {
        format!("the kept console lacks the agent's start: {console}")
    })
}

#[tokio::test]
async fn installed_shoji_runs_a_container_containerd_1_7() {
    installed_pod(Version::V1_7).await;
}

#[tokio::test]
async fn installed_shoji_runs_a_container_containerd_2() {
    installed_pod(Version::V2).await;
}
