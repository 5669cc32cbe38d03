//! The operator's view of a CRI pod (what kubelet makes): `shoji ps` and `shoji metrics`
//! name it by its namespace and name, list its container, and `shoji logs` finds its logs
//! while it runs and after it was removed.
use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use shoji_tests::{
    bins,
    containerd::Version,
    cri,
    image::BUSYBOX,
    metrics,
    scenario::{self, check, Env, ShojiRuntime},
};

type Result<T = ()> = scenario::Result<T>;

const TEST_LIMIT: Duration = Duration::from_secs(300);

/// `shoji --config <the runtime's file> ARGS` over the runtime's run dir.
fn shoji(env: &Env, args: &[&str]) -> Command {
    let mut cmd = Command::new(bins::binary("shoji"));
    cmd.envs(env.runtime.env.iter().map(|(k, v)| (k, v)))
        .arg("--config")
        .arg(env.runtime.config_path.as_ref().unwrap())
        .args(args);
    cmd
}

fn output(mut cmd: Command) -> Result<(String, String)> {
    let out = cmd.output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    check(out.status.success(), || format!("{cmd:?}: {stderr}"))?;
    Ok((stdout, stderr))
}

async fn pod_seen_by_the_operator(env: &Env, log_dir: &Path) -> Result {
    let cri = env.cri().await?;
    let pod_logs = tempfile::Builder::new()
        .prefix("shoji-opslogs-")
        .tempdir()?;
    let pod_config = cri::pod_config("ops-pod", "shoji-ops", pod_logs.path());
    let pod = cri.run_pod(&pod_config, &env.runtime.cri_handler).await?;
    let steps = async {
        let app = cri::container_config("app", BUSYBOX, &["sleep", "300"]);
        let app = cri.create_container(&pod, &app, &pod_config).await?;
        cri.start_container(&app).await?;

        let (json, _) = output(shoji(env, &["ps", "--json"]))?;
        let all: Vec<Value> = serde_json::from_str(&json)?;
        check(all.len() == 1, || format!("shoji ps: {json}"))?;
        let s = &all[0];
        check(
            s["id"] == pod.as_str()
                && s["pod_namespace"] == "shoji-ops"
                && s["pod_name"] == "ops-pod"
                && s["state"] == "running"
                && s["containers"] == serde_json::json!([app]),
            || format!("shoji ps: {json}"),
        )?;
        let (table, _) = output(shoji(env, &["ps"]))?;
        check(table.contains("shoji-ops/ops-pod"), || {
            format!("shoji ps: {table}")
        })?;

        let (server, addr) = metrics::start(shoji(env, &[]));
        let (scrape, body) = metrics::scrape(&addr);
        drop(server);
        let labels = [
            ("sandbox_id", pod.as_str()),
            ("pod_namespace", "shoji-ops"),
            ("pod_name", "ops-pod"),
        ];
        let up = metrics::sample(&scrape, "shoji_sandbox_guest_up", &labels).map(metrics::value);
        let mut with_app = labels.to_vec();
        with_app.push(("container", &app));
        let pids = metrics::sample(&scrape, "shoji_container_pids", &with_app).map(metrics::value);
        check(up == Some(1.0) && pids == Some(1.0), || {
            format!("metrics of the pod (guest up {up:?}, app pids {pids:?}):\n{body}")
        })?;

        let (logs, _) = output(shoji(env, &["logs", &pod[..12]]))?;
        check(logs.contains("console.log <=="), || {
            format!("shoji logs: {logs}")
        })?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    let stop = cri.stop_pod(&pod).await;
    let remove = cri.remove_pod(&pod).await;
    steps?;
    stop?;
    remove?;

    // Gone from ps; its logs kept.
    let (json, _) = output(shoji(env, &["ps", "--json"]))?;
    check(json.trim() == "[]", || {
        format!("shoji ps after the pod: {json}")
    })?;
    let (logs, note) = output(shoji(env, &["logs", &pod]))?;
    check(
        note.contains("kept") && logs.contains(&format!("{}/{pod}/console.log", log_dir.display())),
        || format!("shoji logs after the pod: {note}\n{logs}"),
    )?;
    check(logs.contains("agent ready"), || {
        format!("kept console: {logs}")
    })
}

async fn with_pod(version: Version, net: u8) {
    scenario::within(TEST_LIMIT, async {
        let log_dir = tempfile::Builder::new().prefix("shoji-kept-").tempdir()?;
        let shoji = ShojiRuntime::new(&format!("log_dir = \"{}\"", log_dir.path().display()));
        let env = Env::start(version, &shoji.runtime, Some(net)).await?;
        let r = pod_seen_by_the_operator(&env, log_dir.path()).await;
        env.conclude(r).await
    })
    .await
}

#[tokio::test]
async fn ps_metrics_and_logs_name_a_cri_pod_containerd_2() {
    with_pod(Version::V2, 220).await
}
