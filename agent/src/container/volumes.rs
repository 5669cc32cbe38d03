//! A container's volumes in the guest: the host shares each under
//! `<share>/<container>/volumes/`, with the mounts nested in it (a tmpfs below a hostPath)
//! as virtio-fs submounts. The kernel mounts a submount when a path first crosses it, with
//! the flags of the mount it is crossed from; crossed from inside a container's read-only
//! bind it would come up read-only, where runc leaves a nested mount writable. Looking
//! each one up before the container is made mounts it in the agent's namespace, and the
//! container's recursive bind then copies it with its own flags.
use std::path::{Component, Path};

use shoji_agent_api::GUEST_SHARE_DIR;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("submount {path:?} is not a plain path under {volumes}")]
pub struct BadSubmount {
    path: String,
    volumes: String,
}

/// The directory holding container `id`'s volumes.
fn volumes_dir(id: &str) -> String {
    format!("{GUEST_SHARE_DIR}/{id}/volumes/")
}

/// Checks that every path is a plain path below container `id`'s volumes.
pub fn check(id: &str, paths: &[String]) -> Result<(), BadSubmount> {
    let volumes = volumes_dir(id);
    for path in paths {
        let plain = Path::new(path)
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !plain || !path.starts_with(&volumes) || path.len() > 4096 {
            return Err(BadSubmount {
                path: path.chars().take(256).collect(),
                volumes,
            });
        }
    }
    Ok(())
}

/// Mounts each submount in the agent's namespace by looking it up. One the host removed
/// in the meantime is skipped: the container then sees the directory below it, as runc
/// would.
pub fn reveal(paths: &[String]) -> Vec<(String, std::io::Error)> {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).err().map(|e| (p.clone(), e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submounts_must_lie_below_the_containers_volumes() {
        let ok = format!("{GUEST_SHARE_DIR}/c1/volumes/m0/tmpfs");
        assert_eq!(check("c1", std::slice::from_ref(&ok)), Ok(()));
        for bad in [
            format!("{GUEST_SHARE_DIR}/c2/volumes/m0/tmpfs"),
            format!("{GUEST_SHARE_DIR}/c1/volumes/../rootfs"),
            format!("{GUEST_SHARE_DIR}/c1/rootfs/x"),
            "/etc".to_string(),
            "relative/c1/volumes/m0".to_string(),
        ] {
            assert!(check("c1", &[ok.clone(), bad.clone()]).is_err(), "{bad}");
        }
    }
}
