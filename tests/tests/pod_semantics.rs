//! What workloads on a real node rely on, run side by side on runc and on shoji (containerd 1.7 and 2.x, CRI)
//! with the same expectations: a pod's shared PID/IPC/UTS namespaces, its sysctls (an unprivileged user
//! serving on port 80), a privileged container's iptables (legacy and nft) with a REDIRECT that works,
//! writes larger than the pod's memory landing on the host's disk, and a sysctl that is not namespaced
//! refused; a dual-stack pod's IPv6 address, route and traffic. The one documented difference, a
//! hostNetwork pod, is checked on shoji alone.
//!
//! The iptables binaries are the host's (package iptables), bind-mounted read-only with its libraries
//! and run through the host's dynamic loader: no image has them and no registry is reachable here.
use std::{path::Path, time::Duration};

use shoji::hypervisor::HypervisorKind;
use shoji_tests::{
    backend, cni,
    containerd::Version,
    cri::{self, api},
    image::BUSYBOX,
    pods::{self, check, on, pod_security, security, sh, sh_ok, Pods},
    scenario::{self, Env, Runtime, ShojiRuntime},
    side_by_side,
};

const MIB: i64 = 1 << 20;

type Result<T = ()> = scenario::Result<T>;

/// [`on`] with a dual-stack pod network.
async fn on_dual_stack(
    runtime: &Runtime,
    version: Version,
    net: u8,
    scenario: impl AsyncFnOnce(&Env) -> Result,
) {
    let net = || Ok(Some(cni::Network::new(net)?.dual_stack()?));
    scenario::in_env_on(pods::TEST_LIMIT, version, runtime, net, scenario).await
}

fn namespaces(c: &mut api::ContainerConfig) -> &mut api::NamespaceOption {
    security(c)
        .namespace_options
        .get_or_insert_with(Default::default)
}

/// shareProcessNamespace, pod sysctls, and a container of its own PID namespace beside them.
async fn shared_namespaces_and_sysctls(env: &Env) -> Result {
    let net = env.net.as_ref().ok_or("needs a network")?;
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let mut cfg = cri::pod_config("shared", "shoji-test", work.path());
        pod_security(&mut cfg)
            .namespace_options
            .get_or_insert_with(Default::default)
            .pid = api::NamespaceMode::Pod as i32;
        cfg.linux.get_or_insert_with(Default::default).sysctls = [
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("kernel.shm_rmid_forced", "1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let pod = pods.run(&cfg).await?;

        let mut a = cri::container_config("a", BUSYBOX, &["sleep", "1001"]);
        let mut b = cri::container_config("b", BUSYBOX, &["sleep", "1002"]);
        let mut web =
            cri::container_config("web", BUSYBOX, &["httpd", "-f", "-p", "80", "-h", "/www"]);
        for c in [&mut a, &mut b, &mut web] {
            namespaces(c).pid = api::NamespaceMode::Pod as i32;
        }
        security(&mut web).run_as_user = Some(api::Int64Value { value: 1000 });
        let own = cri::container_config("own", BUSYBOX, &["sleep", "1003"]);
        let a = pods.start(&pod, &cfg, &a).await?;
        let b = pods.start(&pod, &cfg, &b).await?;
        let own = pods.start(&pod, &cfg, &own).await?;
        pods.start(&pod, &cfg, &web).await?;

        // One PID namespace: b sees a's process, and PID 1 is the pod's, not a container's.
        let procs = sh_ok(&cri, &b, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").await?;
        check(procs.contains("sleep 1001"), || {
            format!("b does not see a's process: {procs:?}")
        })?;
        let init = sh_ok(&cri, &b, "tr '\\0' ' ' < /proc/1/cmdline").await?;
        check(!init.contains("sleep 100"), || {
            format!("PID 1 of a shared PID namespace is a container's: {init:?}")
        })?;
        let ns = |id: String, kind: &'static str| {
            let cri = cri.clone();
            async move { sh_ok(&cri, &id, &format!("readlink /proc/self/ns/{kind}")).await }
        };
        for kind in ["pid", "ipc", "uts"] {
            let (na, nb) = (ns(a.clone(), kind).await?, ns(b.clone(), kind).await?);
            check(na == nb, || format!("{kind} namespace: a {na}, b {nb}"))?;
        }
        // /dev/shm is the pod's: what a writes, b reads (and own, of the pod's IPC, too).
        sh_ok(&cri, &a, "echo from-a > /dev/shm/probe").await?;
        for id in [&b, &own] {
            let got = sh_ok(&cri, id, "cat /dev/shm/probe; df -k /dev/shm | tail -1").await?;
            check(
                got.starts_with("from-a\n") && got.contains(" 65536 "),
                || format!("/dev/shm in {id}: want a's file on a 64 MiB tmpfs, got {got:?}"),
            )?;
        }
        // A container without shareProcessNamespace has its own PID namespace, still the pod's IPC.
        let (pa, po) = (ns(a.clone(), "pid").await?, ns(own.clone(), "pid").await?);
        check(pa != po, || format!("own PID namespace is the pod's: {po}"))?;
        let (ia, io) = (ns(a.clone(), "ipc").await?, ns(own.clone(), "ipc").await?);
        check(ia == io, || format!("IPC namespace: a {ia}, own {io}"))?;

        // The pod's sysctls, and what they are for: uid 1000 serves on port 80.
        for (file, want) in [
            ("net/ipv4/ip_unprivileged_port_start", "0"),
            ("kernel/shm_rmid_forced", "1"),
        ] {
            let got = sh_ok(&cri, &b, &format!("cat /proc/sys/{file}")).await?;
            check(got == want, || {
                format!("sysctl {file} = {got}, want {want}")
            })?;
        }
        let ip: std::net::Ipv4Addr = cri.pod_ip(&pod).await?.parse()?;
        let resp = cni::http_get(net, ip, 80, "/index.html", Duration::from_secs(30)).await?;
        check(resp.contains("shoji busybox httpd"), || {
            format!("uid 1000 on port 80 answered {resp:?}")
        })?;

        // A sysctl that would set the whole kernel is refused, naming it.
        let mut bad = cri::pod_config("unsafe", "shoji-test", work.path());
        bad.linux.get_or_insert_with(Default::default).sysctls =
            [("kernel.panic".to_string(), "1".to_string())].into();
        match pods.run(&bad).await {
            Ok(id) => Err(format!("a pod with sysctl kernel.panic started: {id}").into()),
            Err(e) => check(e.to_string().contains("kernel.panic"), || {
                format!("the refusal does not name the sysctl: {e}")
            }),
        }
    })
    .await
}

/// A container's memory limit (bytes) and CPU quota (µs per period; "max": none), as it reads
/// them from its cgroup (v2 in shoji's guest, v1 or v2 on the host).
const LIMITS: &str = "if [ -f /sys/fs/cgroup/memory.max ]; then cat /sys/fs/cgroup/memory.max; \
    cut -d' ' -f1 /sys/fs/cgroup/cpu.max; else cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
    cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; fi";

fn resources(cpu_millis: i64, memory_mib: i64) -> api::LinuxContainerResources {
    api::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: cpu_millis * 100,
        memory_limit_in_bytes: memory_mib * MIB,
        ..Default::default()
    }
}

/// UpdateContainerResources within the pod's size: the container's cgroup follows.
async fn update_resources(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let mut cfg = cri::pod_config("resize", "shoji-test", work.path());
        cfg.linux.get_or_insert_with(Default::default).resources = Some(resources(1000, 256));
        let pod = pods.run(&cfg).await?;
        let mut c = cri::container_config("c", BUSYBOX, &["sleep", "1000"]);
        c.linux.get_or_insert_with(Default::default).resources = Some(resources(500, 64));
        let c = pods.start(&pod, &cfg, &c).await?;
        let got = sh_ok(&cri, &c, LIMITS).await?;
        check(got == format!("{}\n50000", 64 * MIB), || {
            format!("limits at create: {got:?}")
        })?;
        cri.update_container_resources(&c, resources(1000, 96))
            .await?;
        let got = sh_ok(&cri, &c, LIMITS).await?;
        check(got == format!("{}\n100000", 96 * MIB), || {
            format!("limits after the update: {got:?}")
        })
    })
    .await
}

/// Where the host's iptables and its libraries are mounted in the container.
const HOST_SBIN: &str = "/host/sbin";
const HOST_LIB: &str = "/host/lib";

/// Runs the host's `<multi> iptables <args>` (xtables-legacy-multi or xtables-nft-multi); it
/// takes its lock in /run, which the image has not.
fn iptables(multi: &str, args: &str) -> String {
    format!(
        "mkdir -p /run && XTABLES_LIBDIR={HOST_LIB}/xtables {HOST_LIB}/ld-linux-x86-64.so.2 --library-path {HOST_LIB} \
         {HOST_SBIN}/{multi} iptables {args}"
    )
}

/// A privileged container's iptables, legacy and nft, and a REDIRECT the host's traffic takes; a
/// writable layer larger than the pod's memory (on the host's disk, in containerd's snapshot).
async fn privileged_netfilter_and_big_writes(env: &Env) -> Result {
    let net = env.net.as_ref().ok_or("needs a network")?;
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let snapshots = env
        .ctrd
        .dir()
        .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let mut cfg = cri::pod_config("netadmin", "shoji-test", work.path());
        pod_security(&mut cfg).privileged = true;
        cfg.linux.get_or_insert_with(Default::default).resources =
            Some(api::LinuxContainerResources {
                // The VM: this plus the 64 MiB guest overhead, 256 MiB.
                memory_limit_in_bytes: 192 * MIB,
                ..Default::default()
            });
        let pod = pods.run(&cfg).await?;
        let mut admin = cri::container_config("admin", BUSYBOX, &["sleep", "1000"]);
        security(&mut admin).privileged = true;
        admin.mounts = vec![
            cri::host_mount(HOST_SBIN, Path::new("/usr/sbin"), true),
            cri::host_mount(HOST_LIB, Path::new("/usr/lib/x86_64-linux-gnu"), true),
        ];
        let web =
            cri::container_config("web", BUSYBOX, &["httpd", "-f", "-p", "8080", "-h", "/www"]);
        let admin = pods.start(&pod, &cfg, &admin).await?;
        pods.start(&pod, &cfg, &web).await?;

        // Both iptables flavours add and list rules in the pod's network.
        for (multi, table, rule) in [
            (
                "xtables-legacy-multi",
                "nat",
                "-A POSTROUTING -s 10.250.0.0/16 -j MASQUERADE",
            ),
            (
                "xtables-legacy-multi",
                "nat",
                "-A PREROUTING -p tcp -m tcp --dport 9999 -j REDIRECT --to-ports 8080",
            ),
            (
                "xtables-nft-multi",
                "filter",
                "-A INPUT -p tcp -m tcp --dport 7777 -j DROP",
            ),
        ] {
            sh_ok(
                &cri,
                &admin,
                &iptables(multi, &format!("-t {table} {rule}")),
            )
            .await?;
            let rules = sh_ok(&cri, &admin, &iptables(multi, &format!("-t {table} -S"))).await?;
            check(rules.lines().any(|l| l == rule), || {
                format!("{multi} -t {table}: {rule:?} not in {rules:?}")
            })?;
        }
        // The REDIRECT works: the host's request to port 9999 reaches httpd on 8080.
        let ip: std::net::Ipv4Addr = cri.pod_ip(&pod).await?.parse()?;
        let resp = cni::http_get(net, ip, 9999, "/index.html", Duration::from_secs(30)).await?;
        check(resp.contains("shoji busybox httpd"), || {
            format!("port 9999 redirected to 8080 answered {resp:?}")
        })?;

        // 400 MiB into the container's own filesystem of a 256 MiB VM: it lands on the host.
        let name = format!("shoji-big-{}", std::process::id());
        let out = sh(
            &cri,
            &admin,
            &format!("dd if=/dev/zero of=/{name} bs=1M count=400 conv=fsync 2>&1 && ls -l /{name}"),
        )
        .await?;
        check(
            out.exit_code == 0 && out.stdout.contains(" 419430400 "),
            || format!("400 MiB write in a 256 MiB VM: {out:?}"),
        )?;
        let on_host = std::fs::read_dir(&snapshots)?
            .filter_map(|e| std::fs::metadata(e.ok()?.path().join("fs").join(&name)).ok())
            .map(|m| m.len())
            .collect::<Vec<_>>();
        check(on_host == [400 * MIB as u64], || {
            format!("the written file in containerd's snapshots: {on_host:?}")
        })?;
        sh_ok(&cri, &admin, &format!("rm /{name}")).await?;
        Ok(())
    })
    .await
}

/// A dual-stack pod: its IPv6 address and default route are the container's, and the host's IPv6
/// traffic reaches a server in it.
async fn dual_stack(env: &Env) -> Result {
    let net = env.net.as_ref().ok_or("needs a network")?;
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("dual", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let web =
            cri::container_config("web", BUSYBOX, &["httpd", "-f", "-p", "8080", "-h", "/www"]);
        let web = pods.start(&pod, &cfg, &web).await?;
        let status = cri.pod_status(&pod).await?;
        let ip6: std::net::Ipv6Addr = status
            .network
            .iter()
            .flat_map(|n| &n.additional_ips)
            .find_map(|ip| ip.ip.parse().ok())
            .ok_or_else(|| format!("no IPv6 pod address in {:?}", status.network))?;
        check(net.contains(ip6), || {
            format!("pod IPv6 {ip6} outside {}", net.subnet6())
        })?;
        let addrs = sh_ok(&cri, &web, "ip -6 addr show dev eth0").await?;
        check(addrs.contains(&format!("inet6 {ip6}/64")), || {
            format!("{ip6}/64 not on the container's eth0: {addrs:?}")
        })?;
        let routes = sh_ok(&cri, &web, "ip -6 route").await?;
        let default = format!("default via {} ", net.gateway6());
        check(routes.lines().any(|l| l.starts_with(&default)), || {
            format!("no {default:?} route in the container: {routes:?}")
        })?;
        let resp = cni::http_get(net, ip6, 8080, "/index.html", Duration::from_secs(30)).await?;
        check(resp.contains("shoji busybox httpd"), || {
            format!("[{ip6}]:8080 answered {resp:?}")
        })
    })
    .await
}

/// The host's OOM priority of what runs a container: with runc its own process, with shoji
/// the pod's VMM, which takes the lowest value among the pod's containers (kubelet's QoS
/// values: 1000 BestEffort, -997 Guaranteed, which containerd raises to its own at least).
async fn oom_priority(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    Pods::scenario(env, async |pods: &mut Pods| {
        let cri = pods.cri.clone();
        let cfg = cri::pod_config("oom", "shoji-test", work.path());
        let pod = pods.run(&cfg).await?;
        let adj_of = async |id: &str| -> Result<i32> {
            let pid = cri.container_pid(id).await?;
            Ok(std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))?
                .trim()
                .parse()?)
        };
        let asking = |name: &str, adj: i64| {
            let mut c = cri::container_config(name, BUSYBOX, &["sleep", "1000"]);
            c.linux.get_or_insert_with(Default::default).resources =
                Some(api::LinuxContainerResources {
                    oom_score_adj: adj,
                    ..Default::default()
                });
            c
        };
        let best_effort = pods.start(&pod, &cfg, &asking("besteffort", 1000)).await?;
        let got = adj_of(&best_effort).await?;
        check(got == 1000, || format!("a BestEffort container's host process has {got}"))?;
        // containerd (restrict_oom_score_adj) raises a value below its own to its own.
        let floor: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")?.trim().parse()?;
        let guaranteed = pods.start(&pod, &cfg, &asking("guaranteed", -997)).await?;
        let got = adj_of(&guaranteed).await?;
        check(got == floor.max(-997), || {
            format!("a Guaranteed container's host process has {got}")
        })?;
        cri.stop_container(&guaranteed, Duration::from_secs(1)).await?;
        cri.remove_container(&guaranteed).await?;
        let got = adj_of(&best_effort).await?;
        check(got == 1000, || {
            format!("once the Guaranteed container is gone, the BestEffort one's host process has {got}")
        })
    })
    .await
}

side_by_side!(shared_namespaces_and_sysctls, 221);
side_by_side!(privileged_netfilter_and_big_writes, 241);
side_by_side!(update_resources, 245);
side_by_side!(oom_priority, 196);
side_by_side!(dual_stack, 236, on_dual_stack);

/// An update the pod's VM cannot hold. Cloud Hypervisor grows the VM (`vm.resize`) and the
/// container gets its new limits. The documented difference of the QEMU backend: it cannot
/// resize a running VM, so the update is refused with the sizes named, and the container
/// keeps its limits.
#[tokio::test]
async fn an_update_beyond_the_vm_grows_it_or_is_refused() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V2, 226, async |env: &Env| {
        let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
        Pods::scenario(env, async |pods: &mut Pods| {
            let cri = pods.cri.clone();
            let mut cfg = cri::pod_config("toobig", "shoji-test", work.path());
            cfg.linux.get_or_insert_with(Default::default).resources = Some(resources(1000, 128));
            let pod = pods.run(&cfg).await?;
            let mut c = cri::container_config("c", BUSYBOX, &["sleep", "1000"]);
            c.linux.get_or_insert_with(Default::default).resources = Some(resources(1000, 128));
            let c = pods.start(&pod, &cfg, &c).await?;
            let update = cri
                .update_container_resources(&c, resources(1000, 512))
                .await;
            let got = sh_ok(&cri, &c, LIMITS).await?;
            match (backend::hypervisor(), update) {
                (HypervisorKind::Clh, Ok(())) => {
                    check(got == format!("{}\n100000", 512 * MIB), || {
                        format!("limits after the VM grew: {got:?}")
                    })
                }
                (HypervisorKind::Clh, Err(e)) => Err(format!("the VM did not grow: {e}").into()),
                (HypervisorKind::Qemu, Ok(())) => {
                    Err("a 512 MiB limit in a 192 MiB VM was accepted".into())
                }
                (HypervisorKind::Qemu, Err(e)) => {
                    check(e.to_string().contains("cannot resize a running VM"), || {
                        format!("the refusal does not say why: {e}")
                    })?;
                    check(got == format!("{}\n100000", 128 * MIB), || {
                        format!("limits after a refused update: {got:?}")
                    })
                }
            }
        })
        .await
    })
    .await
}

/// kubeadm's systemd cgroup driver: a pod parent that is a `.slice` makes containerd pass
/// `slice:cri-containerd:<id>`, and the VM runs in the scope runc's systemd driver would make
/// (`<slice levels>/cri-containerd-<id>.scope`); nothing of it is left after the pod.
async fn systemd_cgroup_path(env: &Env) -> Result {
    let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
    let slices = format!("shojitest.slice/shojitest-pod{}.slice", std::process::id());
    // The memory hierarchy (v1) or the unified one (v2): where kubelet reads the pod's memory.
    let root = Path::new("/sys/fs/cgroup");
    let memory = match root.join("cgroup.controllers").exists() {
        true => root.to_path_buf(),
        false => root.join("memory"),
    };
    Pods::scenario(env, async |pods: &mut Pods| {
        let mut cfg = cri::pod_config("systemd", "shoji-test", work.path());
        cfg.linux.get_or_insert_with(Default::default).cgroup_parent =
            format!("shojitest-pod{}.slice", std::process::id());
        let pod = pods.run(&cfg).await?;
        let c = cri::container_config("c", BUSYBOX, &["sleep", "1000"]);
        pods.start(&pod, &cfg, &c).await?;
        let scope = memory
            .join(&slices)
            .join(format!("cri-containerd-{pod}.scope"));
        let procs = std::fs::read_to_string(scope.join("cgroup.procs")).unwrap_or_default();
        let comms: Vec<String> = procs
            .lines()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .map(|c| c.trim().to_string())
            .collect();
        check(comms.iter().any(|c| c == backend::vmm_comm()), || {
            format!("{} holds {comms:?}, not the VM", scope.display())
        })
    })
    .await?;
    let left: Vec<_> = pods::host_cgroup_dirs()?
        .iter()
        .map(|h| h.join("shojitest.slice"))
        .filter(|d| d.exists())
        .collect();
    check(left.is_empty(), || format!("slices left: {left:?}"))
}

#[tokio::test]
async fn systemd_cgroup_path_containerd_1_7() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V1_7, 227, systemd_cgroup_path).await
}

#[tokio::test]
async fn systemd_cgroup_path_containerd_2() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V2, 228, systemd_cgroup_path).await
}

/// The documented difference: a VM cannot join the host's network namespace. RunPodSandbox fails
/// with the reason, and nothing is left behind (the leak check).
#[tokio::test]
async fn a_host_network_pod_is_refused_on_shoji() {
    let shoji = ShojiRuntime::new("");
    on(&shoji.runtime, Version::V2, 225, async |env: &Env| {
        let work = tempfile::Builder::new().prefix("shoji-pod-").tempdir()?;
        Pods::scenario(env, async |pods: &mut Pods| {
            let mut cfg = cri::pod_config("hostnet", "shoji-test", work.path());
            pod_security(&mut cfg)
                .namespace_options
                .get_or_insert_with(Default::default)
                .network = api::NamespaceMode::Node as i32;
            match pods.run(&cfg).await {
                Ok(id) => Err(format!("a hostNetwork pod started: {id}").into()),
                Err(e) => check(e.to_string().contains("hostNetwork"), || {
                    format!("the refusal does not say why: {e}")
                }),
            }
        })
        .await
    })
    .await
}
