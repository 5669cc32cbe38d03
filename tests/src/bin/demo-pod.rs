//! The demo of `hack/demo.sh`: a Kubernetes-style pod in its own microVM, driven the way
//! kubelet drives it (CRI on a private containerd 1.7, runtime handler `shoji`, a CNI bridge
//! on a subnet only the demo uses). The pod runs busybox httpd; the demo fetches its page from
//! the host at the pod IP, shows the guest kernel next to the host's, and removes the pod.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use shoji_tests::{
    bins, cni,
    containerd::Version,
    cri, image,
    scenario::{self, Env, Runtime},
};

const NETWORK: u8 = 240;
const PAGE: &str = "echo \"hello from a shoji pod: kernel $(uname -r), boot $(cat /proc/sys/kernel/random/boot_id)\" \
     > /tmp/index.html && exec httpd -f -p 80 -h /tmp";

async fn demo(env: &Env) -> scenario::Result<()> {
    let cri = env.cri().await?;
    let logs = tempfile::Builder::new()
        .prefix("shoji-demo-logs-")
        .tempdir()?;
    let pod_config = cri::pod_config("demo", "default", logs.path());
    println!("== RunPodSandbox (runtime handler shoji): booting the pod's microVM");
    let pod = cri.run_pod(&pod_config, &env.runtime.cri_handler).await?;
    let steps = async {
        let c = cri::container_config("web", image::BUSYBOX, &["sh", "-c", PAGE]);
        let id = cri.create_container(&pod, &c, &pod_config).await?;
        cri.start_container(&id).await?;
        let ip: Ipv4Addr = cri.pod_ip(&pod).await?.parse()?;
        println!("== pod IP {ip}; GET http://{ip}/index.html from the host:");
        let net = env.net.as_ref().ok_or("no pod network")?;
        let page = cni::http_get(net, ip, 80, "/index.html", Duration::from_secs(30)).await?;
        println!("{}", page.split("\r\n\r\n").nth(1).unwrap_or(&page).trim());
        let out = cri
            .exec_sync(&id, &["uname", "-a"], Duration::from_secs(30))
            .await?;
        println!("== exec uname -a in the pod: {}", out.stdout.trim());
        println!(
            "== host kernel:               {}",
            std::fs::read_to_string("/proc/version")?.trim()
        );
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    println!("== StopPodSandbox + RemovePodSandbox");
    let stopped = cri.stop_pod(&pod).await;
    let removed = cri.remove_pod(&pod).await;
    steps?;
    stopped?;
    removed?;
    Ok(())
}

#[tokio::main]
async fn main() {
    let run_dir = PathBuf::from(format!("/tmp/shjdemo{}", std::process::id()));
    let shim_dir = bins::binary("containerd-shim-shoji-v2")
        .parent()
        .unwrap()
        .to_path_buf();
    let runtime = Runtime::shoji(shim_dir, None, run_dir.clone());
    let result = async {
        let env = Env::start(Version::V1_7, &runtime, Some(NETWORK)).await?;
        let r = demo(&env).await;
        env.conclude(r).await
    }
    .await;
    let _ = std::fs::remove_dir(&run_dir);
    match result {
        Ok(()) => println!("== done: nothing left behind (checked)"),
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::exit(1);
        }
    }
}
