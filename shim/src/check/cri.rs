//! The running containerd, as `shoji check` asks it over its socket: whether its CRI plugin
//! loaded (if not, the reason its introspection service gives) and the runtime handlers CRI
//! knows, against the shoji handlers the configuration files name (a restart loads those).
use std::{collections::BTreeMap, path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{runtime_service_client::RuntimeServiceClient, StatusRequest, VersionRequest};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Check, Verdict};
use crate::containerd::RUNTIME_TYPE;

/// containerd's socket when its configuration names none.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Bound of the connection and of each call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The part of containerd's introspection API this check reads
/// (`api/services/introspection/v1/introspection.proto`; other fields are skipped).
mod introspection {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginsRequest {
        #[prost(string, repeated, tag = "1")]
        pub filters: Vec<String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginsResponse {
        #[prost(message, repeated, tag = "1")]
        pub plugins: Vec<Plugin>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Plugin {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(string, tag = "2")]
        pub id: String,
        #[prost(message, optional, tag = "7")]
        pub init_err: Option<RpcStatus>,
    }
    /// google.rpc.Status
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RpcStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }
    pub const PLUGINS: &str = "/containerd.services.introspection.v1.Introspection/Plugins";
}

/// What the running containerd says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Nothing answers at the address.
    Down(String),
    /// containerd runs, its CRI service does not: why.
    CriFailed(String),
    Up(Cri),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cri {
    /// containerd's version as CRI reports it.
    pub version: String,
    pub default_runtime: String,
    /// Handler name → runtime type.
    pub handlers: BTreeMap<String, String>,
}

async fn bounded<T, E: std::error::Error>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
        Ok(Err(e)) => {
            // tonic's transport errors say what failed only in their sources.
            let mut text = format!("{what}: {e}");
            let (mut source, mut last) = (e.source(), e.to_string());
            while let Some(s) = source {
                let s_text = s.to_string();
                if s_text != last {
                    text += &format!(": {s_text}");
                }
                (source, last) = (s.source(), s_text);
            }
            Err(text)
        }
        Ok(Ok(v)) => Ok(v),
    }
}

async fn connect(address: &Path) -> Result<Channel, String> {
    let path = address.to_path_buf();
    let endpoint = Endpoint::from_static("http://[::]:0")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let connecting = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
        }
    }));
    bounded("connect", connecting).await
}

/// Asks containerd at `address`.
pub async fn query(address: &Path) -> State {
    let channel = match connect(address).await {
        Ok(c) => c,
        Err(e) => return State::Down(e),
    };
    let mut cri = RuntimeServiceClient::new(channel.clone());
    let version = match bounded("CRI Version", cri.version(VersionRequest::default())).await {
        Ok(v) => v.into_inner(),
        Err(e) => return State::CriFailed(plugin_error(channel).await.unwrap_or(e)),
    };
    let status = bounded("CRI Status", cri.status(StatusRequest { verbose: true })).await;
    match status.and_then(|s| parse_config(&s.into_inner().info)) {
        Ok((default_runtime, handlers)) => State::Up(Cri {
            version: version.runtime_version,
            default_runtime,
            handlers,
        }),
        Err(e) => State::CriFailed(e),
    }
}

/// The init error of the CRI plugins (2.x splits CRI into `io.containerd.cri.v1.*` plugins
/// that `io.containerd.grpc.v1 cri` needs): the first one reported, innermost first.
async fn plugin_error(channel: Channel) -> Option<String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    bounded("introspection", grpc.ready()).await.ok()?;
    let codec = tonic_prost::ProstCodec::<
        introspection::PluginsRequest,
        introspection::PluginsResponse,
    >::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(introspection::PLUGINS);
    let request = tonic::Request::new(introspection::PluginsRequest::default());
    let plugins = bounded("introspection", grpc.unary(request, path, codec))
        .await
        .ok()?
        .into_inner()
        .plugins;
    let failed = |p: &&introspection::Plugin| p.init_err.as_ref().is_some_and(|e| e.code != 0);
    let cri = |p: &&introspection::Plugin| p.r#type.starts_with("io.containerd.cri.");
    let grpc_cri =
        |p: &&introspection::Plugin| p.r#type == "io.containerd.grpc.v1" && p.id == "cri";
    let plugin = plugins
        .iter()
        .filter(failed)
        .find(cri)
        .or_else(|| plugins.iter().filter(failed).find(grpc_cri))?;
    let message = &plugin.init_err.as_ref()?.message;
    Some(format!("{}.{}: {message}", plugin.r#type, plugin.id))
}

/// The default runtime and the handlers from CRI's verbose Status (`info["config"]`: CRI's
/// configuration as JSON, in 1.6, 1.7 and 2.x alike).
fn parse_config(
    info: &std::collections::HashMap<String, String>,
) -> Result<(String, BTreeMap<String, String>), String> {
    let text = info
        .get("config")
        .ok_or("CRI Status: no config in its verbose info")?;
    let config: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("CRI Status: config: {e}"))?;
    let containerd = &config["containerd"];
    let handlers = containerd["runtimes"]
        .as_object()
        .ok_or("CRI Status: config without containerd.runtimes")?
        .iter()
        .map(|(name, rt)| {
            let ty = rt["runtimeType"].as_str().unwrap_or_default().to_string();
            (name.clone(), ty)
        })
        .collect();
    let default = containerd["defaultRuntimeName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((default, handlers))
}

/// The `containerd CRI` line for `state`; `configured`: the shoji handlers the configuration
/// files name.
pub fn line(state: &State, address: &Path, configured: &[String]) -> Check {
    let check = |verdict, detail: String, fix: Option<&str>| Check {
        name: "containerd CRI",
        verdict,
        detail,
        fix: fix.map(String::from),
    };
    let cri = match state {
        State::Down(e) => {
            return check(
                Verdict::Warn,
                format!("containerd does not answer at {}: {e}", address.display()),
                Some("start containerd (or name its socket with --containerd-address), then check again"),
            )
        }
        State::CriFailed(why) => {
            return check(
                Verdict::Missing,
                format!("the CRI plugin did not load: {why}"),
                Some("`containerd config dump` shows the configuration containerd read; `hack/install.sh --uninstall` restores the file it changed; restart containerd"),
            )
        }
        State::Up(cri) => cri,
    };
    let listed: Vec<String> = cri
        .handlers
        .iter()
        .map(|(name, ty)| match name == &cri.default_runtime {
            true => format!("{name} ({ty}, default)"),
            false => format!("{name} ({ty})"),
        })
        .collect();
    let detail = format!(
        "containerd {} at {}: CRI loaded, handlers {}",
        cri.version,
        address.display(),
        listed.join(", ")
    );
    let unloaded: Vec<&str> = configured
        .iter()
        .filter(|h| cri.handlers.get(*h).map(String::as_str) != Some(RUNTIME_TYPE))
        .map(String::as_str)
        .collect();
    if !unloaded.is_empty() {
        return check(
            Verdict::Warn,
            format!("{detail}; not loaded yet: {}", unloaded.join(", ")),
            Some("restart containerd to load the handlers of its configuration files"),
        );
    }
    if !cri.handlers.values().any(|ty| ty == RUNTIME_TYPE) {
        return check(
            Verdict::Warn,
            format!("{detail}; none is shoji's ({RUNTIME_TYPE})"),
            Some("hack/install.sh, then restart containerd"),
        );
    }
    check(Verdict::Ok, detail, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(handlers: &[(&str, &str)]) -> State {
        State::Up(Cri {
            version: "v1.7.24".into(),
            default_runtime: "runc".into(),
            handlers: handlers
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        })
    }

    #[test]
    fn cri_config_from_a_verbose_status() {
        let info = [(
            "config".to_string(),
            r#"{"containerd":{"defaultRuntimeName":"runc","runtimes":{
                "runc":{"runtimeType":"io.containerd.runc.v2"},
                "shoji-qemu":{"runtimeType":"io.containerd.shoji.v2"}}}}"#
                .to_string(),
        )]
        .into();
        let (default, handlers) = parse_config(&info).unwrap();
        assert_eq!(default, "runc");
        assert_eq!(handlers["shoji-qemu"], RUNTIME_TYPE);
        assert!(parse_config(&Default::default()).is_err());
    }

    #[test]
    fn verdicts() {
        let addr = Path::new("/run/containerd/containerd.sock");
        let configured = ["shoji".to_string(), "shoji-qemu".to_string()];
        let all = up(&[
            ("runc", "io.containerd.runc.v2"),
            ("shoji", RUNTIME_TYPE),
            ("shoji-qemu", RUNTIME_TYPE),
        ]);
        let ok = line(&all, addr, &configured);
        assert_eq!(ok.verdict, Verdict::Ok, "{ok}");
        assert!(
            ok.detail
                .contains("runc (io.containerd.runc.v2, default), shoji (io.containerd.shoji.v2)"),
            "{ok}"
        );
        let stale = line(&up(&[("runc", "io.containerd.runc.v2")]), addr, &configured);
        assert_eq!(stale.verdict, Verdict::Warn);
        assert!(
            stale.detail.ends_with("not loaded yet: shoji, shoji-qemu"),
            "{stale}"
        );
        let none = line(&up(&[("runc", "io.containerd.runc.v2")]), addr, &[]);
        assert!(none.detail.contains("none is shoji's"), "{none}");
        let failed = line(&State::CriFailed("boom".into()), addr, &configured);
        assert_eq!(failed.verdict, Verdict::Missing);
        assert_eq!(
            line(&State::Down("x".into()), addr, &[]).verdict,
            Verdict::Warn
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_down() {
        let state = query(Path::new("/nonexistent/containerd.sock")).await;
        assert!(matches!(state, State::Down(_)), "{state:?}");
    }
}
