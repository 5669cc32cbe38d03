//! The CI use case end to end: a privileged pod runs a nested container runtime (Debian's containerd,
//! runc and CNI plugins, the host's packages bind-mounted read-only: no registry is reachable here), which
//! starts a nested container on its own bridge network with NAT. The nested container fetches a page from
//! another pod; that pod's httpd log shows the request coming from the builder pod's address, so the
//! nested traffic was masqueraded inside the VM. docs/operating.md has the same steps as a recipe.
use std::{path::Path, time::Duration};

use shoji_tests::{
    containerd::Version,
    cri::{self, api},
    image::{self, BUSYBOX},
    pods::{check, security, Pods},
    scenario::{self, Env, ShojiRuntime},
};

const TEST_LIMIT: Duration = Duration::from_secs(600);
/// The nested runtime's start, image import and run, under TCG.
const NESTED: Duration = Duration::from_secs(300);
const MIB: i64 = 1 << 20;

type Result<T = ()> = scenario::Result<T>;

/// What the builder container runs: the host's runtime binaries made runnable (their libraries and
/// loader, iptables under its usual names), cgroup v2 prepared as Docker-in-Docker does (its own
/// processes moved to a leaf so the nested runtime can enable controllers), a nested containerd on
/// tmpfs, and a nested container on the CNI bridge `nested0` with ipMasq fetching `http://$WEB:8080/`.
const BUILDER: &str = r#"set -e
export PATH=/usr/local/sbin:/host/bin:/host/sbin:/bin
mkdir -p /lib /usr/local/sbin /etc/cni/net.d /var/lib/nested /run/nested
ln -sfn /usr/lib/x86_64-linux-gnu /lib/x86_64-linux-gnu
for t in iptables iptables-save iptables-restore; do ln -sf /host/sbin/xtables-nft-multi /usr/local/sbin/$t; done
mount -t tmpfs tmpfs /var/lib/nested
mkdir -p /sys/fs/cgroup/init
for p in $(cat /sys/fs/cgroup/cgroup.procs); do echo $p > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || true; done
sed -e 's/ / +/g' -e 's/^/+/' /sys/fs/cgroup/cgroup.controllers > /sys/fs/cgroup/cgroup.subtree_control
cat > /etc/cni/net.d/10-nested.conflist <<EOF
{"cniVersion": "1.0.0", "name": "nested", "plugins": [{"type": "bridge", "bridge": "nested0",
 "isGateway": true, "ipMasq": true, "ipam": {"type": "host-local",
 "ranges": [[{"subnet": "10.88.77.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
cat > /etc/nested.toml <<EOF
version = 2
root = "/var/lib/nested"
state = "/run/nested"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/run/nested/containerd.sock"
EOF
containerd --config /etc/nested.toml > /tmp/nested.log 2>&1 &
ctr="ctr -a /run/nested/containerd.sock -n nested"
i=0; until $ctr version > /dev/null 2>&1; do
  i=$((i+1)); [ $i -lt 240 ] || { tail -20 /tmp/nested.log; exit 1; }; sleep 0.5
done
$ctr images import /images/busybox.tar > /dev/null
$ctr run --rm --cni localhost/shoji/busybox:test nested1 sh -c \
  "ip -4 -o addr show eth0; printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 20 $WEB 8080"
echo "--- nat"
iptables -t nat -S
"#;

async fn nested_runtime(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-nested-").tempdir()?;
    let archive = image::busybox_archive()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let web_cfg = cri::pod_config("web", "shoji-test", work.path());
        let web_pod = pods.run(&web_cfg).await?;
        let web = cri::container_config(
            "web",
            BUSYBOX,
            &["httpd", "-f", "-vv", "-p", "8080", "-h", "/www"],
        );
        pods.start(&web_pod, &web_cfg, &web).await?;

        let mut cfg = cri::pod_config("builder", "shoji-test", work.path());
        let linux = cfg.linux.get_or_insert_with(Default::default);
        linux
            .security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
        linux.resources = Some(api::LinuxContainerResources {
            memory_limit_in_bytes: 512 * MIB,
            ..Default::default()
        });
        let pod = pods.run(&cfg).await?;
        let mut builder = cri::container_config("builder", BUSYBOX, &["sleep", "1000"]);
        security(&mut builder).privileged = true;
        builder.mounts = vec![
            cri::host_mount("/host/bin", Path::new("/usr/bin"), true),
            cri::host_mount("/host/sbin", Path::new("/usr/sbin"), true),
            cri::host_mount(
                "/usr/lib/x86_64-linux-gnu",
                Path::new("/usr/lib/x86_64-linux-gnu"),
                true,
            ),
            cri::host_mount("/lib64", Path::new("/lib64"), true),
            cri::host_mount("/opt/cni/bin", Path::new("/usr/lib/cni"), true),
            cri::host_mount("/images/busybox.tar", &archive, true),
        ];
        let builder = pods.start(&pod, &cfg, &builder).await?;

        let web_ip = cri.pod_ip(&web_pod).await?;
        let builder_ip = cri.pod_ip(&pod).await?;
        let script = format!("WEB={web_ip}\n{BUILDER}");
        let out = cri
            .exec_sync(&builder, &["sh", "-c", &script], NESTED)
            .await?;
        check(out.exit_code == 0, || {
            format!("the nested runtime failed: {out:?}")
        })?;
        let (run, nat) = out
            .stdout
            .split_once("--- nat")
            .unwrap_or((&out.stdout, ""));
        check(
            run.contains("inet 10.88.77.") && run.contains("shoji busybox httpd"),
            || format!("the nested container (on nested0) did not get the page: {run:?}"),
        )?;
        check(nat.contains("MASQUERADE"), || {
            format!("no NAT rule: {nat:?}")
        })?;
        // The web pod saw the builder pod's address: the nested address was masqueraded.
        let log = std::fs::read_to_string(work.path().join("web.log"))?;
        let seen: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("url:/index.html"))
            .collect();
        check(
            seen.iter().any(|l| l.contains(&builder_ip)) && !log.contains("10.88.77."),
            || format!("web saw {seen:?}, want requests from {builder_ip} only"),
        )
    })
    .await
}

async fn on(version: Version, net: u8) {
    let shoji = ShojiRuntime::new("");
    scenario::in_env(
        TEST_LIMIT,
        version,
        &shoji.runtime,
        Some(net),
        nested_runtime,
    )
    .await
}

#[tokio::test]
async fn nested_runtime_with_bridge_and_nat_containerd_1_7() {
    on(Version::V1_7, 218).await
}

#[tokio::test]
async fn nested_runtime_with_bridge_and_nat_containerd_2() {
    on(Version::V2, 219).await
}
