//! containerd's runtime options (`runtimeoptions.v1.Options`), the message CRI passes in
//! Create with the runtime handler's `ConfigPath`.
use std::path::PathBuf;

use containerd_shim_protos::protobuf::Message;

#[allow(warnings, clippy::all)]
mod runtimeoptions {
    include!(concat!(env!("OUT_DIR"), "/gen/runtimeoptions.rs"));
}

pub use runtimeoptions::Options;

/// The type URL containerd gives these options.
const TYPE_URL_SUFFIX: &str = "runtimeoptions.v1.Options";

/// The `ConfigPath` of the runtime options in a Create request, when there is one.
/// Options of another type (e.g. runc's) are not shoji's and are ignored; a malformed
/// message of this type is an error naming what is wrong.
pub fn config_path(type_url: &str, value: &[u8]) -> Result<Option<PathBuf>, String> {
    if !type_url.ends_with(TYPE_URL_SUFFIX) {
        return Ok(None);
    }
    let options = Options::parse_from_bytes(value)
        .map_err(|e| format!("runtime options ({type_url}): {e}"))?;
    Ok(Some(PathBuf::from(options.config_path)).filter(|p| !p.as_os_str().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_is_read_from_runtime_options() {
        let bytes = Options {
            type_url: "x".into(),
            config_path: "/etc/shoji/a.toml".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap();
        let url = "type.googleapis.com/runtimeoptions.v1.Options";
        assert_eq!(
            config_path(url, &bytes).unwrap(),
            Some(PathBuf::from("/etc/shoji/a.toml"))
        );
        assert_eq!(
            config_path("containerd.runc.v1.Options", &bytes).unwrap(),
            None
        );
        let empty = Options::default().write_to_bytes().unwrap();
        assert_eq!(config_path(url, &empty).unwrap(), None);
        assert!(config_path(url, &[0xff, 0xff, 0xff]).is_err());
    }
}
