//! `shoji check`: is this host ready to run sandboxes, and if not, what fixes it.
//!
//! Each [`Check`] is one line: a name, a verdict, what was found, and the fix when it is
//! not ok. Drivers add their own lines here (e.g. the Cloud Hypervisor binary); the host's
//! tools, devices and cgroups are in [`host`], containerd's configuration in [`containerd`].
pub mod containerd;
pub mod cri;
mod host;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use crate::{
    config::Config,
    hypervisor::{
        choice::{self, Choice},
        Accel, HypervisorKind,
    },
    kvm,
};

/// How long a `--version` call may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but not the best setup (e.g. software emulation).
    Warn,
    /// Needed and missing: sandboxes cannot start.
    Missing,
    /// Missing but not needed with this configuration.
    Optional,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Missing => "MISSING",
            Verdict::Optional => "absent",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    pub fix: Option<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<8}{:<20}{}", self.verdict, self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " (fix: {fix})")?;
        }
        Ok(())
    }
}

/// Runs every check against `cfg`; `containerd_config` is containerd's configuration file,
/// `containerd_address` its socket (default: the file's `[grpc] address`, else containerd's).
pub async fn run(
    cfg: &Config,
    containerd_config: &Path,
    containerd_address: Option<&Path>,
) -> Vec<Check> {
    let choice = choice::choose(cfg).await;
    let needs_clh = choice.kind == HypervisorKind::Clh;
    let mut checks = vec![hypervisor(&choice), accelerator(cfg, choice.kind).await];
    let setup = "run hack/setup.sh";
    checks.push(
        binary(
            "qemu",
            &cfg.qemu.path,
            &["--version"],
            !needs_clh,
            "apt-get install qemu-system-x86",
        )
        .await,
    );
    checks.push(cloud_hypervisor(&cfg.clh.path, needs_clh).await);
    checks.push(
        binary(
            "virtiofsd",
            &cfg.virtiofsd.path,
            &["--version"],
            true,
            setup,
        )
        .await,
    );
    checks.push(
        binary(
            "vhost-device-vsock",
            &cfg.vhost_device_vsock.path,
            &["--version"],
            !needs_clh,
            setup,
        )
        .await,
    );
    checks.push(file(
        "guest kernel",
        &cfg.kernel,
        "run guest-kernel/build.sh",
    ));
    checks.push(file(
        "guest initramfs",
        &cfg.initrd,
        "run hack/build-initramfs.sh",
    ));
    checks.push(
        binary(
            "containerd",
            &crate::config::find_binary("containerd"),
            &["--version"],
            false,
            "apt-get install containerd",
        )
        .await,
    );
    let (containerd_lines, containerd_cfg) = containerd::checks(containerd_config);
    checks.extend(containerd_lines);
    let address = containerd_address
        .map(Path::to_path_buf)
        .or_else(|| containerd_cfg.as_ref().and_then(|c| c.grpc_address.clone()))
        .unwrap_or_else(|| PathBuf::from(cri::DEFAULT_ADDRESS));
    let configured: Vec<String> = containerd_cfg
        .iter()
        .flat_map(|c| c.handlers.iter().map(|h| h.name.clone()))
        .collect();
    checks.push(cri::line(
        &cri::query(&address).await,
        &address,
        &configured,
    ));
    checks.extend(host::tools());
    checks.push(host::tun());
    checks.push(host::cgroups());
    let cni_dirs: Vec<PathBuf> = match containerd_cfg.map(|c| c.cni_bin_dirs) {
        Some(dirs) if !dirs.is_empty() => dirs,
        _ => host::DEFAULT_CNI_DIRS.iter().map(PathBuf::from).collect(),
    };
    checks.push(host::cni(&cni_dirs));
    checks
}

/// The VMM a sandbox would get, and why (as the shim decides it at every VM start).
fn hypervisor(choice: &Choice) -> Check {
    let kind = choice.kind;
    match &choice.blocker {
        None => Check {
            name: "hypervisor",
            verdict: Verdict::Ok,
            detail: format!("{kind} ({})", choice.reason),
            fix: None,
        },
        Some(why) => Check {
            name: "hypervisor",
            verdict: Verdict::Missing,
            detail: format!(
                "{kind} ({}), but Cloud Hypervisor cannot run here: {why}",
                choice.reason
            ),
            fix: Some(
                "set hypervisor = \"auto\" (QEMU here) or \"qemu\" in the configuration".into(),
            ),
        },
    }
}

/// The accelerator a sandbox would get on `kind`, as the shim decides it (`qemu.accel`, the
/// probe).
async fn accelerator(cfg: &Config, kind: HypervisorKind) -> Check {
    let kvm = kvm::probe_async().await;
    if kind == HypervisorKind::Clh {
        // Cloud Hypervisor has no software emulation: KVM or nothing.
        return match kvm.usable {
            true => Check {
                name: "accelerator",
                verdict: Verdict::Ok,
                detail: format!("KVM: {}", kvm.reason),
                fix: None,
            },
            false => Check {
                name: "accelerator",
                verdict: Verdict::Missing,
                detail: format!(
                    "none: Cloud Hypervisor has no software emulation, and KVM cannot run a guest here: {}",
                    kvm.reason
                ),
                fix: Some("see the hypervisor line".into()),
            },
        };
    }
    let (accel, reason) = kvm::qemu_accel(cfg.qemu.accel).await;
    match accel {
        Accel::Kvm if kvm.usable => Check {
            name: "accelerator",
            verdict: Verdict::Ok,
            detail: format!("KVM: {reason}"),
            fix: None,
        },
        Accel::Kvm => Check {
            name: "accelerator",
            verdict: Verdict::Missing,
            detail: format!(
                "KVM {reason}, but KVM cannot run a guest here: {}",
                kvm.reason
            ),
            fix: Some("set qemu.accel = \"auto\" (or \"tcg\")".into()),
        },
        Accel::Tcg => Check {
            name: "accelerator",
            verdict: Verdict::Warn,
            detail: format!("TCG (software emulation, slow): {reason}"),
            fix: None,
        },
    }
}

/// True when nothing needed is missing.
pub fn all_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.verdict != Verdict::Missing)
}

fn file(name: &'static str, path: &Path, fix: &str) -> Check {
    match path.metadata() {
        Ok(m) if m.is_file() => Check {
            name,
            verdict: Verdict::Ok,
            detail: format!("{} ({} KiB)", path.display(), m.len() / 1024),
            fix: None,
        },
        _ => Check {
            name,
            verdict: Verdict::Missing,
            detail: format!("{} not found", path.display()),
            fix: Some(fix.into()),
        },
    }
}

/// Runs `path args` and reports the first line of its output as the version.
pub async fn binary(
    name: &'static str,
    path: &Path,
    args: &[&str],
    needed: bool,
    fix: &str,
) -> Check {
    let absent = |detail: String| Check {
        name,
        verdict: if needed {
            Verdict::Missing
        } else {
            Verdict::Optional
        },
        detail,
        fix: Some(fix.into()),
    };
    if !path.is_file() {
        return absent(format!("{} not found", path.display()));
    }
    let out = tokio::process::Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_TIMEOUT, out).await {
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(if out.stdout.is_empty() {
                &out.stderr
            } else {
                &out.stdout
            })
            .into_owned();
            let version = text.lines().next().unwrap_or("").trim().to_string();
            Check {
                name,
                verdict: Verdict::Ok,
                detail: format!("{} ({})", version, path.display()),
                fix: None,
            }
        }
        Ok(Err(e)) => absent(format!("{} does not run: {e}", path.display())),
        Err(_) => absent(format!(
            "{} --version did not answer within {VERSION_TIMEOUT:?}",
            path.display()
        )),
    }
}

/// Cloud Hypervisor releases whose REST API the driver was written against.
const CLH_TESTED_MAJORS: &[u32] = &[53, 54];

/// The Cloud Hypervisor line: present and running, and a release the driver knows.
async fn cloud_hypervisor(path: &Path, needed: bool) -> Check {
    let install = "install the static release binary, see docs/cloud-hypervisor.md; hypervisor = \"auto\" uses it on KVM nodes";
    let mut check = binary("cloud-hypervisor", path, &["--version"], needed, install).await;
    if check.verdict == Verdict::Ok {
        match clh_major_version(&check.detail) {
            Some(major) if CLH_TESTED_MAJORS.contains(&major) => {}
            found => {
                check.verdict = Verdict::Warn;
                let found = found
                    .map(|m| format!("v{m}"))
                    .unwrap_or_else(|| "an unrecognised version".into());
                check.fix = Some(format!(
                    "the driver was written against v53/v54, this is {found}; use v53.0 or v54.0"
                ));
            }
        }
    }
    check
}

/// The major version in `cloud-hypervisor --version` output (`cloud-hypervisor v53.0-246-g…`).
fn clh_major_version(text: &str) -> Option<u32> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
}

#[cfg(test)]
mod clh_tests {
    use super::*;

    #[test]
    fn clh_version_is_read_from_version_output() {
        assert_eq!(
            clh_major_version(
                "cloud-hypervisor v53.0-246-g1234abcd (/usr/local/bin/cloud-hypervisor)"
            ),
            Some(53)
        );
        assert_eq!(clh_major_version("cloud-hypervisor v54.0"), Some(54));
        assert_eq!(clh_major_version("something else"), None);
    }

    #[tokio::test]
    async fn clh_line_warns_about_an_untested_release_and_names_a_missing_binary() {
        let dir = std::env::temp_dir().join(format!("shoji-check-clh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("cloud-hypervisor");
        std::fs::write(&fake, "#!/bin/sh\necho cloud-hypervisor v38.0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = cloud_hypervisor(&fake, true).await;
        assert_eq!(c.verdict, Verdict::Warn, "{c}");
        assert!(c.fix.as_deref().unwrap().contains("this is v38"), "{c}");
        std::fs::write(&fake, "#!/bin/sh\necho cloud-hypervisor v53.0-246-gabc\n").unwrap();
        assert_eq!(cloud_hypervisor(&fake, true).await.verdict, Verdict::Ok);
        let missing = cloud_hypervisor(&dir.join("nope"), true).await;
        assert_eq!(missing.verdict, Verdict::Missing);
        assert!(
            missing
                .fix
                .as_deref()
                .unwrap()
                .contains("docs/cloud-hypervisor.md"),
            "{missing}"
        );
        assert_eq!(
            cloud_hypervisor(&dir.join("nope"), false).await.verdict,
            Verdict::Optional
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
