//! CRI pod scenarios' building blocks: pods that are always torn down (and checked gone),
//! exec helpers and container config tweaks. Runtime-agnostic: the same steps run on runc and
//! on shoji.
use std::time::Duration;

use crate::{
    containerd::Version,
    cri::{api, Cri, ExecOutput},
    scenario::{self, Env, Runtime},
};

type Result<T = ()> = scenario::Result<T>;

/// Upper bound for one pod test, so a hang fails instead of stalling CI.
pub const TEST_LIMIT: Duration = Duration::from_secs(400);

/// One pod test on `runtime` with containerd `version` and test network `net` (see
/// [`scenario::in_env`]).
pub async fn on(
    runtime: &Runtime,
    version: Version,
    net: u8,
    scenario: impl AsyncFnOnce(&Env) -> Result,
) {
    scenario::in_env(TEST_LIMIT, version, runtime, Some(net), scenario).await
}

pub fn check(cond: bool, what: impl FnOnce() -> String) -> Result {
    if cond {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// Bound for one exec (TCG under load).
pub const EXEC: Duration = Duration::from_secs(30);

/// ExecSync `script` with `sh -c` in container `id`; returns (exit code, stdout, stderr).
pub async fn sh(cri: &Cri, id: &str, script: &str) -> Result<ExecOutput> {
    Ok(cri.exec_sync(id, &["sh", "-c", script], EXEC).await?)
}

/// ExecSync that must succeed; returns its trimmed stdout.
pub async fn sh_ok(cri: &Cri, id: &str, script: &str) -> Result<String> {
    let out = sh(cri, id, script).await?;
    check(out.exit_code == 0, || {
        format!("exec {script:?} in {id}: {out:?}")
    })?;
    Ok(out.stdout.trim().to_string())
}

/// Pods the scenario started; all are stopped and removed at the end, also when a step failed.
pub struct Pods {
    pub cri: Cri,
    handler: String,
    ids: Vec<String>,
    /// The pods' host cgroups (`<cgroup parent>/<sandbox id>`): gone after RemovePodSandbox.
    cgroups: Vec<String>,
}

impl Pods {
    pub async fn run(&mut self, config: &api::PodSandboxConfig) -> Result<String> {
        let handler = self.handler.clone();
        self.run_with(config, &handler).await
    }

    /// [`Pods::run`] with another runtime handler than the scenario's (e.g. `runc` beside it).
    pub async fn run_with(
        &mut self,
        config: &api::PodSandboxConfig,
        handler: &str,
    ) -> Result<String> {
        let id = self.cri.run_pod(config, handler).await?;
        self.ids.push(id.clone());
        if let Some(linux) = &config.linux {
            self.cgroups.push(format!("{}/{id}", linux.cgroup_parent));
        }
        Ok(id)
    }

    /// Starts container `config` in pod `pod` (configured by `pod_config`); returns its id.
    pub async fn start(
        &self,
        pod: &str,
        pod_config: &api::PodSandboxConfig,
        config: &api::ContainerConfig,
    ) -> Result<String> {
        let id = self.cri.create_container(pod, config, pod_config).await?;
        self.cri.start_container(&id).await?;
        Ok(id)
    }

    /// StopPodSandbox + RemovePodSandbox of `pod` now, failing if they take longer than `limit`;
    /// returns how long they took. The pod's cgroup is still checked gone at the end.
    pub async fn stop_and_remove(&mut self, pod: &str, limit: Duration) -> Result<Duration> {
        let began = std::time::Instant::now();
        let down = async {
            self.cri.stop_pod(pod).await?;
            self.cri.remove_pod(pod).await
        };
        tokio::time::timeout(limit, down).await.map_err(|_| {
            format!("StopPodSandbox + RemovePodSandbox of {pod} took over {limit:?}")
        })??;
        self.ids.retain(|id| id != pod);
        Ok(began.elapsed())
    }

    /// Runs `steps`, then StopPodSandbox + RemovePodSandbox for every pod; the first error wins.
    pub async fn scenario(env: &Env, steps: impl AsyncFnOnce(&mut Pods) -> Result) -> Result {
        let mut pods = Pods {
            cri: env.cri().await?,
            handler: env.runtime.cri_handler.clone(),
            ids: Vec::new(),
            cgroups: Vec::new(),
        };
        let r = steps(&mut pods).await;
        let mut teardown = Ok(());
        for id in &pods.ids {
            let down = async {
                pods.cri.stop_pod(id).await?;
                pods.cri.remove_pod(id).await
            };
            if let Err(e) = down.await {
                teardown = teardown.and(Err(e));
            }
        }
        r?;
        teardown?;
        let left = pods.cri.list_pods().await?;
        check(left.is_empty(), || {
            format!("pods left after RemovePodSandbox: {left:?}")
        })?;
        let left: Vec<_> = host_cgroup_dirs()?
            .iter()
            .flat_map(|h| {
                pods.cgroups
                    .iter()
                    .map(move |c| h.join(c.trim_start_matches('/')))
            })
            .filter(|p| p.exists())
            .collect();
        check(left.is_empty(), || {
            format!("pod cgroups left after RemovePodSandbox: {left:?}")
        })
    }
}

/// The cgroup hierarchies' roots: /sys/fs/cgroup itself (v2) and each v1 controller mount below it.
pub fn host_cgroup_dirs() -> Result<Vec<std::path::PathBuf>> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.to_path_buf()];
    for e in std::fs::read_dir(root)? {
        let p = e?.path();
        if p.join("cgroup.procs").exists() {
            dirs.push(p);
        }
    }
    Ok(dirs)
}

pub fn with_env(mut c: api::ContainerConfig, key: &str, value: &str) -> api::ContainerConfig {
    c.envs.push(api::KeyValue {
        key: key.into(),
        value: value.into(),
    });
    c
}

/// The pod's Linux security context, made if missing.
pub fn pod_security(cfg: &mut api::PodSandboxConfig) -> &mut api::LinuxSandboxSecurityContext {
    cfg.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

pub fn security(c: &mut api::ContainerConfig) -> &mut api::LinuxContainerSecurityContext {
    c.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

/// `$name_{runc,shoji}_{1_7,2}`: scenario `$scenario` on each runtime and containerd version, on test
/// networks `$net`..`$net + 3`, made by `$on` ([`on`] unless given), an async fn of (`&Runtime`,
/// `Version`, network number, scenario).
#[macro_export]
macro_rules! side_by_side {
    ($scenario:ident, $net:literal) => {
        $crate::side_by_side!($scenario, $net, $crate::pods::on);
    };
    ($scenario:ident, $net:literal, $on:path) => {
        mod $scenario {
            use super::*;
            use $crate::{
                containerd::Version,
                scenario::{Runtime, ShojiRuntime},
            };

            #[tokio::test]
            async fn runc_containerd_1_7() {
                $on(&Runtime::runc(), Version::V1_7, $net, super::$scenario).await
            }

            #[tokio::test]
            async fn runc_containerd_2() {
                $on(&Runtime::runc(), Version::V2, $net + 1, super::$scenario).await
            }

            #[tokio::test]
            async fn shoji_containerd_1_7() {
                let shoji = ShojiRuntime::new("");
                $on(&shoji.runtime, Version::V1_7, $net + 2, super::$scenario).await
            }

            #[tokio::test]
            async fn shoji_containerd_2() {
                let shoji = ShojiRuntime::new("");
                $on(&shoji.runtime, Version::V2, $net + 3, super::$scenario).await
            }
        }
    };
}
