//! `shoji check`: is this host ready to run sandboxes, and if not, what fixes it.
//!
//! Each [`Check`] is one line: a name, a verdict, what was found, and the fix when it is
//! not ok. Drivers add their own lines here (e.g. the Cloud Hypervisor binary).
use std::{fmt, path::Path, process::Stdio, time::Duration};

use crate::{config::Config, hypervisor::HypervisorKind, kvm};

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

/// Runs every check against `cfg`.
pub async fn run(cfg: &Config) -> Vec<Check> {
    let needs_clh = cfg.hypervisor == HypervisorKind::Clh;
    let kvm = tokio::task::spawn_blocking(kvm::probe)
        .await
        .expect("KVM probe panicked");
    let mut checks = vec![Check {
        name: "accelerator",
        verdict: if kvm.usable {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        detail: if kvm.usable {
            format!("KVM: {}", kvm.reason)
        } else {
            format!("TCG (software emulation, slow): {}", kvm.reason)
        },
        fix: None,
    }];
    if needs_clh && !kvm.usable {
        checks.push(Check {
            name: "hypervisor",
            verdict: Verdict::Missing,
            detail: "hypervisor = \"clh\" needs a KVM that runs ordinary guests".into(),
            fix: Some("set hypervisor = \"qemu\" in the configuration".into()),
        });
    }
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
    checks.push(
        binary(
            "cloud-hypervisor",
            &cfg.clh.path,
            &["--version"],
            needs_clh,
            "install cloud-hypervisor (needed only with hypervisor = \"clh\")",
        )
        .await,
    );
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
    checks
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
