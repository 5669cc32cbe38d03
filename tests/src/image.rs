//! A busybox-static OCI image built locally (no registry here) and imported with `ctr images import`.
//!
//! One tar layer: `/bin/busybox` and a symlink per applet, `/etc/passwd` (root and `user`, uid 1000),
//! `/etc/group`, `/tmp`, `/root`, `/home/user`, `/www`. Its default command sleeps, so the same image serves as
//! the CRI sandbox ("pause") image; tests give containers their own command. busybox has `httpd`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::containerd::Containerd;

/// The image's reference, fully qualified so CRI does not rewrite it.
pub const BUSYBOX: &str = "localhost/shoji/busybox:test";
const BUSYBOX_BIN: &str = "/bin/busybox";
/// uid/gid of the unprivileged user in the image.
pub const USER_UID: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image: {BUSYBOX_BIN} is not statically linked busybox (install busybox-static)")]
    NoBusybox,
    #[error("image: import into namespace {namespace}: {source}")]
    Import {
        namespace: String,
        #[source]
        source: crate::containerd::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

struct Blob {
    digest: String,
    size: usize,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
        Blob {
            digest,
            size: bytes.len(),
            bytes,
        }
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn append_file(
    t: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    t.append_data(&mut h, path, data)
}

fn append_dir(
    t: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    uid: u32,
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    h.set_uid(uid.into());
    h.set_gid(uid.into());
    t.append_data(&mut h, path, std::io::empty())
}

/// The root filesystem layer (uncompressed tar).
fn rootfs_layer(busybox: &[u8], applets: &[String]) -> std::io::Result<Vec<u8>> {
    let mut t = tar::Builder::new(Vec::new());
    for d in [
        "bin", "etc", "root", "home", "proc", "sys", "dev", "www", "var", "usr", "usr/bin",
    ] {
        append_dir(&mut t, d, 0o755, 0)?;
    }
    append_dir(&mut t, "tmp", 0o1777, 0)?;
    append_dir(&mut t, "home/user", 0o755, USER_UID)?;
    append_file(&mut t, "bin/busybox", 0o755, busybox)?;
    for applet in applets.iter().filter(|a| a.as_str() != "busybox") {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        t.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    append_file(
        &mut t,
        "etc/passwd",
        0o644,
        format!(
            "root:x:0:0:root:/root:/bin/sh\nuser:x:{USER_UID}:{USER_UID}:user:/home/user:/bin/sh\n"
        )
        .as_bytes(),
    )?;
    append_file(
        &mut t,
        "etc/group",
        0o644,
        format!("root:x:0:\nuser:x:{USER_UID}:\n").as_bytes(),
    )?;
    append_file(&mut t, "www/index.html", 0o644, b"shoji busybox httpd\n")?;
    t.into_inner()
}

/// The OCI layout (`oci-layout`, `index.json`, blobs) as the tar archive `ctr images import` reads.
fn oci_archive(layer: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let layer = Blob::new(layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sleep", "2147483647"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
    });
    let config = Blob::new(serde_json::to_vec(&config).expect("json"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.digest, "size": layer.size}],
    });
    let manifest = Blob::new(serde_json::to_vec(&manifest).expect("json"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest.digest,
            "size": manifest.size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": BUSYBOX,
                "org.opencontainers.image.ref.name": "test",
            },
        }],
    });
    let mut t = tar::Builder::new(Vec::new());
    append_file(
        &mut t,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append_file(
        &mut t,
        "index.json",
        0o644,
        &serde_json::to_vec(&index).expect("json"),
    )?;
    for blob in [&layer, &config, &manifest] {
        let hex = blob.digest.trim_start_matches("sha256:");
        append_file(&mut t, &format!("blobs/sha256/{hex}"), 0o644, &blob.bytes)?;
    }
    t.into_inner()
}

/// Path of the image archive, built once per busybox binary and cached in the temp dir (atomic rename, so
/// parallel test processes never read a half-written archive).
pub fn busybox_archive() -> Result<PathBuf, Error> {
    let busybox = fs::read(BUSYBOX_BIN).map_err(|_| Error::NoBusybox)?;
    let out = std::process::Command::new(BUSYBOX_BIN)
        .arg("--list")
        .output()
        .map_err(io_err(format!("{BUSYBOX_BIN} --list")))?;
    if !out.status.success() {
        return Err(Error::NoBusybox);
    }
    let applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    let key = format!("{:x}", Sha256::digest(&busybox));
    let dir = std::env::temp_dir().join("shoji-tests-images");
    let path = dir.join(format!("busybox-{}.oci.tar", &key[..16]));
    if path.exists() {
        return Ok(path);
    }
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let archive = rootfs_layer(&busybox, &applets)
        .and_then(oci_archive)
        .map_err(io_err("build busybox OCI archive"))?;
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err("temp archive"))?;
    fs::write(tmp.path(), archive).map_err(io_err("write archive"))?;
    tmp.persist(&path).map_err(|e| Error::Io {
        what: "persist archive".into(),
        source: e.error,
    })?;
    Ok(path)
}

/// Imports the busybox image into `namespace` (`k8s.io` for CRI) of `ctrd`, unpacked for the default snapshotter.
pub async fn import(ctrd: &Containerd, namespace: &str) -> Result<(), Error> {
    let archive = tokio::task::spawn_blocking(busybox_archive)
        .await
        .expect("image build thread")?;
    import_archive(ctrd, namespace, &archive).await
}

async fn import_archive(ctrd: &Containerd, namespace: &str, archive: &Path) -> Result<(), Error> {
    let archive = archive.to_str().expect("temp paths are UTF-8");
    ctrd.ctr_ok(
        namespace,
        &["images", "import", archive],
        Duration::from_secs(60),
    )
    .await
    .map_err(|source| Error::Import {
        namespace: namespace.into(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_has_layout_and_applets() {
        let path = busybox_archive().expect("archive");
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(fs::File::open(&path).unwrap());
        let mut layer = None;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            if e.size() > 1_000_000 {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut v).unwrap();
                layer = Some(v);
            }
            names.push(name);
        }
        assert!(
            names.contains(&"oci-layout".to_string()) && names.contains(&"index.json".to_string())
        );
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("blobs/sha256/"))
                .count(),
            3
        );
        let layer = layer.expect("layer blob");
        let mut inner = tar::Archive::new(&layer[..]);
        let entries: Vec<String> = inner
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        for want in ["bin/busybox", "bin/sh", "bin/httpd", "etc/passwd", "tmp"] {
            assert!(
                entries.iter().any(|e| e.trim_end_matches('/') == want),
                "{want} missing from layer"
            );
        }
    }
}
