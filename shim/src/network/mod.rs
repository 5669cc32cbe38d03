//! Pod networking: the pod's veth (made by CNI in the pod's network namespace) is bridged
//! to a tap device for the VM with tc redirects in both directions, and the guest NIC takes
//! the veth's MAC, addresses, routes and MTU, so the rest of the node sees the pod exactly
//! as CNI set it up.
//!
//! Only the u32 classifier is assumed (some kernels lack matchall/flower). The tap lives in
//! the pod's namespace, so it disappears with the namespace even if teardown never ran.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use shoji_agent_api::types::{ConfigureNetworkRequest, Interface, Route};
use tokio::process::Command;

mod netns;
mod tap;

pub use self::{
    netns::{enter_on_exec, in_netns},
    tap::{open_taps, pod_netns},
};

/// How long one `ip`/`tc` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("`{command}` did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout { command: String },
    #[error("cannot parse the output of `{command}`: {why}")]
    Parse { command: String, why: String },
    #[error("network namespace {0} does not exist")]
    NoNamespace(String),
    #[error("network namespace {0} is the host's: a VM is not plugged into the host network")]
    HostNamespace(String),
    #[error("all NICs of a VM must live in the same network namespace")]
    MixedNamespaces,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// A guest NIC backed by a tap device in the pod's network namespace.
#[derive(Debug, Clone)]
pub struct NetDevice {
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
    /// The network namespace the tap lives in (the VMM opens the tap there), if not the host's.
    pub netns: Option<PathBuf>,
}

/// Taps carry this prefix; a pod interface never does.
const TAP_PREFIX: &str = "shojitap";

/// The pod network as the VM needs it: the NICs to give the VMM, what to tell the agent,
/// and what is made on the host for it.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub devices: Vec<NetDevice>,
    pub guest: ConfigureNetworkRequest,
    pub bridges: Bridges,
}

/// What [`setup`] makes in the pod's namespace: one tap per pod interface, glued to it
/// with an ingress redirect each way. Serializable: the sandbox records it before it is
/// made, so a crash at any point can be undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridges {
    pub netns: PathBuf,
    pub links: Vec<Bridge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridge {
    /// The pod interface CNI made.
    pub ifname: String,
    pub tap: String,
    pub mtu: u32,
}

#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    family: String,
    local: String,
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

#[derive(Debug, Deserialize)]
struct RouteInfo {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: Option<String>,
}

/// Runs a command inside the namespace `netns` (nsenter), bounded by [`COMMAND_TIMEOUT`].
pub(crate) async fn run_in(netns: &Path, args: &[&str]) -> Result<String> {
    let command = args.join(" ");
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args)
        .kill_on_drop(true);
    let fail = |stderr: String| NetworkError::Command {
        command: command.clone(),
        stderr,
    };
    let out = tokio::time::timeout(COMMAND_TIMEOUT, output(cmd))
        .await
        .map_err(|_| NetworkError::Timeout {
            command: command.clone(),
        })?
        .map_err(|e| fail(e.to_string()))?;
    if out.code != 0 {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Output {
    code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `cmd` to completion with stdout and stderr captured. Inside the shim the framework's
/// SIGCHLD handler may reap the child before tokio does (wait then fails with ECHILD): the exit
/// code is then taken from the framework's exit monitor, subscribed to before the spawn.
async fn output(mut cmd: Command) -> std::io::Result<Output> {
    use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
    use containerd_shim::monitor::{Subject, Topic};
    use tokio::io::AsyncReadExt;
    let mut exits = monitor_subscribe(Topic::Pid)
        .await
        .map_err(std::io::Error::other)?;
    let result = async {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        let pid = child.id().map(|p| p as i32);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (mut o, mut e) = (child.stdout.take(), child.stderr.take());
        let read_out = async {
            match o.as_mut() {
                Some(o) => o.read_to_end(&mut out).await.map(drop),
                None => Ok(()),
            }
        };
        let read_err = async {
            match e.as_mut() {
                Some(e) => e.read_to_end(&mut err).await.map(drop),
                None => Ok(()),
            }
        };
        tokio::try_join!(read_out, read_err)?;
        let code = match child.wait().await {
            Ok(status) => status.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
            }),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => loop {
                let exit = exits
                    .rx
                    .recv()
                    .await
                    .ok_or(libc::ECHILD)
                    .map_err(std::io::Error::from_raw_os_error)?;
                if matches!(exit.subject, Subject::Pid(p) if Some(p) == pid) {
                    break exit.exit_code;
                }
            },
            Err(e) => return Err(e),
        };
        Ok(Output {
            code,
            stdout: out,
            stderr: err,
        })
    }
    .await;
    let _ = monitor_unsubscribe(exits.id).await;
    result
}

fn parse<T: serde::de::DeserializeOwned>(command: &str, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| NetworkError::Parse {
        command: command.into(),
        why: e.to_string(),
    })
}

/// Reads the pod namespace CNI populated and decides the VM's NICs: every Ethernet
/// interface gets a tap (see [`Bridges`]); the guest NIC takes its MAC, MTU, addresses and
/// routes. Nothing is changed yet: record [`PodNetwork::bridges`], then [`setup`].
pub async fn discover(netns: &Path) -> Result<PodNetwork> {
    if !netns.exists() {
        return Err(NetworkError::NoNamespace(netns.display().to_string()));
    }
    if same_namespace(netns, Path::new("/proc/self/ns/net")) {
        return Err(NetworkError::HostNamespace(netns.display().to_string()));
    }
    let links: Vec<Link> = parse(
        "ip -json addr show",
        &run_in(netns, &["ip", "-json", "addr", "show"]).await?,
    )?;
    let mut routes: Vec<RouteInfo> = parse(
        "ip -json route show",
        &run_in(netns, &["ip", "-json", "route", "show"]).await?,
    )?;
    let v6: Vec<RouteInfo> = parse(
        "ip -6 -json route show",
        &run_in(netns, &["ip", "-6", "-json", "route", "show"]).await?,
    )?;
    // Link-local and multicast routes the guest kernel makes itself for each interface.
    routes.extend(
        v6.into_iter()
            .filter(|r| !r.dst.starts_with("fe80:") && !r.dst.starts_with("ff00:")),
    );
    let mut net = PodNetwork {
        devices: Vec::new(),
        guest: ConfigureNetworkRequest::default(),
        bridges: Bridges {
            netns: netns.to_path_buf(),
            links: Vec::new(),
        },
    };
    let pod_links: Vec<&Link> = links
        .iter()
        .filter(|l| l.link_type == "ether" && !l.ifname.starts_with(TAP_PREFIX))
        .collect();
    for (i, link) in pod_links.iter().enumerate() {
        let tap = format!("{TAP_PREFIX}{i}");
        net.bridges.links.push(Bridge {
            ifname: link.ifname.clone(),
            tap: tap.clone(),
            mtu: link.mtu,
        });
        net.devices.push(NetDevice {
            tap,
            mac: link.address.clone(),
            mtu: link.mtu,
            netns: Some(netns.to_path_buf()),
        });
        net.guest.interfaces.push(Interface {
            name: link.ifname.clone(),
            mac: link.address.clone(),
            mtu: link.mtu,
            addresses: link
                .addr_info
                .iter()
                .filter(|a| (a.family == "inet" || a.family == "inet6") && a.scope != "link")
                .map(|a| format!("{}/{}", a.local, a.prefixlen))
                .collect(),
            ..Default::default()
        });
    }
    let names: Vec<&str> = pod_links.iter().map(|l| l.ifname.as_str()).collect();
    net.guest.routes = routes
        .into_iter()
        .filter(|r| r.dev.as_deref().is_none_or(|d| names.contains(&d)))
        .map(|r| Route {
            destination: r.dst,
            gateway: r.gateway.unwrap_or_default(),
            device: r.dev.unwrap_or_default(),
            ..Default::default()
        })
        .collect();
    Ok(net)
}

/// Whether two namespace files name the same namespace.
fn same_namespace(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Makes the taps and redirects of `bridges`. On error, what was made is removed again.
pub async fn setup(bridges: &Bridges) -> Result<()> {
    for b in &bridges.links {
        if let Err(e) = bridge(&bridges.netns, b).await {
            teardown(bridges).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Glues pod interface `ifname` to tap `tap` (created if missing) with an ingress redirect
/// each way.
async fn bridge(netns: &Path, b: &Bridge) -> Result<()> {
    let (ifname, tap, mtu) = (b.ifname.as_str(), b.tap.as_str(), b.mtu);
    // `ip tuntap add` fails if the tap exists: a previous attempt left it, so reuse it.
    if run_in(netns, &["ip", "link", "show", tap]).await.is_err() {
        run_in(netns, &["ip", "tuntap", "add", "dev", tap, "mode", "tap"]).await?;
    }
    run_in(
        netns,
        &["ip", "link", "set", tap, "mtu", &mtu.to_string(), "up"],
    )
    .await?;
    for (from, to) in [(ifname, tap), (tap, ifname)] {
        // Replace semantics: drop any earlier ingress qdisc (and its filters) first.
        let _ = run_in(netns, &["tc", "qdisc", "del", "dev", from, "ingress"]).await;
        run_in(netns, &["tc", "qdisc", "add", "dev", from, "ingress"]).await?;
        run_in(
            netns,
            &[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Removes the taps and redirects of `bridges`. Idempotent: a namespace or device that is
/// already gone counts as removed (the taps die with the namespace anyway).
pub async fn teardown(bridges: &Bridges) {
    if !bridges.netns.exists() {
        return;
    }
    for b in &bridges.links {
        let _ = run_in(
            &bridges.netns,
            &["tc", "qdisc", "del", "dev", &b.ifname, "ingress"],
        )
        .await;
        let _ = run_in(&bridges.netns, &["ip", "link", "del", &b.tap]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod namespace as CNI's bridge plugin leaves it: a veth with an address and a default route.
    struct TestNs {
        name: String,
        path: std::path::PathBuf,
    }

    impl TestNs {
        fn new(tag: &str) -> TestNs {
            let name = format!("shoji-nt-{tag}-{}", std::process::id());
            let sh = |args: &[&str]| {
                let ok = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(ok, "ip {args:?} failed");
            };
            sh(&["netns", "add", &name]);
            let peer = format!("snt{}", std::process::id() % 100000);
            sh(&[
                "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ]);
            sh(&["-n", &name, "link", "set", "eth0", "mtu", "1400", "up"]);
            sh(&["-n", &name, "addr", "add", "10.233.250.5/24", "dev", "eth0"]);
            sh(&[
                "-n",
                &name,
                "route",
                "add",
                "default",
                "via",
                "10.233.250.1",
            ]);
            TestNs {
                path: format!("/run/netns/{name}").into(),
                name,
            }
        }
    }

    impl Drop for TestNs {
        // Deleting the namespace deletes eth0, and with it the veth's host end.
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &self.name])
                .status();
        }
    }

    #[tokio::test]
    async fn veth_is_bridged_to_a_tap_with_its_mac_address_and_routes() {
        let ns = TestNs::new("setup");
        let net = discover(&ns.path).await.unwrap();
        setup(&net.bridges).await.unwrap();
        assert_eq!(net.devices.len(), 1);
        let dev = &net.devices[0];
        assert_eq!(dev.tap, "shojitap0");
        assert_eq!(dev.mtu, 1400);
        let iface = &net.guest.interfaces[0];
        assert_eq!(iface.name, "eth0");
        assert_eq!(iface.mac, dev.mac);
        assert_eq!(iface.addresses, vec!["10.233.250.5/24".to_string()]);
        assert!(net
            .guest
            .routes
            .iter()
            .any(|r| r.destination == "default" && r.gateway == "10.233.250.1"));
        let filters = run_in(
            &ns.path,
            &["tc", "filter", "show", "dev", "eth0", "ingress"],
        )
        .await
        .unwrap();
        assert!(
            filters.contains("shojitap0"),
            "no redirect to the tap: {filters}"
        );
        // Setting up again (a retried boot) reuses what is there.
        setup(&net.bridges).await.unwrap();
        teardown(&net.bridges).await;
        assert!(
            run_in(&ns.path, &["ip", "link", "show", "shojitap0"])
                .await
                .is_err(),
            "tap left behind"
        );
        teardown(&net.bridges).await;
    }

    #[tokio::test]
    async fn a_missing_or_host_namespace_is_refused() {
        let err = discover(Path::new("/run/netns/shoji-no-such-ns"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("shoji-no-such-ns"), "{err}");
        let err = discover(Path::new("/proc/self/ns/net")).await.unwrap_err();
        assert!(matches!(err, NetworkError::HostNamespace(_)), "{err}");
    }
}
