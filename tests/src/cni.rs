//! A CNI network only one test uses: bridge `shojitest<n>` + host-local IPAM on 10.233.<n>.0/24 (and, dual
//! stack, fd00:233:<n in hex>::/64), the bridge as gateway (so the host reaches pod IPs directly), no masquerade,
//! IPAM state in the network's own temp dir.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cni: network number {0} out of range 1..=250")]
    BadNumber(u8),
    #[error("cni: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cni: `ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
}

/// A test's pod network. `teardown()` removes the bridge and the conf/IPAM dir; `Drop` does the same.
pub struct Network {
    number: u8,
    dual_stack: bool,
    dir: Option<tempfile::TempDir>,
}

impl Network {
    /// Creates the conflist for network `number` (1..=250) in a fresh conf dir (give it to containerd as
    /// `Options::cni_conf_dir`). A bridge of the same name left by a crashed run is removed first.
    pub fn new(number: u8) -> Result<Network, Error> {
        if !(1..=250).contains(&number) {
            return Err(Error::BadNumber(number));
        }
        let dir = tempfile::Builder::new()
            .prefix("shoji-cni-")
            .tempdir()
            .map_err(|source| Error::Io {
                what: "create conf dir".into(),
                source,
            })?;
        let net = Network {
            number,
            dual_stack: false,
            dir: Some(dir),
        };
        net.delete_bridge()?;
        fs::create_dir_all(net.conf_dir()).map_err(|source| Error::Io {
            what: "create net.d".into(),
            source,
        })?;
        net.write_conflist()?;
        Ok(net)
    }

    pub fn bridge(&self) -> String {
        format!("shojitest{}", self.number)
    }

    pub fn subnet(&self) -> String {
        format!("10.233.{}.0/24", self.number)
    }

    /// The bridge's (gateway's) address, where host-side traffic to pods comes from.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 233, self.number, 1)
    }

    /// Pods also get an IPv6 address from [`Network::subnet6`] and an IPv6 default route.
    pub fn dual_stack(mut self) -> Result<Network, Error> {
        self.dual_stack = true;
        self.write_conflist()?;
        Ok(self)
    }

    pub fn subnet6(&self) -> String {
        format!("fd00:233:{:x}::/64", self.number)
    }

    /// The bridge's IPv6 address (dual stack only).
    pub fn gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x233, self.number.into(), 0, 0, 0, 0, 1)
    }

    /// Whether `ip` belongs to this network (tests talk only to addresses they created).
    pub fn contains(&self, ip: impl Into<IpAddr>) -> bool {
        match ip.into() {
            IpAddr::V4(ip) => {
                let [a, b, c, _] = ip.octets();
                (a, b, c) == (10, 233, self.number)
            }
            IpAddr::V6(ip) => {
                self.dual_stack && ip.segments()[..4] == [0xfd00, 0x233, self.number.into(), 0]
            }
        }
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("dir exists until teardown").path()
    }

    /// The directory containerd watches for conflists.
    pub fn conf_dir(&self) -> PathBuf {
        self.root().join("net.d")
    }

    fn write_conflist(&self) -> Result<(), Error> {
        let mut ranges = vec![serde_json::json!([{"subnet": self.subnet()}])];
        let mut routes = vec![serde_json::json!({"dst": "0.0.0.0/0"})];
        if self.dual_stack {
            ranges.push(serde_json::json!([{"subnet": self.subnet6()}]));
            routes.push(serde_json::json!({"dst": "::/0"}));
        }
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.bridge(),
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge(),
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": self.root().join("ipam"),
                },
            }],
        });
        // Write then rename: containerd's watcher may read a half-written file otherwise.
        let tmp = self.root().join("conflist.tmp");
        let dst = self.conf_dir().join("10-shojitest.conflist");
        fs::write(&tmp, serde_json::to_vec_pretty(&conf).expect("json")).map_err(|source| {
            Error::Io {
                what: format!("write {}", tmp.display()),
                source,
            }
        })?;
        fs::rename(&tmp, &dst).map_err(|source| Error::Io {
            what: format!("rename to {}", dst.display()),
            source,
        })
    }

    fn delete_bridge(&self) -> Result<(), Error> {
        if !Path::new("/sys/class/net").join(self.bridge()).exists() {
            return Ok(());
        }
        let args = ["link", "del", &self.bridge()];
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|source| Error::Io {
                what: "run ip".into(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // "Cannot find device": already gone is success.
        if out.status.success() || stderr.contains("Cannot find device") {
            Ok(())
        } else {
            Err(Error::Ip {
                args: args.join(" "),
                stderr: stderr.into_owned(),
            })
        }
    }

    /// Removes the bridge (pod veths go with their netns, which containerd keeps under its state dir) and the
    /// conf/IPAM dir. Idempotent.
    pub fn teardown(mut self) -> Result<(), Error> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<(), Error> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        let bridge = self.delete_bridge();
        let path = dir.path().to_path_buf();
        dir.close().map_err(|source| Error::Io {
            what: format!("remove {}", path.display()),
            source,
        })?;
        bridge
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!("cni teardown (drop): {e}");
        }
    }
}

/// GET `path` from `ip:port` with HTTP/1.0, retrying until an answer or `limit`; refuses addresses outside
/// `net`. Returns the whole response (status line, headers, body).
pub async fn http_get(
    net: &Network,
    ip: impl Into<IpAddr>,
    port: u16,
    path: &str,
    limit: Duration,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip = ip.into();
    if !net.contains(ip) {
        return Err(format!("{ip} is not in the test network {}", net.subnet()));
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect((ip, port)).await?;
            let host = std::net::SocketAddr::new(ip, port);
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
                .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(resp)) if !resp.is_empty() => return Ok(resp),
            Ok(Ok(_)) => last = "empty response".into(),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "attempt timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "no HTTP answer from {ip}:{port} within {limit:?}: {last}"
    ))
}
