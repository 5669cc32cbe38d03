//! A shim (or any process owning a sandbox) killed with SIGKILL in the middle of a boot, after
//! the pod cgroup and the taps were made and before the VM is up, is cleaned up completely by
//! `containerd-shim-shoji-v2 delete` (what containerd runs for a dead shim) and, separately,
//! by `shoji cleanup`: no tap, tc filter, cgroup, mount, process or directory is left.
//!
//! The VM never comes up: the configured VMM (QEMU or Cloud Hypervisor, as
//! `SHOJI_TEST_HYPERVISOR` selects) is a script that sleeps, so the boot waits for its control
//! socket while everything before it exists.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use shoji::sandbox::State;
use shoji_tests::{
    backend, bins,
    containerd::Version,
    image::BUSYBOX,
    scenario::{self, Env, ShojiRuntime, CTR_NAMESPACE},
};

type Result<T = ()> = scenario::Result<T>;

const TEST_LIMIT: Duration = Duration::from_secs(240);
/// How long the dead sandbox's resources may take to disappear.
const GONE_WITHIN: Duration = Duration::from_secs(30);

fn check(cond: bool, what: impl FnOnce() -> String) -> Result {
    if cond {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// A "VMM" that never answers, and the config lines that make the boot wait for it.
fn hanging_vmm_config(dir: &Path) -> String {
    let script = dir.join("hanging-vmm");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(&script)
        .status()
        .unwrap();
    format!(
        "[{}]\npath = \"{}\"\n[timeouts]\nvm_start_ms = 120000",
        backend::hypervisor(),
        script.display()
    )
}

/// A network namespace with one veth (as CNI leaves a pod's), removed on drop.
struct PodNetns {
    name: String,
    path: PathBuf,
}

impl PodNetns {
    fn new(tag: &str) -> PodNetns {
        let name = format!("shoji-crash-{tag}-{}", std::process::id());
        let peer = format!("shjc{}{tag}", std::process::id() % 10000);
        for args in [
            vec!["netns", "add", &name],
            vec![
                "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ],
            vec!["-n", &name, "link", "set", "eth0", "up"],
            vec!["-n", &name, "addr", "add", "10.233.248.5/24", "dev", "eth0"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(&args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "ip {args:?}");
        }
        PodNetns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        }
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn has_tap(&self) -> bool {
        self.ip(&["-o", "link", "show"]).contains("shojitap")
    }

    fn has_redirect(&self) -> bool {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &self.name, "tc", "filter", "show", "dev", "eth0", "ingress",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("mirred")
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Waits until sandbox `id` recorded its taps, its cgroup and its VMM, and checks they exist.
async fn wait_mid_boot(run_dir: &Path, id: &str, netns: &PodNetns) -> Result<State> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(state) = State::read(&run_dir.join(id)) {
            if state.network.is_some()
                && state.cgroup.is_some()
                && state.pids.iter().any(|p| p.name == backend::vmm_name())
            {
                check(netns.has_tap() && netns.has_redirect(), || {
                    "recorded taps are not in the pod netns".into()
                })?;
                let cgroup = state.cgroup.clone().unwrap();
                check(cgroup.dirs.iter().all(|d| d.exists()), || {
                    format!("recorded cgroup missing: {cgroup:?}")
                })?;
                return Ok(state);
            }
        }
        check(tokio::time::Instant::now() < deadline, || {
            format!("sandbox {id} never got to its VMM launch")
        })?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything `state` recorded is gone, and so is the sandbox directory.
async fn wait_all_gone(run_dir: &Path, id: &str, state: &State, netns: &PodNetns) -> Result {
    let deadline = tokio::time::Instant::now() + GONE_WITHIN;
    loop {
        let mut left = Vec::new();
        if netns.has_tap() {
            left.push("tap".to_string());
        }
        if netns.has_redirect() {
            left.push("tc redirect on eth0".into());
        }
        let cgroup = state.cgroup.as_ref().unwrap();
        left.extend(
            cgroup
                .created
                .iter()
                .filter(|d| d.exists() && cgroup.dirs.contains(d))
                .map(|d| format!("cgroup {}", d.display())),
        );
        left.extend(
            state
                .pids
                .iter()
                .filter(|p| p.is_alive())
                .map(|p| format!("{} ({})", p.name, p.pid)),
        );
        let dir = run_dir.join(id);
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        left.extend(
            mounts
                .lines()
                .filter(|l| l.contains(dir.to_str().unwrap()))
                .map(|l| format!("mount {l}")),
        );
        if left.is_empty() {
            return Ok(());
        }
        check(tokio::time::Instant::now() < deadline, || {
            format!("left after {GONE_WITHIN:?}: {left:?}")
        })?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sigkill(pid: i32) -> Result {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    Ok(())
}

async fn shim_killed_mid_boot(version: Version) {
    let run = async {
        let scratch = tempfile::tempdir()?;
        let shoji = ShojiRuntime::new(&hanging_vmm_config(scratch.path()));
        // Made first: the leak baseline includes the test's own namespace.
        let netns = PodNetns::new(if version == Version::V2 { "2" } else { "17" });
        let env = Env::start(version, &shoji.runtime, None).await?;
        let r = async {
            let run_dir = &env.runtime.run_dirs[0];
            let config = env.runtime.config_arg();
            let mut ctr = tokio::process::Command::new(env.ctrd.version().bin_dir().join("ctr"));
            ctr.arg("--address")
                .arg(env.ctrd.address())
                .args(["--namespace", CTR_NAMESPACE, "run", "-d"])
                .args(["--runtime", &env.runtime.runtime_type])
                .args(["--runtime-config-path", &config])
                .arg("--with-ns")
                .arg(format!("network:{}", netns.path.display()))
                .args([BUSYBOX, "crash1", "sleep", "1000"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let ctr = ctr.spawn()?;
            let state = wait_mid_boot(run_dir, "crash1", &netns).await?;
            sigkill(scenario::find_shim(run_dir).ok_or("no shim process found")?)?;
            let out =
                tokio::time::timeout(Duration::from_secs(60), ctr.wait_with_output()).await??;
            check(!out.status.success(), || {
                "ctr run succeeded without a VM".into()
            })?;
            wait_all_gone(run_dir, "crash1", &state, &netns).await?;
            let _ = env
                .ctrd
                .ctr(
                    CTR_NAMESPACE,
                    &["task", "delete", "crash1"],
                    Duration::from_secs(30),
                )
                .await;
            env.ctrd
                .ctr(
                    CTR_NAMESPACE,
                    &["container", "rm", "crash1"],
                    Duration::from_secs(30),
                )
                .await?;
            Ok(())
        }
        .await;
        env.conclude(r).await
    };
    scenario::within(TEST_LIMIT, run).await
}

#[tokio::test]
async fn shim_killed_mid_boot_is_cleaned_by_delete_containerd_1_7() {
    shim_killed_mid_boot(Version::V1_7).await
}

#[tokio::test]
async fn shim_killed_mid_boot_is_cleaned_by_delete_containerd_2() {
    shim_killed_mid_boot(Version::V2).await
}

#[tokio::test]
async fn owner_killed_mid_boot_is_cleaned_by_shoji_cleanup() {
    let run = async {
        let scratch = tempfile::Builder::new().prefix("shjx").tempdir_in("/tmp")?;
        let run_dir = scratch.path().join("run");
        let config = scratch.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "hypervisor = \"{}\"\nrun_dir = \"{}\"\n{}\n",
                backend::hypervisor(),
                run_dir.display(),
                hanging_vmm_config(scratch.path())
            ),
        )?;
        let netns = PodNetns::new("c");
        let cgroup = format!("/shoji-crash-{}/sb", std::process::id());
        let mut owner = tokio::process::Command::new(env!("CARGO_BIN_EXE_boot-sandbox"))
            .arg(&config)
            .arg("crashsb")
            .arg(&netns.path)
            .arg(&cgroup)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let state = wait_mid_boot(&run_dir, "crashsb", &netns).await?;
        sigkill(owner.id().ok_or("no pid")? as i32)?;
        owner.wait().await?;
        let out = tokio::process::Command::new(bins::binary("shoji"))
            .arg("--config")
            .arg(&config)
            .args(["cleanup", "crashsb"])
            .output()
            .await?;
        check(out.status.success(), || {
            format!("shoji cleanup: {}", String::from_utf8_lossy(&out.stderr))
        })?;
        wait_all_gone(&run_dir, "crashsb", &state, &netns).await?;
        // The parent the sandbox created for its cgroup went too (nothing else was in it).
        let cg = state.cgroup.as_ref().unwrap();
        check(cg.created.iter().all(|d| !d.exists()), || {
            format!("cgroup dirs left: {:?}", cg.created)
        })?;
        Ok(())
    };
    scenario::within(TEST_LIMIT, run).await
}
